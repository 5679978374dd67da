"""TableCache: a write-back LRU cache of cluster-sized metadata tables.

Invariant (QEMU's cache dependency): before any table of this cache is written to disk,
``before_write()`` runs; the L2 cache passes the refcount cache's flush there, so a cluster
is never referenced on disk before its refcount is.  Tables are written in offset order.
"""

from __future__ import annotations

import struct
import sys

from diskimg.hostio.file import trailing_zeros
from diskimg.qcow2.entries import HOST_LITTLE_ENDIAN as HOST_LITTLE_ENDIAN  # (re-exported)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections import OrderedDict
    from collections.abc import Callable
    from typing import Any, Generic, Literal, Protocol, TypeVar

    from diskimg.hostio.host import Host

    class Table(Protocol):
        def pack(self) -> bytes: ...

    T = TypeVar("T", bound=Table)
    #: the formats of qcow2's unsigned table words: 1, 2, 4 and 8 bytes
    Word = Literal["B", "H", "I", "Q"]
else:  # typing is for the type checker: not imported at run time (start-up).  There,
    # ``Generic[T]`` is ``object``: a one-entry mapping, so that no class is built for it
    T = None
    Generic = {T: object}

#: bytes of tables byte-swapped without ``array`` (on a little-endian host) before the
#: module is imported: importing it (and the ``collections`` package its initialisation
#: loads) costs about 1.8 ms of CPU, a swap of a full 64 KiB table without it about
#: 0.1 ms (with it 6 us).  So a small image's map or check never imports it, and a big
#: walk pays the import once, after eight full tables (issue 20: start-up).  A table's
#: zero tail is not swapped, nor counted (:func:`be_table`).
PURE_SWAP_BYTES = 8 << 16
_pure_left = PURE_SWAP_BYTES


