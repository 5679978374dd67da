"""Parse/pack round trips of every qcow2 on-disk record, on bytes qemu-img wrote (the L2
entry classifier and compressed descriptors: tests/unit/test_qcow2_entries.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemukit import QEMU

from diskimg.qcow2.layout import (
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    Extension,
    Header,
    parse_feature_table,
)
from diskimg.qcow2.refcount import RefBlock

QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.qemu
@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img absent")
@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "cluster_size=512",
                                  "lazy_refcounts=on,refcount_bits=1",
                                  "compression_type=zstd,extended_l2=on"])
@pytest.mark.parametrize("backing", [False, True])
def test_header_round_trip_on_qemu_images(tmp_path: Path, opts: str, backing: bool) -> None:
    img = tmp_path / "h.qcow2"
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        (tmp_path / "base.raw").write_bytes(b"\0" * 512)
        args += ["-b", "base.raw", "-F", "raw"]
    QEMU.img(*args, img, "1M")
    raw = img.read_bytes()
    h = Header.parse(raw[: Header.cluster_size_of(raw)], len(raw))
    packed = h.pack()
    assert raw[: len(packed)] == packed
    assert raw[len(packed) : h.cluster_size].count(0) == h.cluster_size - len(packed)
    if backing:
        assert (h.backing_file, h.backing_format) == ("base.raw", "raw")
    if h.version == 3 and h.cluster_size >= 8192:
        names = parse_feature_table(h.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE).data)  # type: ignore[union-attr]
        assert names[(0, 0)] == "dirty bit" and names[(2, 1)] == "raw external data"


def test_unknown_extensions_are_preserved() -> None:
    h = Header(version=3, cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=3 << 16,
               refcount_table_offset=1 << 16, refcount_table_clusters=1)
    h.extensions.append(Extension(0x12345678, b"opaque data"))
    h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2")
    h.backing_file = "base.qcow2"
    again = Header.parse(h.pack().ljust(1 << 16, b"\0"))
    assert again.ext(0x12345678) == Extension(0x12345678, b"opaque data")
    assert [e.type for e in again.extensions] == [QCOW2_EXT_MAGIC_BACKING_FORMAT, 0x12345678]
    assert again.pack() == h.pack()


@pytest.mark.parametrize("order", range(7))
@given(raw=st.binary(min_size=512, max_size=512))
def test_refblock_round_trip_every_width(order: int, raw: bytes) -> None:
    """Reading every entry of a block and writing them into an empty one gives the same
    bytes back, for refcount widths 1..64 bits."""
    blk = RefBlock(order, raw)
    n = 512 * 8 >> order
    copy = RefBlock(order, bytes(512))
    for i in range(n):
        copy[i] = blk[i]
    assert copy.pack() == raw
    assert blk.pack() == raw


def test_sub_byte_refcounts_are_lsb_first() -> None:
    """qcow2.txt: for widths below 8 bits, entry 0 is in the least significant bits."""
    blk = RefBlock(0, bytes(512))
    blk[0] = 1
    blk[9] = 1
    assert blk.pack()[:2] == b"\x01\x02"
    blk4 = RefBlock(2, bytes(512))
    blk4[1] = 0xA
    assert blk4.pack()[0] == 0xA0


# --- snapshot table and bitmap directory records on tables qemu wrote -------------------
def _qemu_image(tmp_path: Path, opts: str) -> Path:
    img = tmp_path / "t.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", opts, img, "4M")
    return img


@pytest.mark.qemu
@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img absent")
@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "compat=1.1,cluster_size=512"])
def test_snapshot_records_round_trip_on_qemu_tables(tmp_path: Path, opts: str) -> None:
    from diskimg.qcow2.snapshot import EntryHeader, pack_table_exact, parse_table

    img = _qemu_image(tmp_path, opts)
    names = ["a", "a much longer snapshot name", "z" * 9]
    for n in names:
        QEMU.img("snapshot", "-c", n, img)
    raw = img.read_bytes()
    h = Header.parse(raw[: Header.cluster_size_of(raw)], len(raw))
    assert h.nb_snapshots == len(names)
    table = raw[h.snapshots_offset:]
    snaps = parse_table(table, h.nb_snapshots, h.snapshots_offset)
    assert [s.name for s in snaps] == names
    packed = pack_table_exact(snaps)
    assert packed == table[: len(packed)]  # parse -> pack is byte-identical
    pos = 0
    for sn in snaps:  # the fixed part of each entry, through the one record
        eh = EntryHeader.parse(table[pos:pos + EntryHeader.SIZE])
        assert eh.pack() == table[pos:pos + EntryHeader.SIZE]
        assert (eh.l1_table_offset, eh.l1_size) == (sn.l1_table_offset, sn.l1_size)
        assert eh.extra_data_size == sn.extra_data_size == 24  # qemu writes 24 (v2 too)
        pos += len(sn.pack())


@pytest.mark.qemu
@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img absent")
def test_bitmap_records_round_trip_on_qemu_directory(tmp_path: Path) -> None:
    from diskimg.qcow2.bitmaps import BitmapEntry, BitmapsExt
    from diskimg.qcow2.layout import QCOW2_EXT_MAGIC_BITMAPS

    img = _qemu_image(tmp_path, "compat=1.1")
    names = ["b0", "a-longer-bitmap-name", "x" * 17]
    for i, n in enumerate(names):
        QEMU.img("bitmap", "--add", "-g", str(65536 << i), img, n)
    QEMU.img("bitmap", "--disable", img, names[1])
    raw = img.read_bytes()
    h = Header.parse(raw[: Header.cluster_size_of(raw)], len(raw))
    ext = h.ext(QCOW2_EXT_MAGIC_BITMAPS)
    assert ext is not None
    bx = BitmapsExt.of(h)
    assert bx is not None and bx.pack() == ext.data
    assert bx.nb_bitmaps == 3
    d = raw[bx.directory_offset: bx.directory_offset + bx.directory_size]
    pos, entries = 0, []
    for _ in range(bx.nb_bitmaps):
        e, n = BitmapEntry.parse(d, pos, bx.directory_offset)
        assert e.pack() == d[pos:pos + n]
        entries.append(e)
        pos += n
    assert pos == bx.directory_size
    assert b"".join(e.pack() for e in entries) == d
    assert [(e.name, 1 << e.granularity_bits) for e in entries] == [
        (n, 65536 << i) for i, n in enumerate(names)]
    assert [bool(e.flags & 2) for e in entries] == [True, False, True]  # BME_FLAG_AUTO
