"""The name qemu-img 7.2 prints for an image opened with ``--image-opts``: ``json:{...}``
when an option that changes what the image is (qcow2's ``encrypt.key-secret``, luks's
``key-secret``) is given, the plain file name otherwise; and ``-t CACHE`` checked as
qemu-img checks it (``Invalid cache option: X``, exit 1, nothing written)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import diskimg

from .conftest import needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

SECRET = ["--object", "secret,id=s0,data=pw"]
QCOW2 = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0"
LUKS = "driver=luks,file.filename=e.luks,key-secret=s0"


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with an encrypted qcow2 (e.qcow2), a luks volume (e.luks) and a plain
    qcow2 (p.qcow2); the encrypted ones made by diskimg (qemu-img 7.2's LUKS create can
    fail its PBKDF timing, "Unable to get accurate CPU usage", on a loaded host)."""
    d = tmp_path_factory.mktemp("names")
    diskimg.create(d / "e.qcow2", "qcow2", 1 << 20, secrets={"s0": b"pw"},
                   options={"encrypt.format": "luks", "encrypt.key-secret": "s0",
                            "encrypt.iter-time": 10})
    diskimg.create(d / "e.luks", "luks", 1 << 20, secrets={"s0": b"pw"},
                   options={"key-secret": "s0", "iter-time": 10})
    assert qemu("create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=d).rc == 0
    return d


@pytest.mark.parametrize("spec", [QCOW2, LUKS])
@pytest.mark.parametrize("argv", [["info"], ["info", "--output=json"], ["map", "--output=json"],
                                  ["check", "--output=json"]])
def test_encrypted_image_named_like_qemu(di, encrypted: Path, spec: str,
                                         argv: list[str]) -> None:
    mine = di(*argv, *SECRET, "--image-opts", spec, cwd=encrypted)
    ref = qemu(*argv, *SECRET, "--image-opts", spec, cwd=encrypted)
    if argv[0] == "check" and ref.rc == 0:
        ref_doc, mine_doc = ref.json, mine.json
        assert isinstance(mine_doc, dict)
        mine_doc.pop("findings", None)  # diskimg's addition to check's JSON
        assert (mine.rc, mine_doc, mine.err) == (ref.rc, ref_doc, ref.err)
        return
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    if argv[0] == "info":
        assert "json:{" in mine.out  # the point: not the bare file name


@pytest.mark.parametrize("spec", ["driver=qcow2,file.filename=p.qcow2,lazy-refcounts=on",
                                  "driver=qcow2,file.filename=p.qcow2,cache-size=1M",
                                  "driver=qcow2,file.filename=p.qcow2"])
def test_other_options_keep_the_file_name(di, encrypted: Path, spec: str) -> None:
    for argv in (["info"], ["info", "--output=json"]):
        mine = di(*argv, "--image-opts", spec, cwd=encrypted)
        ref = qemu(*argv, "--image-opts", spec, cwd=encrypted)
        assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)


def _state(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("argv", [
    ["convert", "-t", "foo", "p.qcow2", "o.qcow2"],
    ["convert", "-O", "raw", "-t", "bogus", "p.qcow2", "o.raw"],
    ["commit", "-t", "foo", "top.qcow2"],
    ["commit", "-t", "foo", "missing.qcow2"],
    ["rebase", "-t", "foo", "-u", "-b", "p.qcow2", "-F", "qcow2", "top.qcow2"],
    ["amend", "-t", "foo", "-o", "lazy_refcounts=on", "p.qcow2"],
    ["convert", "-T", "bar", "-t", "foo", "p.qcow2", "o.qcow2"],
])
def test_invalid_target_cache_refused_like_qemu(di, twin_dirs: tuple[Path, Path],
                                                argv: list[str]) -> None:
    qd, dd = twin_dirs
    for d in (qd, dd):
        assert qemu("create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=d).rc == 0
        assert qemu("create", "-q", "-f", "qcow2", "-b", "p.qcow2", "-F", "qcow2",
                    "top.qcow2", cwd=d).rc == 0
        assert qemu("snapshot", "-c", "s", "top.qcow2", cwd=d).rc == 0  # make top differ
    before = _state(dd)
    ref = qemu(*argv, cwd=qd)
    mine = di(*argv, cwd=dd)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert mine.rc == 1 and "cache option" in mine.err
    # a refusal changes nothing (qemu-img's convert has created its target by then)
    assert _state(dd) == before


def test_valid_target_cache_accepted(di, twin_dirs: tuple[Path, Path]) -> None:
    qd, dd = twin_dirs
    for d in (qd, dd):
        assert qemu("create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=d).rc == 0
        assert qemu("convert", "-t", "unsafe", "-O", "raw", "p.qcow2", "o.raw", cwd=d).rc == 0
    mine = di("convert", "-t", "writeback", "-O", "raw", "p.qcow2", "m.raw", cwd=dd)
    assert mine.rc == 0, mine.err
    assert (dd / "m.raw").read_bytes() == (qd / "o.raw").read_bytes()
