"""The snapshot table records (``EntryHeader``, ``Snapshot``; qcow2/snapshot.py, moving to
qcow2/snapshot_table.py and re-exported here): parse(pack(x)) == x for any entry, and
pack(parse(b)) == b for any fixed part.  Tables qemu wrote: tests/formats/test_qcow2_records.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from diskimg.qcow2.snapshot import EntryHeader, Snapshot

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
