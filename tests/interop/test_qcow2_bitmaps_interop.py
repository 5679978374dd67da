"""Persistent dirty bitmaps stay true: after the same writes, diskimg's bitmaps hold
exactly the bits qemu-io's do, flags and info match, and qemu-img check is clean."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.qcow2.bitmaps import BME_FLAG_IN_USE

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]


def bitmap_bits(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (flags, bitmap data with trailing zeros stripped), parsed independently."""
    img = diskimg.open(path, force_share=True)
    try:
        bm = img.bitmaps  # type: ignore[attr-defined]
        cs = img.cluster_size  # type: ignore[attr-defined]
        out = {}
        for e in bm.entries:
            raw = img.host.pread(e.table_offset, 8 * e.table_size)  # type: ignore[attr-defined]
            data = b""
            for ent in struct.unpack(f">{e.table_size}Q", raw):
                off = ent & 0x00FFFFFFFFFFFE00
                data += img.host.pread(off, cs) if off else bytes(cs)  # type: ignore[attr-defined]
            out[e.name] = (e.flags, data.rstrip(b"\0"))
        return out
    finally:
        img.close()


def test_bitmaps_track_writes_like_qemu(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", theirs, "64M")
    for args in (["b0"], ["-g", "1M", "b1"], ["--disable", "b2"]):
        QEMU.img("bitmap", "--add", *args[:-1], theirs, args[-1])
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(theirs, ours)
    QEMU.io(theirs, "write 0 100k", "write 10M 1k", "write -z 30M 3M", "discard 50M 64k",
            fmt=None)
    with diskimg.open(ours, "r+") as d:
        d.write(0, b"\xcd" * 102400)
        d.write(10 << 20, b"\xcd" * 1024)
        d.write_zeroes(30 << 20, 3 << 20)
        d.discard(50 << 20, 65536)
        # while the image is open for writing, enabled bitmaps are flagged in use on disk
        assert bitmap_bits(ours)["b0"][0] & BME_FLAG_IN_USE
    got, want = bitmap_bits(ours), bitmap_bits(theirs)
    assert got == want
    assert got["b0"][1] and not got["b2"][1]  # the disabled bitmap is left alone
    info = [QEMU.info(p)["format-specific"] for p in (ours, theirs)]
    assert info[0] == info[1]
    with diskimg.open(ours) as d:
        assert d.info().to_json()["format-specific"] == info[1]
    assert QEMU.img("check", ours, ok=None).returncode == 0


@pytest.mark.parametrize("args", [["30M"], ["--shrink", "5632k"], ["+1536k"]],
                         ids=lambda a: " ".join(a))
def test_resize_with_bitmaps_like_qemu(tmp_path: Path, bitmaps_image: Path,
                                       args: list[str]) -> None:
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copyfile(bitmaps_image, theirs)
    shutil.copyfile(bitmaps_image, ours)
    QEMU.img("resize", "-q", *args[:-1], theirs, args[-1])
    res = subprocess.run([sys.executable, "-m", "diskimg", "resize", "-q", *args[:-1], ours,
                          args[-1]], capture_output=True, text=True, check=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    QEMU.check_clean(ours)
    info = [QEMU.info(p) for p in (ours, theirs)]
    assert info[0]["virtual-size"] == info[1]["virtual-size"]
    assert info[0]["format-specific"] == info[1]["format-specific"]
    assert QEMU.compare(ours, theirs) == 0
    with diskimg.open(ours) as d:
        for name in ("b", "c", "f"):
            assert list(d.dirty_extents(name)) == QEMU.dirty_map(theirs, name) \
                == QEMU.dirty_map(ours, name)


def test_resize_refused_with_an_inconsistent_bitmap(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "1M")
    QEMU.img("bitmap", "--add", img, "b0")
    with diskimg.open(img, "r+") as d:
        d.write(0, b"x")
        crashed = tmp_path / "crashed.qcow2"
        shutil.copyfile(img, crashed)  # b0 flagged in use, as a crash leaves it
    before = crashed.read_bytes()
    with diskimg.open(crashed, "r+") as d, \
            pytest.raises(diskimg.UsageError, match="'b0' is inconsistent"):
        d.resize(2 << 20)  # type: ignore[attr-defined]
    assert crashed.read_bytes() == before
    with pytest.raises(diskimg.UsageError, match="'b0' is inconsistent"):
        diskimg.amend(crashed, {"size": str(2 << 20), "lazy_refcounts": "on"})
    assert crashed.read_bytes() == before
    want = QEMU.img("resize", crashed, "2M", ok=(1,)).stderr
    assert "Bitmap 'b0' is inconsistent and cannot be used" in want


def test_amend_size_resizes_bitmaps_like_qemu(tmp_path: Path, bitmaps_image: Path) -> None:
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copyfile(bitmaps_image, theirs)
    shutil.copyfile(bitmaps_image, ours)
    QEMU.img("amend", "-o", "size=7M", theirs)
    diskimg.amend(ours, {"size": str(7 << 20)})
    QEMU.check_clean(ours)
    assert QEMU.info(ours)["format-specific"] == QEMU.info(theirs)["format-specific"]
    with diskimg.open(ours) as d:
        assert d.size == 7 << 20
        for name in ("b", "c", "f"):
            assert list(d.dirty_extents(name)) == QEMU.dirty_map(theirs, name)
