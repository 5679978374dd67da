"""qcow2.cache.TableCache: LRU order, dirty tables never dropped unwritten, eviction,
the flush dependency (``before_write``), writes in offset order, drop/clear."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from array import array

import pytest

from diskimg.qcow2 import entries as cache  # (the table codec and cache live there)
from diskimg.qcow2.entries import (
    L2Table,
    TableCache,
    be_table,
    be_u64_array,
    be_u64_table,
    pack_be_table,
    pack_be_u64_array,
    swap_array,
    swap_pure,
    u64_copy,
    u64_run,
    u64_zeros,
)

SIZE = 16  # bytes per table: two big-endian u64 entries


class FakeHost:
    """A bytearray 'host file' recording every read and write, in order."""

    def __init__(self, size: int = 64 * SIZE) -> None:
        self.data = bytearray(size)
        self.log: list[tuple[str, int]] = []

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        self.log.append(("read", offset))
        return bytes(self.data[offset:offset + length])

    def pwrite(self, offset: int, data: bytes) -> None:
        self.log.append(("write", offset))
        self.data[offset:offset + len(data)] = data

    def writes(self) -> list[int]:
        return [off for kind, off in self.log if kind == "write"]

    def reads(self) -> list[int]:
        return [off for kind, off in self.log if kind == "read"]


def _entries(*vals: int) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in vals)


def _cache(host: FakeHost, capacity: int) -> TableCache[L2Table]:
    return TableCache(host, SIZE, lambda b: L2Table(be_u64_table(b)), capacity,  # type: ignore[arg-type]
                      "L2 table")


def _table(*vals: int) -> L2Table:
    return L2Table(memoryview(array("Q", vals)))


def _host_with_tables(n: int) -> FakeHost:
    host = FakeHost()
    for i in range(n):
        host.data[i * SIZE:(i + 1) * SIZE] = _entries(0x1000 * (i + 1), 0x1000 * (i + 1) + 1)
    return host


def test_codec_is_big_endian_both_ways() -> None:
    raw = _entries(0x0102030405060708, 0x8000000000000200)
    a = be_u64_array(raw)
    assert list(a) == [0x0102030405060708, 0x8000000000000200]
    assert pack_be_u64_array(a) == raw
    assert _table(1, 2).pack() == _entries(1, 2)
    t = be_u64_table(raw)
    assert (t.tolist(), t.format, t.readonly) == ([0x0102030405060708, 0x8000000000000200],
                                                  "Q", False)
    assert pack_be_u64_array(t) == raw


#: the table sizes the codecs are compared on: empty, one entry, a 512-byte and a
#: 64 KiB cluster's table (random bytes: every word used)
_SIZES = (0, 8, 512, 65536)


@pytest.mark.parametrize("size", _SIZES)
@pytest.mark.parametrize("word", ["H", "I", "Q"])
def test_both_swaps_decode_as_struct_does(size: int, word: str) -> None:
    """The decode without ``array`` (a small image's map and check) and the one with it
    (after cache.PURE_SWAPS tables) give the same words (u64 table entries, 16- and
    32-bit refcounts), struct's big-endian reading, and pack back to the same bytes."""
    raw = random.Random(size).randbytes(size)
    n = size // struct.calcsize(word)
    want = list(struct.unpack(f">{n}{word}", raw))
    for swap in (swap_pure, swap_array):
        for buf in (raw, bytearray(raw), memoryview(raw)):
            t = swap(buf, word)  # type: ignore[arg-type]
            assert (t.tolist(), t.format, t.readonly) == (want, word, False), swap
    t = be_table(raw, word)  # type: ignore[arg-type]
    assert t.tolist() == want
    assert pack_be_table(t) == raw == pack_be_table(array(word, want))
    if size:
        t[-1] = 0x0102  # writable, and packed back big-endian
        assert pack_be_table(t) == raw[:-t.itemsize] + (0x0102).to_bytes(t.itemsize, "big")
    if word == "Q":
        assert be_u64_table(raw).tolist() == want == list(be_u64_array(raw))
        assert pack_be_u64_array(be_u64_table(raw)) == raw


@pytest.mark.parametrize("word", ["H", "I", "Q"])
@pytest.mark.parametrize("used", [1, 7, 8, 9, 4095])
def test_a_zero_tail_decodes_as_struct_does(word: str, used: int) -> None:
    """be_table swaps only up to the word holding the last non-zero byte: a tail ending
    inside a word, on a word boundary, or one byte short of the end decodes as struct
    reads it, into a writable table of the full length."""
    raw = random.Random(used).randbytes(used)[:-1] + b"\x01" + bytes(4096 - used)
    t = be_table(raw, word)  # type: ignore[arg-type]
    n = 4096 // struct.calcsize(word)
    assert (t.tolist(), t.readonly) == (list(struct.unpack(f">{n}{word}", raw)), False)
    assert pack_be_table(t) == raw


@pytest.mark.parametrize("word", ["H", "I", "Q"])
def test_packing_swaps_only_up_to_the_last_non_zero_word(
        monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    """pack_be_table, like be_table, leaves the zero tail of a table unswapped (a new
    image's L2 tables and refcount blocks hold a few entries in 64 KiB): the bytes are
    struct's, and the swap sees only the words up to the last non-zero one."""
    swapped: list[int] = []
    real = cache._swap
    monkeypatch.setattr(cache, "_swap", lambda b, w: swapped.append(len(b)) or real(b, w))
    size = struct.calcsize(word)
    n = 65536 // size
    for used in (0, 1, 3, n):
        vals = [(i * 0x01020304 + 1) % (1 << 8 * size) for i in range(used)] + [0] * (n - used)
        swapped.clear()
        assert pack_be_table(array(word, vals)) == struct.pack(f">{n}{word}", *vals)
        assert sum(swapped) == used * size, (used, swapped)


def test_byte_words_need_no_swap() -> None:
    raw = bytes(range(200, 256))
    t = be_table(raw, "B")
    assert (t.tolist(), t.readonly, pack_be_table(t)) == (list(raw), False, raw)


def test_big_endian_host_keeps_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a big-endian host a table is the bytes as read, and packs to them unchanged."""
    raw = bytes(range(16))
    monkeypatch.setattr(cache, "HOST_LITTLE_ENDIAN", False)
    t = be_u64_table(raw)
    assert (t.tobytes(), t.format, t.readonly) == (raw, "Q", False)
    assert pack_be_u64_array(t) == raw
    assert be_u64_array(raw).tobytes() == raw == be_table(raw, "H").tobytes()


def test_first_tables_are_decoded_without_array() -> None:
    """A fresh interpreter decodes cache.PURE_SWAP_BYTES of tables without importing
    ``array`` (start-up of map and check), then imports it; a table's zero tail is not
    counted; every table decodes the same."""
    code = ("import sys, struct, random\n"
            "from diskimg.qcow2 import entries as cache\n"
            "raw = random.Random(7).randbytes(4096)\n"
            "want = list(struct.unpack('>512Q', raw))\n"
            "tail = raw[:16] + bytes(65536 - 16)\n"  # two entries, then zeros
            "seen = []\n"
            "for i in range(cache.PURE_SWAP_BYTES // 4096 + 2):\n"
            "    t = cache.be_u64_table(tail)\n"
            "    assert t.tolist() == want[:2] + [0] * 8190 and not t.readonly, i\n"
            "    assert cache.be_u64_table(raw).tolist() == want, i\n"
            "    seen.append('array' in sys.modules)\n"
            "print(cache.PURE_SWAP_BYTES // 4096, seen)\n")
    src = os.path.dirname(os.path.dirname(os.path.dirname(cache.__file__)))
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": src}, check=False)
    assert r.returncode == 0, r.stderr
    n, seen = r.stdout.split(" ", 1)
    if sys.byteorder == "little":
        assert int(n) >= 2 and seen.strip() == str([False] * int(n) + [True, True])


def test_table_helpers() -> None:
    assert u64_run(7, 4, 0x10000).tolist() == [7, 0x10007, 0x20007, 0x30007]
    assert u64_run(5, 3, 0).tolist() == [5, 5, 5]
    assert u64_zeros(3).tolist() == [0, 0, 0]
    src = be_u64_table(_entries(1, 2, 3))
    c = u64_copy(src)
    c[0] = 9  # a copy: the source does not change
    assert (src.tolist(), c.tolist()) == ([1, 2, 3], [9, 2, 3])
    assert u64_copy(array("Q", [4, 5])).tolist() == [4, 5]
    t = u64_zeros(6)
    t[1:4] = u64_run(0x8000000000010000, 3, 0x10000)
    assert t.tolist() == [0, 0x8000000000010000, 0x8000000000020000, 0x8000000000030000, 0, 0]


def test_get_reads_once_then_hits() -> None:
    host = _host_with_tables(3)
    c = _cache(host, 4)
    t = c.get(SIZE)
    assert list(t.entries) == [0x2000, 0x2001]
    assert c.get(SIZE) is t
    assert host.reads() == [SIZE]


def test_capacity_is_at_least_two() -> None:
    assert _cache(FakeHost(), 0).capacity == 2
    assert _cache(FakeHost(), 1).capacity == 2
    assert _cache(FakeHost(), 5).capacity == 5


def test_clean_eviction_drops_least_recently_used() -> None:
    host = _host_with_tables(4)
    c = _cache(host, 3)
    for i in range(3):
        c.get(i * SIZE)
    c.get(0)  # touch table 0: table 1 is now least recently used
    c.get(3 * SIZE)
    assert list(c.tables) == [2 * SIZE, 0, 3 * SIZE]
    assert host.writes() == []  # nothing dirty, nothing written
    host.log.clear()
    c.get(SIZE)  # evicted, so read again; table 2 goes next
    assert host.reads() == [SIZE]
    assert list(c.tables) == [0, 3 * SIZE, SIZE]


def test_clean_tables_go_before_dirty_ones() -> None:
    host = _host_with_tables(4)
    c = _cache(host, 3)
    c.get(0)
    c.mark_dirty(0)  # oldest, but dirty
    c.get(SIZE)
    c.get(2 * SIZE)
    c.get(3 * SIZE)
    # the oldest *clean* table (1) is evicted, dirty table 0 stays and is not written
    assert list(c.tables) == [0, 2 * SIZE, 3 * SIZE]
    assert host.writes() == []
    assert c.dirty == {0}


def test_all_dirty_flushes_in_offset_order_then_evicts_oldest() -> None:
    host = FakeHost()
    c = _cache(host, 2)
    order: list[str] = []
    c.before_write = lambda: order.append("dependency")
    c.put(5 * SIZE, _table(5, 5))
    c.put(2 * SIZE, _table(2, 2))
    c.put(9 * SIZE, _table(9, 9))  # over capacity, everything dirty
    assert order == ["dependency"]
    assert host.writes() == [2 * SIZE, 5 * SIZE]  # sorted by offset, not by age
    assert host.data[5 * SIZE:6 * SIZE] == _entries(5, 5)
    assert host.data[2 * SIZE:3 * SIZE] == _entries(2, 2)
    assert host.data[9 * SIZE:10 * SIZE] == bytes(SIZE)  # the newest is not written...
    assert list(c.tables) == [2 * SIZE, 9 * SIZE]  # ...and never evicted
    # the newest table is marked dirty after the eviction: it stays dirty, unwritten
    assert c.dirty == {9 * SIZE}
    c.flush()
    assert order == ["dependency", "dependency"]
    assert host.writes() == [2 * SIZE, 5 * SIZE, 9 * SIZE]
    assert host.data[9 * SIZE:10 * SIZE] == _entries(9, 9)


def test_newest_entry_survives_eviction() -> None:
    host = FakeHost()
    c = _cache(host, 2)
    c.put(0, _table(1, 1))
    c.put(SIZE, _table(2, 2))
    c.put(2 * SIZE, _table(3, 3), dirty=False)
    assert 2 * SIZE in c.tables
    assert len(c.tables) == 2


def test_flush_runs_dependency_first_and_only_when_dirty() -> None:
    host = _host_with_tables(3)
    c = _cache(host, 8)
    events: list[object] = []
    c.before_write = lambda: events.append(list(host.writes()))
    c.flush()
    assert events == []  # nothing dirty: the dependency is not flushed either
    for off in (2 * SIZE, 0, SIZE):
        c.get(off).entries[0] = 0xABC0 + off
        c.mark_dirty(off)
    c.flush()
    assert events == [[]]  # ran before any table write
    assert host.writes() == [0, SIZE, 2 * SIZE]
    for off in (0, SIZE, 2 * SIZE):
        assert host.data[off:off + 8] == (0xABC0 + off).to_bytes(8, "big")
    c.flush()  # clean now: nothing more
    assert host.writes() == [0, SIZE, 2 * SIZE]
    assert events == [[]]


def test_put_clean_is_not_written() -> None:
    host = FakeHost()
    c = _cache(host, 4)
    c.put(SIZE, _table(7, 7), dirty=False)
    c.flush()
    assert host.writes() == []
    c.put(2 * SIZE, _table(8, 8))
    c.flush()
    assert host.writes() == [2 * SIZE]
    assert host.data == bytes(2 * SIZE) + _entries(8, 8) + bytes(len(host.data) - 3 * SIZE)


def test_drop_forgets_table_and_its_dirtiness() -> None:
    host = _host_with_tables(2)
    c = _cache(host, 4)
    c.get(0).entries[0] = 99
    c.mark_dirty(0)
    c.put(SIZE, _table(4, 4))
    before = bytes(host.data)
    c.drop(0)
    c.drop(7 * SIZE)  # absent: no error
    host.log.clear()
    assert list(c.get(0).entries) == [0x1000, 0x1001]  # re-read from the host
    assert host.reads() == [0]
    c.flush()  # the reloaded table is clean: a dropped (freed) cluster is not written
    assert host.writes() == [SIZE]
    assert host.data[:SIZE] == before[:SIZE]  # the dropped change never reached the disk


def test_clear_discards_everything() -> None:
    host = _host_with_tables(2)
    c = _cache(host, 4)
    c.get(0)
    c.mark_dirty(0)
    c.clear()
    c.flush()
    assert c.tables == {} and c.dirty == set()
    assert host.writes() == []


def test_dirty_marked_but_evicted_table_is_skipped_at_flush() -> None:
    # mark_dirty of an offset that is not cached (e.g. after drop) writes nothing
    host = FakeHost()
    c = _cache(host, 4)
    c.mark_dirty(3 * SIZE)
    c.flush()
    assert host.writes() == []


@pytest.mark.parametrize("capacity", [2, 3, 5])
def test_cache_never_exceeds_capacity_and_loses_no_write(capacity: int) -> None:
    host = _host_with_tables(12)
    c = _cache(host, capacity)
    expect = bytearray(host.data)
    for step in range(40):
        off = (step * 7 % 12) * SIZE
        t = c.get(off)
        if step % 3 == 0:
            t.entries[1] = step
            c.mark_dirty(off)
            expect[off + 8:off + 16] = step.to_bytes(8, "big")
        assert len(c.tables) <= capacity
    c.flush()
    assert host.data == expect
