"""The issue's bad-input list, through ``diskimg virsh`` and the Python API.

Each case: exit status 1, only ``error: ...`` lines on stderr naming the problem (never a
traceback), and the whole working tree (config dir, state dir, pool directory, the files
given as input) byte-for-byte as before — nothing half-created left behind.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from diskimg.errors import PoolError
from diskimg.pool import PoolRegistry
from diskimg.pool.cli import main

BOMB = ("<?xml version='1.0'?>\n<!DOCTYPE v [<!ENTITY a 'aaaaaaaaaa'>"
        "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'><!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;'>]>"
        "<volume><name>&c;</name><capacity>1</capacity></volume>")
EXTERNAL = ("<!DOCTYPE pool [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
            "<pool type='dir'><name>&x;</name><target><path>/x</path></target></pool>")
FILES = {
    "malformed-pool.xml": "<pool type='dir'><name>p2</name>",
    "malformed-vol.xml": "<volume><name>v.raw</name><capacity>1</capacity>",
    "bomb-vol.xml": BOMB,
    "bomb-pool.xml": BOMB.replace("volume", "pool"),
    "external.xml": EXTERNAL,
    "dotdot-vol.xml": "<volume><name>../escape.raw</name><capacity>1</capacity></volume>",
    "unit-vol.xml": "<volume><name>u.raw</name><capacity unit='parsecs'>1</capacity></volume>",
    "twice-vol.xml": "<volume><name>keep.raw</name><capacity>1</capacity></volume>",
    "cluster-vol.xml": "<volume><name>c.qcow2</name><capacity>1048576</capacity><target>"
                       "<format type='qcow2'/><clusterSize unit='B'>1000</clusterSize>"
                       "</target></volume>",
    "relative-pool.xml": "<pool type='dir'><name>rel</name><target><path>rel/dir</path>"
                         "</target></pool>",
    "notadir": "a file where a pool directory should be\n",
}

# (command, fragments every one of which must appear in stderr)
CASES: list[tuple[list[str], list[str]]] = [
    (["pool-define", "malformed-pool.xml"], ["pool XML is not well-formed"]),
    (["vol-create", "p1", "malformed-vol.xml"], ["volume XML is not well-formed"]),
    (["vol-create", "p1", "bomb-vol.xml"], ["DOCTYPE or ENTITY declaration"]),
    (["pool-define", "bomb-pool.xml"], ["DOCTYPE or ENTITY declaration"]),
    (["pool-define", "external.xml"], ["DOCTYPE or ENTITY declaration"]),
    (["vol-create-as", "p1", "../escape.raw", "1M"], ["'../escape.raw' cannot contain '/'"]),
    (["vol-create-as", "p1", "a/b.raw", "1M"], ["'a/b.raw' cannot contain '/'"]),
    (["vol-create-as", "p1", "..", "1M"], ["invalid volume name '..'"]),
    (["vol-create", "p1", "dotdot-vol.xml"], ["'../escape.raw' cannot contain '/'"]),
    (["pool-define-as", "p/x", "dir", "--target", "{tmp}/x"], ["p/x cannot contain '/'"]),
    (["pool-define", "relative-pool.xml"], ["'rel/dir' is not absolute"]),
    (["pool-build", "pf"], ["cannot create path '{tmp}/notadir': Not a directory"]),
    (["pool-start", "pf"], ["cannot open directory '{tmp}/notadir': Not a directory"]),
    (["pool-start", "pf", "--build"], ["'{tmp}/notadir': Not a directory"]),
    (["vol-create-as", "p1", "x.raw", "10Q"], ["Malformed size 10Q", "unknown suffix 'Q'"]),
    (["vol-create-as", "p1", "x.raw", "1M", "--allocation", "5XB"],
     ["Malformed size 5XB", "unknown suffix 'XB'"]),
    (["vol-create-as", "p1", "x.raw", "1.5.5M"], ["Malformed size 1.5.5M"]),
    (["vol-create", "p1", "unit-vol.xml"], ["unknown suffix 'parsecs' in <capacity>"]),
    (["vol-create-as", "p1", "keep.raw", "2M"], ["storage volume 'keep.raw' exists already"]),
    (["vol-create", "p1", "twice-vol.xml"], ["storage volume 'keep.raw' exists already"]),
    (["vol-create", "p1", "cluster-vol.xml"], ["Cluster size must be a power of two"]),
    (["vol-delete", "missing.raw", "p1"],
     ["failed to get vol 'missing.raw'", "Storage volume not found"]),
    (["vol-wipe", "missing.raw", "--pool", "p1"], ["Storage volume not found"]),
    (["vol-create-as", "nopool", "y.raw", "1M"], ["Storage pool not found", "'nopool'"]),
]


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: kind, mode and (for files) a content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            kind = "dir" if p.is_dir() else "file"
            h = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else ""
            out[str(p.relative_to(root))] = (kind, st.st_mode, h)
    return out


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    reg = PoolRegistry(tmp_path / "cfg", tmp_path / "state")
    p1 = reg.define("p1", tmp_path / "images")
    p1.build()
    p1.start()
    keep = p1.create_volume("keep.raw", 4096)
    Path(keep.path).write_bytes(b"precious" * 512)
    reg.define("pf", tmp_path / "notadir")  # libvirt defines it; building/starting fails
    return tmp_path


@pytest.mark.parametrize(("cmd", "fragments"), CASES, ids=[" ".join(c[:2]) for c, _ in CASES])
def test_bad_input_clean_error_nothing_left(work: Path, cmd: list[str],
                                            fragments: list[str]) -> None:
    before = tree(work)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config-dir", str(work / "cfg"), "--state-dir", str(work / "state"),
            *(a.replace("{tmp}", str(work)) for a in cmd)]
    assert main(argv, stdout=out, stderr=err) == 1
    text = err.getvalue()
    assert text and all(line.startswith("error: ") for line in text.splitlines()), text
    for frag in fragments:
        assert frag.replace("{tmp}", str(work)) in text, text
    assert "Traceback" not in text and out.getvalue() == "\n"
    assert tree(work) == before


def test_api_bad_input_leaves_nothing(work: Path) -> None:
    """The same refusals through the Python API: PoolError, no file created."""
    reg = PoolRegistry(work / "cfg", work / "state")
    p1 = reg.lookup("p1")
    before = tree(work)
    calls = [
        lambda: p1.create_volume("../escape.raw", 1024),
        lambda: p1.create_volume("keep.raw", 1024),
        lambda: p1.create_volume("x.raw", "10parsecs"),
        lambda: p1.create_volume_xml(BOMB),
        lambda: p1.create_volume_xml(FILES["unit-vol.xml"]),
        lambda: p1.volume("missing.raw"),
        lambda: reg.lookup("pf").build(),
        lambda: reg.lookup("pf").start(),
        lambda: reg.define_xml(FILES["malformed-pool.xml"]),
        lambda: reg.create_xml("<pool type='dir'><name>t</name><target><path>"
                               f"{work}/malformed-pool.xml</path></target></pool>"),
    ]
    for call in calls:
        with pytest.raises(PoolError):
            call()
    assert tree(work) == before
