"""File names a qcow2 header stores (the backing file, the data file) are bytes, as in
QEMU: one that is not UTF-8 names the file with those bytes, both ways.  diskimg used to
refuse such a backing file name as malformed, open the wrong data file (U+FFFD in place of
the byte) and fail with an internal error creating one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                 reason="qemu-img/qemu-io absent")]

ODD = b"f\xffile"  # not UTF-8


def _info_text(tool: list[str], img: Path) -> bytes:
    return subprocess.run([*tool, "info", img], capture_output=True, check=True,
                          cwd=img.parent).stdout


def _ours() -> list[str]:
    return [sys.executable, "-m", "diskimg"]


@pytest.mark.parametrize("maker", ["qemu-img", "diskimg"])
def test_data_file_named_by_bytes(tmp_path: Path, maker: str,
                                  turns_at_the_edges: Callable[[Path, str, int], None]
                                  ) -> None:
    """Every byte of the guest, offset 0 and the last partial cluster included, is the
    data file's, whichever tool made the image and wrote to it."""
    img = tmp_path / "d.qcow2"
    data = os.fsdecode(bytes(tmp_path) + b"/" + ODD + b".raw")
    size = 3 * 65536 + 1536
    if maker == "qemu-img":
        QEMU.img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img, str(size))
    else:
        diskimg.create(img, "qcow2", size, options={"data_file": data})
    assert os.path.exists(os.fsencode(data))
    turns_at_the_edges(img, "qcow2", size)
    assert os.stat(os.fsencode(data)).st_size >= 65536 + 4096  # the data went there
    text = _info_text(["qemu-img"], img)
    assert b"data file: " + os.fsencode(data) + b"\n" in text
    assert _info_text(_ours(), img) == text
    QEMU.check_clean(img)


@pytest.mark.parametrize("maker", ["qemu-img", "diskimg"])
def test_backing_file_named_by_bytes(tmp_path: Path, maker: str) -> None:
    base = tmp_path / os.fsdecode(ODD + b".qcow2")
    QEMU.img("create", "-q", "-f", "qcow2", base, "1M")
    QEMU.io(base, "write -P 0x44 0 64k", "write -P 0x55 1048064 512")
    top = tmp_path / "top.qcow2"
    name = os.fsdecode(ODD + b".qcow2")  # relative to the overlay
    if maker == "qemu-img":
        QEMU.img("create", "-q", "-f", "qcow2", "-b", name, "-F", "qcow2", top)
    else:
        diskimg.create(top, "qcow2", None, backing_file=name, backing_fmt="qcow2")
    text = _info_text(["qemu-img"], top)
    assert b"backing file: " + ODD + b".qcow2 (actual path: " in text
    assert _info_text(_ours(), top) == text
    with diskimg.open(top) as d:
        assert d.read(0, 65536) == b"\x44" * 65536
        assert d.read(1048064, 512) == b"\x55" * 512
    QEMU.check_clean(top)


def test_a_name_that_stands_for_no_bytes_is_refused_by_name(tmp_path: Path) -> None:
    """A lone surrogate no bytes decode to (only a Python caller can pass one) is refused
    as the caller's, not stored as some other bytes, and the image is unchanged."""
    img = tmp_path / "x.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "1M")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    with pytest.raises(diskimg.UsageError, match="lone surrogate"):
        diskimg.rebase(img, "b\ud800", backing_fmt="qcow2", unsafe=True)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    ext = tmp_path / "e.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'e.raw'}", ext,
             "1M")
    before = hashlib.sha256(ext.read_bytes()).hexdigest()
    with pytest.raises(diskimg.UsageError, match="Data file name is not valid text"):
        diskimg.amend(ext, options={"data_file": "c\ud800"})
    assert hashlib.sha256(ext.read_bytes()).hexdigest() == before


def test_measure_of_a_bitmap_named_by_bytes_is_qemus(tmp_path: Path) -> None:
    """measure counts a bitmap's directory entry by the codec's own packing, so names
    that are not UTF-8 (their bytes, not U+FFFD's three each) give qemu-img's numbers:
    64 entries of 368 bytes fit the directory in one cluster, of 1048 bytes they do not."""
    img = tmp_path / "m.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "1M")
    for i in range(64):
        QEMU.img("bitmap", "--add", img, os.fsdecode(b"%02d" % i + b"\xff" * 338))
    want = QEMU.img("measure", "--output=json", "-O", "qcow2", img).stdout
    got = subprocess.run([*_ours(), "measure", "--output=json", "-O", "qcow2", img],
                         capture_output=True, text=True, check=True).stdout
    assert got == want
