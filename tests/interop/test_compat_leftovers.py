"""Leftovers of docs/compatibility.md's "Not there yet" list (issue 17), checked against
qemu-img: the lines a read-write open of a dirty lazy-refcounts image prints while it
repairs the image."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg import progname
from tests.qemukit import QEMU

pytestmark = pytest.mark.qemu


def _dirty_lazy(d: Path) -> Path:
    """A lazy-refcounts image whose writer was killed: dirty bit set, refcounts stale."""
    p = d / "dirty.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "64M")
    QEMU.io(p, "write -P 0x5a 0 512", "write -P 0xa5 128k 64k", "flush", "sigraise 9",
            ok=None)  # killed on purpose: the image stays dirty
    with open(p, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1, "image should be left dirty"
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("args", [("amend", "-o", "lazy_refcounts=off"),
                                  ("resize", "{}", "+1M")], ids=["amend", "resize"])
def test_dirty_repair_prints_qemus_lines(tmp_path: Path, args: tuple[str, ...]) -> None:
    src = _dirty_lazy(tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)

    def argv(p: Path) -> list[str]:
        a = [x.format(p) for x in args]
        return a if "{}" in args else [*a, str(p)]

    want = QEMU.img(*argv(theirs))
    got = subprocess.run([sys.executable, "-m", "diskimg", *argv(ours)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=60)
    assert got.returncode == 0, got.stderr
    assert "Repairing cluster" in want.stderr  # the repair did happen, in qemu too
    assert got.stderr == want.stderr
    assert got.stdout == want.stdout
    assert _sha(ours) == _sha(theirs)
    QEMU.check_clean(ours)


def test_library_open_repairs_quietly_unless_given_a_sink(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _dirty_lazy(tmp_path)
    quiet, heard = tmp_path / "quiet.qcow2", tmp_path / "heard.qcow2"
    shutil.copyfile(src, quiet)
    shutil.copyfile(src, heard)
    want = QEMU.io(tmp_path / "dirty.qcow2", "write -P 0x77 4096 512").stderr
    with diskimg.open(quiet, "r+") as dev:
        dev.write(4096, b"\x77" * 512)
    assert capfd.readouterr().err == ""  # the library prints nothing by itself
    lines: list[str] = []
    progname.set_message_sink(lines.append)
    try:
        with diskimg.open(heard, "r+") as dev:
            dev.write(4096, b"\x77" * 512)
    finally:
        progname.set_message_sink(None)
    assert "".join(line + "\n" for line in lines) == want
    assert _sha(quiet) == _sha(heard) == _sha(tmp_path / "dirty.qcow2")
