"""raw images: data access, zeroing/discard with real holes, resize, preallocation modes,
and qemu's probed-raw safety rule."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import UsageError

KiB = 1 << 10
MiB = 1 << 20


def _blocks(p: Path) -> int:
    return os.stat(p).st_blocks * 512


@pytest.fixture
def img_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    diskimg.create(p, "raw", 4 * MiB)
    return p


def test_create_makes_a_sparse_file_of_the_exact_size(img_path: Path) -> None:
    assert img_path.stat().st_size == 4 * MiB
    assert _blocks(img_path) == 4096  # like qemu-img create: the first block is allocated
    with diskimg.open(img_path) as img:
        assert (img.format, img.size, img.read_only) == ("raw", 4 * MiB, True)
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)


def test_write_read_roundtrip_at_unaligned_offsets(img_path: Path) -> None:
    data = os.urandom(10_000)
    with diskimg.open(img_path, "r+") as img:
        img.write(12_345, data)
        img.write(4 * MiB - 7, b"tail!!!")
        assert img.read(12_345, 10_000) == data
        assert img.read(12_340, 5) == bytes(5)
    raw = img_path.read_bytes()
    assert raw[12_345:22_345] == data  # raw means the host file holds the guest bytes
    assert raw[-7:] == b"tail!!!"
    assert len(raw) == 4 * MiB


def test_fixture_contents(fixture_file) -> None:
    p = fixture_file("example.raw")
    with diskimg.open(p) as img:
        assert img.size == 4 * MiB
        assert img.read(0, 4 * KiB) == b"\xa5" * 4 * KiB
        assert img.read(MiB, 64 * KiB) == b"\x5a" * 64 * KiB
        assert img.read(2 * MiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(4 * MiB - 4 * KiB, 4 * KiB) == b"\xff" * 4 * KiB


def test_size_rounds_up_to_a_sector_and_tail_reads_zero(tmp_path: Path) -> None:
    p = tmp_path / "odd.raw"
    p.write_bytes(b"x" * 1000)
    with diskimg.open(p) as img:
        assert img.size == 1024  # qemu's rule: file size rounded up to 512
        assert img.read(0, 1024) == b"x" * 1000 + bytes(24)
        assert img.info().virtual_size == 1024


@pytest.mark.parametrize("may_unmap", [False, True])
def test_write_zeroes_reads_zeros(img_path: Path, may_unmap: bool) -> None:
    with diskimg.open(img_path, "r+") as img:
        img.write(0, b"\x77" * MiB)
        img.write_zeroes(64 * KiB, 128 * KiB, may_unmap=may_unmap)
        assert img.read(0, 64 * KiB) == b"\x77" * 64 * KiB
        assert img.read(64 * KiB, 128 * KiB) == bytes(128 * KiB)
        assert img.read(192 * KiB, 64 * KiB) == b"\x77" * 64 * KiB


def test_write_zeroes_with_unmap_frees_space_and_discard_too(img_path: Path) -> None:
    with diskimg.open(img_path, "r+") as img:
        img.write(0, os.urandom(2 * MiB))
        img.flush()
        full = _blocks(img_path)
        img.write_zeroes(0, MiB, may_unmap=True)
        after_zero = _blocks(img_path)
        img.discard(MiB, MiB)
        after_discard = _blocks(img_path)
        assert img.read(0, 2 * MiB) == bytes(2 * MiB)  # raw: discarded ranges read zeros
    assert full - after_zero >= MiB - 8 * KiB
    assert after_zero - after_discard >= MiB - 8 * KiB
    assert img_path.stat().st_size == 4 * MiB


def test_map_reports_data_and_holes(img_path: Path) -> None:
    with diskimg.open(img_path, "r+") as img:
        img.write(MiB, b"d" * 64 * KiB)
        entries = list(img.map())
    assert sum(e.length for e in entries) == 4 * MiB
    data = [(e.start, e.length) for e in entries if e.data]
    assert data == [(0, 4 * KiB), (MiB, 64 * KiB)]  # first block allocated, as qemu-img
    for e in entries:
        assert e.present and e.depth == 0 and e.zero == (not e.data)
        assert e.offset == e.start  # raw: host offset == guest offset


def test_resize_grow_and_shrink(img_path: Path) -> None:
    with diskimg.open(img_path, "r+") as img:
        img.write(0, b"keep")
        img.write(3 * MiB, b"lost")
        img.resize(8 * MiB)
        assert img.size == 8 * MiB
        assert img.read(8 * MiB - 512, 512) == bytes(512)
        img.write(8 * MiB - 4, b"last")
        img.resize(2 * MiB)
        assert img.size == 2 * MiB
        with pytest.raises(UsageError):
            img.read(3 * MiB, 4)
        img.resize(4 * MiB)
        assert img.read(3 * MiB, 4) == bytes(4)  # shrinking really dropped the data
        assert img.read(0, 4) == b"keep"
    assert img_path.stat().st_size == 4 * MiB


def test_resize_is_refused_on_a_read_only_image(img_path: Path) -> None:
    with diskimg.open(img_path) as img, pytest.raises(UsageError):
        img.resize(8 * MiB)  # type: ignore[attr-defined]
    assert img_path.stat().st_size == 4 * MiB


@pytest.mark.parametrize(
    ("mode", "allocated"),
    [("off", False), ("falloc", True), ("full", True)],
)
def test_create_preallocation(tmp_path: Path, mode: str, allocated: bool) -> None:
    p = tmp_path / f"{mode}.raw"
    diskimg.create(p, "raw", 2 * MiB, options={"preallocation": mode})
    assert p.stat().st_size == 2 * MiB
    assert (_blocks(p) >= 2 * MiB) is allocated
    assert p.read_bytes() == bytes(2 * MiB)


@pytest.mark.parametrize(("mode", "min_alloc"), [("off", 0), ("falloc", MiB), ("full", MiB)])
def test_resize_preallocation(img_path: Path, mode: str, min_alloc: int) -> None:
    before = _blocks(img_path)
    with diskimg.open(img_path, "r+") as img:
        img.resize(5 * MiB, preallocation=mode)
        assert img.read(4 * MiB, MiB) == bytes(MiB)
    grown = _blocks(img_path) - before
    assert grown >= min_alloc
    if mode == "off":
        assert grown == 0


def test_create_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        diskimg.create(tmp_path / "a.raw", "raw", MiB, options={"preallocation": "metadata"})
    with pytest.raises(UsageError, match="cluster_size"):
        diskimg.create(tmp_path / "b.raw", "raw", MiB, options={"cluster_size": "64k"})
    (tmp_path / "base.raw").write_bytes(bytes(512))
    with pytest.raises(UsageError):
        diskimg.create(tmp_path / "c.raw", "raw", MiB, backing_file="base.raw",
                       backing_fmt="raw")


def test_read_only_open_refuses_every_mutation(img_path: Path) -> None:
    with diskimg.open(img_path) as img:
        for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                     lambda: img.discard(0, 512)):
            with pytest.raises(UsageError, match="read-only"):
                call()
    assert _blocks(img_path) == 4096  # like qemu-img create: the first block is allocated


# --- probed raw: qemu refuses writes that would change how the image probes ----------------

QCOW2_HEAD = b"QFI\xfb" + struct.pack(">I", 3)


def test_probed_raw_refuses_writing_a_qcow2_magic_to_sector_0(img_path: Path) -> None:
    with diskimg.open(img_path, "r+") as img:  # format probed
        with pytest.raises(UsageError, match="probed raw"):
            img.write(0, QCOW2_HEAD)
        with pytest.raises(UsageError):
            img.write(0, b"KDMV" + bytes(508))  # vmdk magic
        with pytest.raises(UsageError):  # building the magic piecewise is caught too
            img.write(0, b"QFI\xfb")
            img.write(4, struct.pack(">I", 3))
        img.write(512, QCOW2_HEAD)  # other sectors are fine
        img.write(0, b"MBR!")  # harmless sector-0 writes are fine
    assert img_path.read_bytes()[:8] != QCOW2_HEAD
    with diskimg.open(img_path) as img:
        assert img.format == "raw"


def test_probed_raw_refuses_zeroing_that_would_reveal_a_magic(tmp_path: Path) -> None:
    p = tmp_path / "mbr.raw"
    p.write_bytes(b"\x00" * 512 + bytes(MiB))
    with diskimg.open(p, "r+", format="raw") as img:
        img.write(0, b"X" + QCOW2_HEAD[1:])  # explicit raw: anything goes
    with diskimg.open(p, "r+") as img:
        with pytest.raises(UsageError):
            img.write(0, b"Q")  # would complete the qcow2 magic
        img.write_zeroes(0, 512)  # zeroing sector 0 yields a raw-looking sector: allowed
        assert img.read(0, 8) == bytes(8)


def test_explicit_format_raw_allows_writing_a_magic(img_path: Path) -> None:
    with diskimg.open(img_path, "r+", format="raw") as img:
        img.write(0, QCOW2_HEAD)
    assert img_path.read_bytes()[:8] == QCOW2_HEAD


def test_info_of_a_raw_image(img_path: Path) -> None:
    with diskimg.open(img_path, "r+") as img:
        img.write(0, b"a" * 64 * KiB)
        img.flush()
        info = img.info()
    assert info.format == "raw" and info.virtual_size == 4 * MiB
    assert info.actual_size == _blocks(img_path)
    assert info.cluster_size is None
    j = info.to_json()
    assert j["format"] == "raw" and "cluster-size" not in j and j["dirty-flag"] is False


@pytest.mark.qemu
@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
@pytest.mark.parametrize("size", [1, 1000, 4097])
def test_create_rounds_the_file_up_to_a_sector_as_qemu(tmp_path: Path, make_image,
                                                       prealloc: str, size: int) -> None:
    ours = make_image("ours.raw", "raw", size, tool="diskimg",
                      options={"preallocation": prealloc})
    theirs = make_image("theirs.raw", "raw", size, options={"preallocation": prealloc})
    assert ours.stat().st_size == theirs.stat().st_size == -(-size // 512) * 512
    assert ours.read_bytes() == theirs.read_bytes()
