"""``diskimg bitmap`` and ``img.bitmaps`` against qemu-img 7.2, qemu-io and qemu-nbd:
the same command lines give the same bitmaps (qemu-img info), clean images (qemu-img
check) and the same messages; refusals leave the file byte-identical; dirty extents read
by diskimg equal those qemu-nbd exports, in both directions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd")
                                      and shutil.which("nbdinfo")),
                                 reason="qemu-img/qemu-nbd/nbdinfo absent")]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskimg", "bitmap", *map(str, args)],
                          capture_output=True, text=True, check=False)


def _words(text: str) -> str:
    """A message with the program name and qemu's node name (#blockNNN, ours the file
    name) taken out."""
    text = re.sub(r"^(qemu-img|diskimg): ", "", text, flags=re.M)
    text = re.sub(r"'[^']*\.qcow2'|'?#block\d+'?", "NODE", text)
    return text.replace("Try 'qemu-img --help' for more information\n", "")


def _bitmaps(p: Path) -> list[dict[str, object]]:
    return QEMU.info(p)["format-specific"]["data"].get("bitmaps", [])


# each scenario: setup command lines (applied to both copies with qemu-img), then the
# command line under test (the image and bitmap name are appended)
SCENARIOS = [
    ([], ["--add"]),
    ([], ["--add", "-g", "1M", "--disable"]),
    ([["--add", "b"]], ["--add"]),                        # exists
    ([], ["--remove"]),                                   # not found
    ([], ["--add", "-g", "100"]),                         # bad granularity
    ([], ["-g", "1M", "--remove"]),                       # -g without --add
    ([], []),                                             # no action
    ([["--add", "b"]], ["--disable", "--enable", "--clear"]),
    ([["--add", "b"], ["--add", "-g", "1M", "c"]], ["--merge", "c"]),
    ([["--add", "b"]], ["--merge", "nope"]),
    ([["--add", "b"]], ["--remove", "--add"]),
]


@pytest.fixture(scope="module")
def with_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bitmap-cli") / "data.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p, "20M")
    QEMU.io(p, "write -P 0x5a 1M 300k")
    return p


@pytest.mark.parametrize(("setup", "cmd"), SCENARIOS,
                         ids=[" ".join(c) or "none" for _, c in SCENARIOS])
def test_bitmap_cli_like_qemu_img(tmp_path: Path, with_data: Path, setup: list[list[str]],
                                  cmd: list[str]) -> None:
    base = tmp_path / "base.qcow2"
    shutil.copyfile(with_data, base)
    for s in setup:
        QEMU.img("bitmap", *s[:-1], base, s[-1])
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)
    before = _sha(ours)
    want = QEMU.img("bitmap", *cmd, theirs, "b", ok=None)
    got = _ours(*cmd, ours, "b")
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert _words(got.stderr) == _words(want.stderr)
    if want.returncode and _sha(theirs) == _sha(base):
        assert _sha(ours) == before  # a refusal changes nothing
    assert _bitmaps(ours) == _bitmaps(theirs)
    QEMU.check_clean(ours)
    assert QEMU.compare(ours, theirs) == 0  # guest bytes untouched
    # (dirty extents against qemu-nbd: the tests below and test_bitmap_model.py)


def test_refusals_leave_file_identical(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "4M")
    QEMU.img("bitmap", "--add", img, "b")
    v2 = tmp_path / "v2.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "4M")
    raw = tmp_path / "r.raw"
    QEMU.img("create", "-q", "-f", "raw", raw, "4M")
    long = "x" * 1024
    empty = tmp_path / "empty.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", empty, "0")
    cases = [(img, ["--add"], "b", "Bitmap already exists: b"),
             (img, ["--add"], long, "Name length exceeds maximum (1023 characters)"),
             (img, ["--add"], "", "Bitmap name cannot be empty"),
             (v2, ["--add"], "b", "Cannot store dirty bitmaps in qcow2 v2 files"),
             (raw, ["-f", "raw", "--add"], "b", "Operation not supported"),
             (img, ["--enable"], "zz", "Dirty bitmap 'zz' not found"),
             (empty, ["--add"], "b", "the disk is empty (size 0)")]
    for path, args, name, msg in cases:
        before = _sha(path)
        res = _ours(*args, path, name)
        assert res.returncode == 1 and msg in res.stderr, res.stderr
        assert _sha(path) == before
    before = _sha(img)
    with diskimg.open(img) as d, pytest.raises(diskimg.UsageError):
        d.bitmaps.clear("b")  # read-only
    assert _sha(img) == before
    before = _sha(img)  # a lone surrogate is text no bytes decode to: no name to store
    with diskimg.open(img, "r+") as d, pytest.raises(diskimg.UsageError,
                                                      match="lone surrogate"):
        d.bitmaps.add("\ud800")
    assert _sha(img) == before
    before = _sha(raw)
    with diskimg.open(raw, "r+", "raw") as d, pytest.raises(diskimg.UnsupportedFeatureError):
        d.bitmaps.add("b")
    assert _sha(raw) == before


def test_a_name_that_is_not_utf8_keeps_its_bytes(tmp_path: Path) -> None:
    """qemu-img stores a bitmap name as the bytes it is given.  diskimg stores such a name
    the same way, shows it as qemu-img does (its bytes in text, U+FFFD in JSON), finds it
    by the same command-line bytes, and keeps its bytes when it rewrites the directory
    (it used to store U+FFFD instead, or fail with an internal error)."""
    name = os.fsdecode(b"a\xffb")  # what the command line gives for these bytes
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    for p in (theirs, ours):
        QEMU.img("create", "-q", "-f", "qcow2", p, "4M")
    QEMU.img("bitmap", "--add", theirs, name)
    assert _ours("--add", ours, name).returncode == 0
    for p in (theirs, ours):
        want = subprocess.run(["qemu-img", "info", p], capture_output=True, check=True).stdout
        assert b"name: a\xffb\n" in want
        got = subprocess.run([sys.executable, "-m", "diskimg", "info", p],
                             capture_output=True, check=True).stdout
        assert got == want
        got_json = subprocess.run([sys.executable, "-m", "diskimg", "info", "--output=json",
                                   p], capture_output=True, check=True).stdout
        assert json.loads(got_json) == QEMU.info(p)
        assert [b["name"] for b in _bitmaps(p)] == ["a\ufffdb"]
    assert _ours("--add", "--disable", theirs, "second").returncode == 0  # a rewrite
    with diskimg.open(theirs, "r+") as d:  # flags it in use, then stores it: two more
        d.write(1 << 20, b"x" * 512)
    info = subprocess.run(["qemu-img", "info", theirs], capture_output=True).stdout
    assert b"name: a\xffb\n" in info and b"name: second\n" in info
    assert QEMU.dirty_map(theirs, "second") == []
    QEMU.check_clean(theirs)
    QEMU.io(theirs, "write 0 64k")
    assert _ours("--merge", name, theirs, "second").returncode == 0  # found as the source
    assert QEMU.dirty_map(theirs, "second") == [(0, 65536), (1 << 20, 65536)]
    assert _ours("--remove", theirs, name).returncode == 0
    assert [b["name"] for b in _bitmaps(theirs)] == ["second"]
    QEMU.check_clean(theirs)


def test_in_use_bitmap_refused_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "4M")
    QEMU.img("bitmap", "--add", img, "b")
    with diskimg.open(img, "r+") as d:
        d.write(0, b"x" * 512)
        mid = tmp_path / "crashed.qcow2"
        shutil.copyfile(img, mid)  # as a crash would leave it: b flagged in-use
    for act in ("--clear", "--enable", "--disable"):
        before = _sha(mid)
        want = QEMU.img("bitmap", act, mid, "b", ok=None)
        got = _ours(act, mid, "b")
        assert got.returncode == want.returncode == 1
        assert _words(got.stderr) == _words(want.stderr)
        assert _sha(mid) == before
    assert _ours("--remove", mid, "b").returncode == 0
    assert _bitmaps(mid) == []
    QEMU.img("check", "-r", "all", mid, ok=None)
    QEMU.check_clean(mid)


def test_qemu_io_writes_read_by_diskimg(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "64M")
    QEMU.img("bitmap", "--add", img, "a")
    QEMU.img("bitmap", "--add", "-g", "1M", img, "big")
    QEMU.img("bitmap", "--add", "-g", "512", img, "fine")
    QEMU.io(img, "write 0 100k", "write 10M 1k", "write -z 30M 3M", "write 67108352 512",
            "discard 50M 64k")
    for name in ("a", "big", "fine"):
        with diskimg.open(img) as d:
            got = list(d.dirty_extents(name))
        assert got and got == QEMU.dirty_map(img, name)


def test_diskimg_writes_and_ops_read_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "30M")
    with diskimg.open(img, "r+") as d:
        d.bitmaps.add("full")
        d.write(0, b"a" * 70000)
        d.bitmaps.add("inc", 4096)
        d.write(5 << 20, b"b" * 5000)
        d.bitmaps.add("off", disabled=True)
        d.write((30 << 20) - 100, b"c" * 100)
        d.bitmaps.merge("off", "inc")
        d.bitmaps.disable("inc")
        d.write(20 << 20, b"d")
        want = {b.name: list(d.dirty_extents(b.name)) for b in d.bitmaps.list()}
    assert want == {
        "full": [(0, 131072), (5 << 20, 65536), (20 << 20, 65536), ((30 << 20) - 65536,
                                                                    65536)],
        "inc": [(5 << 20, 8192), ((30 << 20) - 4096, 4096)],
        "off": [(5 << 20, 65536), ((30 << 20) - 65536, 65536)],
    }
    QEMU.check_clean(img)
    for name, ext in want.items():
        assert QEMU.dirty_map(img, name) == ext
    assert [b["flags"] for b in _bitmaps(img)] == [["auto"], [], []]


def test_object_and_image_opts(tmp_path: Path) -> None:
    obj = "secret,id=s0,data=pw"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", ours, "4M")
    shutil.copyfile(ours, theirs)
    for p, run in ((ours, _ours), (theirs, lambda *a: QEMU.img("bitmap", *a))):
        opts = f"driver=qcow2,file.filename={p}"
        assert run("--object", obj, "--add", "--disable", "-g", "8k", "--image-opts", opts,
                   "b").returncode == 0
    assert _bitmaps(ours) == _bitmaps(theirs) == [{"flags": [], "name": "b",
                                                   "granularity": 8192}]
    QEMU.check_clean(ours)
    before = _sha(ours)
    args = ("--add", "--image-opts", "-f", "qcow2", ours, "c")
    got, want = _ours(*args), QEMU.img("bitmap", *args, ok=None)
    assert got.returncode == want.returncode == 1
    assert _words(got.stderr) == _words(want.stderr)  # --image-opts with --format
    assert _sha(ours) == before
