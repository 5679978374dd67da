"""The snapshot table records (``EntryHeader``, ``Snapshot``; qcow2/snapshot.py, moving to
qcow2/snapshot_table.py and re-exported here): parse(pack(x)) == x for any entry, and
pack(parse(b)) == b for any fixed part.  Tables qemu wrote: tests/formats/test_qcow2_records.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskimg.errors import FormatError
from diskimg.qcow2.snapshot import QCOW_MAX_SNAPSHOTS_SIZE, EntryHeader, Snapshot
from diskimg.qcow2.snapshot_table import TableWalk

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
TABLE_AT = 0x30000


@given(raw=st.binary(min_size=EntryHeader.SIZE, max_size=EntryHeader.SIZE))
def test_entry_header_pack_of_parse_is_the_bytes(raw: bytes) -> None:
    eh = EntryHeader.parse(raw)
    assert eh.pack() == raw
    assert EntryHeader.parse(eh.pack()) == eh


# id and name: any bytes but NUL (C strings); non-UTF-8 bytes must survive too
_names = st.binary(min_size=0, max_size=40).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    eds = draw(st.sampled_from([0, 8, 16, 24]) | st.integers(25, 1024))
    return Snapshot(
        id=draw(_names), name=draw(_names),
        l1_table_offset=draw(st.integers(0, U64)), l1_size=draw(st.integers(0, 1 << 20)),
        date_sec=draw(st.integers(0, U32)), date_nsec=draw(st.integers(0, U32)),
        vm_clock_nsec=draw(st.integers(0, U64)),
        vm_state_size=draw(st.integers(0, U64 if eds >= 8 else U32)),
        disk_size=draw(st.integers(0, U64)) if eds >= 16 else None,
        icount=draw(st.none() | st.integers(0, U64 - 1)) if eds >= 24 else None,
        extra_data_size=eds,
        extra=draw(st.binary(min_size=eds - 24, max_size=eds - 24)) if eds > 24 else b"")


@given(sn=snapshots())
def test_snapshot_parse_of_pack_is_the_snapshot(sn: Snapshot) -> None:
    raw = sn.pack()
    assert len(raw) % 8 == 0
    back, length = Snapshot.parse(raw, 0, TABLE_AT)
    assert length == len(raw)
    assert back == sn
    assert back.pack() == raw
    eh = EntryHeader.parse(raw[: EntryHeader.SIZE])
    assert (eh.l1_table_offset, eh.l1_size, eh.extra_data_size) == \
        (sn.l1_table_offset, sn.l1_size, sn.extra_data_size)


@given(first=snapshots(), second=snapshots())
def test_two_entries_back_to_back_parse_at_their_offsets(first: Snapshot,
                                                         second: Snapshot) -> None:
    raw = first.pack() + second.pack()
    a, n = Snapshot.parse(raw, 0, TABLE_AT)
    b, m = Snapshot.parse(raw, n, TABLE_AT)
    assert (a, b, n + m) == (first, second, len(raw))


def _walk(sizes: list[tuple[int, int, int]], repair: bool = False) -> TableWalk:
    """TableWalk over entries of (extra data, id, name) sizes, fixed parts only."""
    fixed, pos = {}, 0
    for extra, id_len, name_len in sizes:
        pos = (pos + 7) & ~7
        fixed[pos] = EntryHeader(0, 0, id_len, name_len, 0, 0, 0, 0, extra).pack()
        pos += EntryHeader.SIZE + extra + id_len + name_len
    return TableWalk(lambda p: fixed.get(p, bytes(EntryHeader.SIZE)), len(sizes), TABLE_AT,
                     repair)


BIG = (1024, 65535, 65535)  # 132134 bytes, 132136 with padding


def test_table_walk_takes_exactly_64_mib_and_refuses_one_byte_more() -> None:
    last = QCOW_MAX_SNAPSHOTS_SIZE - 507 * 132136 - EntryHeader.SIZE - 65535
    walk = _walk([BIG] * 507 + [(0, 65535, last)])
    assert (len(walk.places), walk.discarded, walk.size) == (508, 0, QCOW_MAX_SNAPSHOTS_SIZE)
    with pytest.raises(FormatError, match="^Snapshot table is too big\nYou can force-remove "
                       "all 1 overhanging snapshots with diskimg check -r all$"):
        _walk([BIG] * 507 + [(0, 65535, last + 1)])
    walk = _walk([BIG] * 507 + [(0, 65535, last + 1), BIG], repair=True)
    assert (len(walk.places), walk.discarded) == (507, 2)


def test_table_walk_counts_cut_extra_data_as_kept() -> None:
    """A repair counts an entry's extra data as the 1024 bytes it keeps: 2000 bytes of
    extra data in each entry do not push the table over 64 MiB."""
    with pytest.raises(FormatError, match="^Too much extra metadata in snapshot table "
                       "entry 0\nYou can force-remove this extra metadata with diskimg "
                       "check -r all$") as exc:
        _walk([(2000, 1, 0)])
    assert (exc.value.field, exc.value.offset) == ("extra_data_size", TABLE_AT + 36)
    walk = _walk([(2000, 65535, 65535)] * 508, repair=True)
    assert len(walk.places) == 507 and walk.discarded == 1
    assert [p.index for p in walk.cut] == list(range(508))
    assert all(p.extra_len == 1024 for p in walk.places)
    assert walk.size == 506 * (40 + 2000 + 131070 + 2) + 40 + 2000 + 131070
