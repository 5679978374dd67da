"""The bitmap table and data codec of qcow2/bitmap_table.py: table entries round-trip and
bad ones are refused naming their offset; bit arrays <-> dirty extents agree with a
byte-by-byte model; merging across granularities; store/load through a real image."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import diskimg
from diskimg.qcow2 import bitmap_table as BT


def _model_extents(bits: bytes, gbits: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(len(bits) * 8):
        if bits[i >> 3] >> (i & 7) & 1 and (i << gbits) < size:
            off, end = i << gbits, min((i + 1) << gbits, size)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((off, end - off))
    return out


@given(bits=st.binary(max_size=1200), gbits=st.integers(9, 20), cut=st.integers(0, 1 << 14))
def test_extents_match_a_bit_by_bit_model(bits: bytes, gbits: int, cut: int) -> None:
    size = max(1, len(bits) * 8 * (1 << gbits) - cut)
    assert list(BT.extents(bits, gbits, size)) == _model_extents(bits, gbits, size)


@given(size=st.integers(1, 1 << 24), gbits=st.integers(9, 16),
       ranges=st.lists(st.tuples(st.integers(0, (1 << 24) - 1), st.integers(1, 1 << 20)),
                       max_size=8))
def test_set_range_then_extents_cover_exactly_the_granules(
        size: int, gbits: int, ranges: list[tuple[int, int]]) -> None:
    bits = BT.empty(size, gbits)
    want = bytearray(len(bits))
    for off, n in ranges:
        if off >= size:
            continue
        n = min(n, size - off)
        BT.set_range(bits, gbits, off, n)
        for b in range(off >> gbits, ((off + n - 1) >> gbits) + 1):
            want[b >> 3] |= 1 << (b & 7)
    assert bits == want
    assert list(BT.extents(bits, gbits, size)) == _model_extents(bytes(want), gbits, size)


@given(size=st.integers(1, 1 << 22), g1=st.integers(9, 16), g2=st.integers(9, 16),
       data=st.data())
def test_merge_across_granularities_covers_every_dirty_byte(size: int, g1: int, g2: int,
                                                            data: st.DataObject) -> None:
    src = BT.empty(size, g1)
    src[:] = data.draw(st.binary(min_size=len(src), max_size=len(src)))
    dst = BT.empty(size, g2)
    BT.merge_into(dst, g2, src, g1, size)
    got = list(BT.extents(dst, g2, size))
    for off, n in BT.extents(src, g1, size):
        first = off >> g2 << g2
        end = min(-(-(off + n) >> g2) << g2, size)
        assert any(o <= first and end <= o + m for o, m in got)


@given(entries=st.lists(st.one_of(st.just(0), st.just(1),
                                  st.integers(1, (1 << 38) - 1).map(lambda c: c << 16)),
                        max_size=40))
def test_table_round_trip(entries: list[int]) -> None:
    raw = BT.encode_table(entries)
    assert BT.decode_table(raw, 65536, 0x50000) == entries


@pytest.mark.parametrize("bad", [0x2, 1 << 63, (1 << 16) | 1, 0x10200])
def test_bad_table_entry_is_refused_with_its_offset(bad: int) -> None:
    raw = BT.encode_table([0, 0, bad])
    with pytest.raises(diskimg.FormatError, match="0x50010") as ei:
        BT.decode_table(raw, 65536, 0x50000)
    assert ei.value.offset == 0x50010


def test_table_size_is_one_entry_per_data_cluster() -> None:
    assert BT.table_size(1 << 30, 16, 65536) == 1  # 16384 bits
    assert BT.table_size((1 << 40), 9, 512) == (1 << 31) // 4096
    assert BT.nb_bits(65537, 16) == 2


def test_store_then_load_through_an_image(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 200 << 20, options={"cluster_size": 4096})
    with diskimg.open(p, "r+") as d:
        d.bitmaps.add("b", 512)  # 409600 bits: 13 data clusters of 4 KiB
        d.write(0, b"x")
        d.write(100 << 20, b"y" * 70000)
        d.write((200 << 20) - 1, b"z")
        want = [(0, 512), (100 << 20, 70144), ((200 << 20) - 512, 512)]
        assert list(d.dirty_extents("b")) == want
    with diskimg.open(p) as d:
        e = d.bitmaps.list()[0]
        table = BT.read_table(d, e)  # type: ignore[arg-type]
        assert len(table) == 13 and sum(1 for t in table if t) == 3  # zeros left out
        assert list(d.dirty_extents("b")) == want


def test_hostile_granularity_refused_before_a_write_sizes_a_bit_array(tmp_path: Path) -> None:
    p = tmp_path / "h.qcow2"
    diskimg.create(p, "qcow2", 1 << 40)
    with diskimg.open(p, "r+") as d:
        d.bitmaps.add("b")
        at = d.bitmaps.dir_offset  # type: ignore[attr-defined]
    with open(p, "r+b") as f:
        f.seek(at + 17)  # the entry's granularity_bits (docs/interop/qcow2.txt)
        f.write(b"\0")   # one bit per byte of a 1 TiB disk
    before = p.read_bytes()
    with diskimg.open(p, "r+") as d, \
            pytest.raises(diskimg.FormatError, match="invalid granularity bits 0") as ei:
        d.write(0, b"x")
    assert ei.value.offset is not None
    assert p.read_bytes() == before
