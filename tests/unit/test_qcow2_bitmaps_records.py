"""The bitmap directory records of qcow2/bitmaps.py (``BitmapsExt``, ``BitmapEntry``):
parse(pack(x)) == x for any record and pack(parse(b)) == b for any extension bytes.  The
directory qemu wrote: tests/formats/test_qcow2_records.py."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from diskimg.qcow2.bitmaps import BITMAP_DIR_ENTRY_SIZE, BitmapEntry, BitmapsExt

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
DIR_AT = 0x40000


@given(raw=st.binary(min_size=BitmapsExt.SIZE, max_size=BitmapsExt.SIZE))
def test_bitmaps_ext_pack_of_parse_is_the_bytes(raw: bytes) -> None:
    bx = BitmapsExt.parse(raw)
    assert bx is not None and bx.pack() == raw
    assert BitmapsExt.parse(bx.pack()) == bx


def test_bitmaps_ext_too_short_is_none() -> None:
    assert BitmapsExt.parse(bytes(BitmapsExt.SIZE - 1)) is None


_entries = st.builds(
    BitmapEntry, table_offset=st.integers(0, U64), table_size=st.integers(0, U32),
    flags=st.integers(0, 255), type=st.integers(0, 255), granularity_bits=st.integers(0, 255),
    name=st.text(max_size=30),  # at most 120 bytes of UTF-8, below the 1023 limit
    extra=st.binary(max_size=64))


@given(entries=st.lists(_entries, min_size=1, max_size=4))
def test_bitmap_entries_parse_of_pack_are_the_entries(entries: list[BitmapEntry]) -> None:
    d = b"".join(e.pack() for e in entries)
    pos, back = 0, []
    for e in entries:
        got, n = BitmapEntry.parse(d, pos, DIR_AT)
        assert n % 8 == 0 and n == len(e.pack()) >= BITMAP_DIR_ENTRY_SIZE
        back.append(got)
        pos += n
    assert back == entries and pos == len(d)


def test_bitmap_entry_with_a_non_utf8_name_packs_back_to_its_bytes() -> None:
    """A name that is not UTF-8 is read as the text the command line gives for the same
    bytes, and written back as those bytes (a directory rewrite used to store U+FFFD)."""
    e = BitmapEntry(0x50000, 1, 2, 1, 16, "x")
    raw = bytearray(e.pack())
    raw[BITMAP_DIR_ENTRY_SIZE] = 0xFF  # the name's one byte
    got, _ = BitmapEntry.parse(bytes(raw), 0, DIR_AT)
    assert got.name == os.fsdecode(b"\xff")
    assert got.pack() == bytes(raw)


@given(name=st.binary(min_size=1, max_size=64))
def test_any_name_bytes_are_stored_as_given_and_read_back(name: bytes) -> None:
    """The name as the command line gives it (``os.fsdecode`` of its bytes) is stored as
    exactly those bytes, and read back as the same text."""
    packed = BitmapEntry(0x50000, 1, 2, 1, 16, os.fsdecode(name)).pack()
    assert packed[BITMAP_DIR_ENTRY_SIZE : BITMAP_DIR_ENTRY_SIZE + len(name)] == name
    got, n = BitmapEntry.parse(packed, 0, DIR_AT)
    assert got.name == os.fsdecode(name) and got.pack() == packed and n == len(packed)
