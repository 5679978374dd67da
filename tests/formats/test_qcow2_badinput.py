"""Malformed qcow2 headers and tables end in a DiskImgError naming the field and offset:
no traceback, no huge allocation, no hang (MALICIOUS-INPUTS.md Q1-Q21)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import DiskImgError, FormatError


def fresh(tmp_path: Path, **opts: object) -> Path:
    p = tmp_path / "img.qcow2"
    diskimg.create(p, "qcow2", 4 << 20, options=dict(opts))
    with diskimg.open(p, "r+") as d:
        d.write(0, b"\x11" * 70000)
    return p


def patch(p: Path, offset: int, fmt: str, value: int) -> None:
    with p.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


CASES = [
    # (field offset, struct format, value, words expected in the message)
    (4, ">I", 1, "'qcow'"),
    (4, ">I", 0xFFFFFFFF, "version"),
    (20, ">I", 8, "cluster_bits"),
    (20, ">I", 255, "cluster_bits"),
    (24, ">Q", 1 << 63, "size"),
    (36, ">I", 0x7FFFFFFF, "l1_size"),
    (36, ">I", 0, "l1_size"),
    (40, ">Q", 1 << 40, "L1 table"),
    (40, ">Q", 65536 + 8, "l1_table_offset"),
    (48, ">Q", 0, "reference count table offset"),
    (56, ">I", 0, "refcount_table_clusters"),
    (56, ">I", 0xFFFFFFFF, "refcount_table_clusters"),
    (60, ">I", 10**9, "nb_snapshots"),
    (72, ">Q", 1 << 40, "incompatible"),
    (96, ">I", 7, "refcount_order"),
    (100, ">I", 0xFFFFFFFF, "header_length"),
    (32, ">I", 3, "crypt_method"),
    (32, ">I", 2, "crypt_method 2"),
    (16, ">I", 0xFFFFFFFF, "backing_file"),
]


@pytest.mark.parametrize(("off", "fmt", "value", "words"), CASES,
                         ids=[f"{c[0]}={c[2]:#x}" for c in CASES])
def test_bad_header_field_is_a_clean_error(tmp_path: Path, off: int, fmt: str, value: int,
                                           words: str) -> None:
    p = fresh(tmp_path)
    if off == 16:
        patch(p, 8, ">Q", 0x200)  # backing name offset inside cluster 0, huge length
    patch(p, off, fmt, value)
    with pytest.raises(DiskImgError) as ei:
        with diskimg.open(p) as d:
            d.read(0, d.size)
    # the message names the field, or it is qemu's own words and the error's ``field``
    # and ``offset`` name it
    e = ei.value
    assert words.lower() in str(e).lower() or (
        e.field == words and getattr(e, "offset", None) == off)


@pytest.mark.parametrize("length", [4, 48, 71, 100, 104, 512, 65536, 200000])
def test_truncated_image(tmp_path: Path, length: int) -> None:
    p = fresh(tmp_path)
    data = p.read_bytes()[:length]
    p.write_bytes(data)
    try:
        with diskimg.open(p, format="qcow2") as d:
            d.read(0, d.size)
    except DiskImgError as e:
        assert str(e)
    # a prefix long enough to hold all metadata reads as before or fails cleanly: both fine


def test_l2_entry_unaligned_names_table_and_entry(tmp_path: Path) -> None:
    p = fresh(tmp_path)
    raw = p.read_bytes()
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    patch(p, l2_off, ">Q", (1 << 63) | 0x50200)
    with pytest.raises(FormatError) as ei, diskimg.open(p) as d:
        d.read(0, 512)
    assert f"{l2_off:#x}" in str(ei.value) and "unaligned" in str(ei.value)


def test_l1_entry_past_eof(tmp_path: Path) -> None:
    p = fresh(tmp_path)
    l1_off = struct.unpack_from(">Q", p.read_bytes(), 40)[0]
    patch(p, l1_off, ">Q", (1 << 63) | (1 << 40))
    with pytest.raises(FormatError) as ei, diskimg.open(p) as d:
        d.read(0, 512)
    assert "L2 table" in str(ei.value) and "past the end" in str(ei.value)


def test_garbage_compressed_cluster(tmp_path: Path) -> None:
    p = fresh(tmp_path)
    l1_off = struct.unpack_from(">Q", p.read_bytes(), 40)[0]
    l2_off = struct.unpack_from(">Q", p.read_bytes(), l1_off)[0] & 0x00FFFFFFFFFFFE00
    # compressed descriptor pointing at the header bytes (not deflate data)
    patch(p, l2_off, ">Q", (1 << 62) | 0x0)
    with pytest.raises(FormatError) as ei, diskimg.open(p) as d:
        d.read(0, 512)
    assert "Compressed cluster at host offset 0x0" in str(ei.value)


def test_self_referencing_backing_file_is_a_loop_error(tmp_path: Path) -> None:
    p = tmp_path / "loop.qcow2"
    diskimg.create(p, "qcow2", 1 << 20, backing_file="loop.qcow2", backing_fmt="qcow2",
                   unsafe=True)
    with pytest.raises(diskimg.BackingChainError, match="loop"):
        diskimg.open(p)


def test_json_backing_name_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "j.qcow2"
    name = 'json:{"driver":"raw","file":{"filename":"/etc/passwd"}}'
    diskimg.create(p, "qcow2", 1 << 20, backing_file=name, backing_fmt="raw", unsafe=True)
    with pytest.raises(diskimg.BackingChainError, match="json:"):
        diskimg.open(p)
    with diskimg.open(p, backing=False) as d:
        assert d.info().backing_filename == name


def test_untrusted_refuses_backing_outside_directory(tmp_path: Path) -> None:
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"s" * 4096)
    sub = tmp_path / "upload"
    sub.mkdir()
    p = sub / "u.qcow2"
    diskimg.create(p, "qcow2", 4096, backing_file="../secret.raw", backing_fmt="raw")
    with diskimg.open(p) as d:  # trusted: qemu-img semantics, relative to the image
        assert d.read(0, 4) == b"ssss"
    with pytest.raises(diskimg.BackingChainError, match="secret.raw"):
        diskimg.open(p, untrusted=True)


def test_deep_chain_is_capped(tmp_path: Path) -> None:
    prev = tmp_path / "c0.qcow2"
    diskimg.create(prev, "qcow2", 65536)
    for i in range(1, 6):
        cur = tmp_path / f"c{i}.qcow2"
        diskimg.create(cur, "qcow2", 65536, backing_file=prev.name, backing_fmt="qcow2")
        prev = cur
    pol = diskimg.OpenPolicy(max_depth=3)
    with pytest.raises(diskimg.BackingChainError, match="deeper than 3"):
        diskimg.open(prev, policy=pol)
    with diskimg.open(prev) as d:
        assert len(d.chain()) == 6


def test_refcount_table_past_eof_reads_but_refuses_writes_and_check_reports(
        tmp_path: Path) -> None:
    """qemu opens such an image for reading and lets check report it; writes need the
    refcount table, so they fail cleanly naming it."""
    p = fresh(tmp_path)
    patch(p, 48, ">Q", 1 << 40)
    with diskimg.open(p) as d:
        assert d.read(0, 4) == b"\x11" * 4
        res = d.check()
        assert res.exit_code == 2 and res.corruptions > 0
    with pytest.raises(FormatError) as ei:
        with diskimg.open(p, "r+") as d:
            d.write(1 << 20, b"x")
    assert "refcount table" in str(ei.value).lower()


def test_inconsistency_found_while_writing_sets_the_corrupt_bit(tmp_path: Path) -> None:
    """Like qemu: metadata found inconsistent during a write marks the image corrupt
    (incompatible bit 1), refuses further writes, and read-write opens fail afterwards."""
    p = fresh(tmp_path)
    raw = p.read_bytes()
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    patch(p, l2_off, ">Q", (1 << 63) | 0x50200)  # unaligned data cluster offset
    with diskimg.open(p, "r+") as d:
        with pytest.raises(diskimg.CorruptImageError, match="unaligned"):
            d.write(0, b"x" * 512)
        with pytest.raises(diskimg.UsageError, match="read-only"):
            d.write(1 << 20, b"y")
    incompat = struct.unpack_from(">Q", p.read_bytes(), 72)[0]
    assert incompat & 2
    with diskimg.open(p) as d:
        assert d.info().to_json()["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(diskimg.CorruptImageError, match="corrupt"):
        diskimg.open(p, "r+")