def swap_pure(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """Each word of ``buf`` (of the size of ``typecode``: ``"H"``, ``"I"`` or ``"Q"``)
    byte-reversed, as a writable native view of that format, with bytes and memoryview
    operations only: the whole buffer reversed (words in reverse order, each one's bytes
    swapped), then the words put back in order."""
    rev = bytearray(buf)
    rev.reverse()
    return memoryview(bytearray(memoryview(rev).cast(typecode)[::-1])).cast(typecode)


def _swapped_array(buf: bytes | bytearray | memoryview, typecode: Word) -> array[int]:
    from array import array

    a = array(typecode)
    a.frombytes(buf)
    a.byteswap()
    return a


def swap_array(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """:func:`swap_pure` by ``array.byteswap`` (a view of the array)."""
    return memoryview(_swapped_array(buf, typecode))


def _swap(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    global _pure_left
    if _pure_left > 0 and "array" not in sys.modules:
        _pure_left -= len(buf)  # (a race between threads only changes which swap runs)
        return swap_pure(buf, typecode)
    return swap_array(buf, typecode)


def be_table(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """Big-endian unsigned words (``typecode`` ``"B"``, ``"H"``, ``"I"`` or ``"Q"``: 1, 2,
    4 or 8 bytes) → a writable native memoryview of that format: ``t[i]``, ``t[i] = v``,
    ``len(t)``, slices (views: copy with ``.tolist()`` or :func:`u64_copy` what must not
    change).  The one decode of qcow2's tables (L1, L2, refcount table, refcount blocks
    of byte-or-wider entries); :func:`pack_be_table` is its inverse."""
    if typecode == "B" or not HOST_LITTLE_ENDIAN:
        return memoryview(bytearray(buf)).cast(typecode)
    head = _swap_used(buf, typecode)
    n = len(buf)
    if head.nbytes == n:
        return head
    out = bytearray(n)  # (the zero tail)
    out[: head.nbytes] = head.cast("B")
    return memoryview(out).cast(typecode)


def _swap_used(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """The words of ``buf`` up to its last non-zero byte, byte-swapped: a new native
    memoryview of ``typecode``, empty when ``buf`` is all zeros.  The zero tail (most of
    a small image's tables) is zero in either byte order, so neither the decode nor the
    encode swaps it (a 64 KiB table with a few entries: one memcmp pass instead of a
    byte-reversal of every word); each puts it back its own way (the one rule of both)."""
    n = len(buf)
    size = struct.calcsize(typecode)
    used = -(-(n - trailing_zeros(buf)) // size) * size
    if used == n:
        return _swap(buf, typecode)
    return _swap(memoryview(buf)[:used], typecode) if used else memoryview(b"").cast(typecode)


def be_u64_table(buf: bytes | bytearray | memoryview) -> memoryview:
    """:func:`be_table` of u64 entries (an L1, L2 or refcount table)."""
    return be_table(buf, "Q")


_WORDS: dict[int, Word] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def pack_be_table(t: array[int] | memoryview) -> bytes:
    """A native table (``array`` or :func:`be_table`'s view, of any of its formats) → its
    big-endian bytes (as in :func:`be_table`, only the words up to the last non-zero
    byte are swapped: :func:`_swap_used`)."""
    mv = memoryview(t)
    raw = mv.cast("B")
    if mv.itemsize == 1 or not HOST_LITTLE_ENDIAN:
        return raw.tobytes()
    head = _swap_used(raw, _WORDS[mv.itemsize]).cast("B").tobytes()
    return head.ljust(len(raw), b"\0")  # (the zero tail: no zeroed copy of the table)


#: the u64 tables' name for it
pack_be_u64_array = pack_be_table


def u64_copy(table: memoryview | array[int]) -> memoryview:
    """A copy of a native u64 table (or ``array("Q")``), as :func:`be_u64_table` makes."""
    return memoryview(bytearray(memoryview(table).cast("B"))).cast("Q")


def u64_zeros(n: int) -> memoryview:
    """A table of ``n`` zero entries."""
    return memoryview(bytearray(8 * n)).cast("Q")


def u64_run(first: int, n: int, step: int) -> memoryview:
    """The ``n`` native u64 values ``first, first + step, ...`` (read-only), to compare
    with, or assign to, a slice of a table."""
    if not step:
        return memoryview(struct.pack("=Q", first) * n).cast("Q")
    return memoryview(struct.pack(f"={n}Q", *range(first, first + n * step, step))).cast("Q")


def be_u64_array(buf: bytes) -> array[int]:
    """:func:`be_u64_table` as an ``array("Q")``, for the tables that use ``array``'s
    methods (a writer's refcount table, the amend passes, create, snapshot L1 tables).
    (``array``, and the ``collections`` package it imports, load with the first one:
    not for ``info``, ``map`` or ``check``.)"""
    if HOST_LITTLE_ENDIAN:
        return _swapped_array(buf, "Q")
    from array import array

    a = array("Q")
    a.frombytes(buf)
    return a


class L2Table:
    """One L2 table: ``entries`` as native u64 (extended L2: entry, bitmap pairs), a
    :func:`be_u64_table` view."""

    __slots__ = ("entries",)

    def __init__(self, entries: memoryview) -> None:
        self.entries = entries

    def pack(self) -> bytes:
        return pack_be_u64_array(self.entries)


class TableCache(Generic[T]):
    """Cache of tables keyed by host offset.  ``load(bytes)`` builds a table."""

    def __init__(self, host: Host, table_size: int, load: Callable[[bytes], T],
                 capacity: int, what: str) -> None:
        self.host = host
        self.table_size = table_size
        self.load = load
        self.capacity = max(2, capacity)
        self.what = what
        #: least recently used first: a plain dict (insertion order), a table used again
        #: moves to the end by being taken out and put back (the C ``OrderedDict`` would
        #: load the ``_collections`` module with every image that reads a table)
        self.tables: dict[int, T] = {}
        self.dirty: set[int] = set()
        self.before_write: Callable[[], None] | None = None

    def get(self, offset: int) -> T:
        tables = self.tables
        t = tables.get(offset)
        if t is not None:
            tables[offset] = tables.pop(offset)
            return t
        data = self.host.pread_exact(offset, self.table_size, self.what)
        t = self.load(data)
        self._insert(offset, t)
        return t

    def put(self, offset: int, table: T, dirty: bool = True) -> None:
        """Insert a new (e.g. freshly allocated) table."""
        self._insert(offset, table)
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _insert(self, offset: int, table: T) -> None:
        self.tables.pop(offset, None)
        self.tables[offset] = table  # (the newest: at the end)
        if len(self.tables) > self.capacity:
            self._evict()

    def _evict(self) -> None:
        # never the newest entry: the caller is about to use (and maybe dirty) it
        for off in list(self.tables)[:-1]:
            if len(self.tables) <= self.capacity:
                return
            if off not in self.dirty:
                del self.tables[off]
        if len(self.tables) > self.capacity:
            self.flush()
            while len(self.tables) > self.capacity:
                del self.tables[next(iter(self.tables))]  # the least recently used

    def flush(self) -> None:
        """Write every dirty table (after ``before_write``)."""
        if not self.dirty:
            return
        if self.before_write is not None:
            self.before_write()
        for off in sorted(self.dirty):
            t = self.tables.get(off)
            if t is not None:
                self.host.pwrite(off, t.pack())
        self.dirty.clear()

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()


def l2_table_cache(host: Host, cs: int,
                   before_write: Callable[[], None] | None) -> TableCache[L2Table]:
    """An image's L2 table cache (16 MiB of tables, 64 to 32768 of them); a read-write
    image passes its refcount flush as ``before_write``."""
    cache = TableCache(host, cs, lambda b: L2Table(be_u64_table(b)),
                       min(32768, max(64, (16 << 20) // cs)), "L2 table")
    cache.before_write = before_write
    return cache


def new_lru() -> OrderedDict[Any, Any]:
    """An empty LRU map: CPython's C ``OrderedDict`` (which ``collections`` re-exports)
    from its extension module, so that the ``collections`` package, its classes and the
    operator, keyword and reprlib modules it imports are not loaded (issue 20: start-up)."""
    if TYPE_CHECKING:
        from collections import OrderedDict
    else:
        try:
            from _collections import OrderedDict
        except ImportError:  # (another interpreter)
            from collections import OrderedDict
    return OrderedDict()
