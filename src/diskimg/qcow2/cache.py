"""TableCache: a write-back LRU cache of cluster-sized metadata tables.

Invariant (QEMU's cache dependency): before any table of this cache is written to disk,
``before_write()`` runs; the L2 cache passes the refcount cache's flush there, so a cluster
is never referenced on disk before its refcount is.  Tables are written in offset order.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections import OrderedDict
    from collections.abc import Callable
    from typing import Any, Generic, Protocol, TypeVar

    from diskimg.hostio.host import Host

    class Table(Protocol):
        def pack(self) -> bytes: ...

    T = TypeVar("T", bound=Table)
else:  # typing is for the type checker: not imported at run time (start-up)
    class Generic:
        """``Generic[T]`` as a base class, without typing: the class itself."""

        def __class_getitem__(cls, _item: object) -> type:
            return cls

    T = None

#: True when native integers are little-endian (qcow2 is big-endian on disk).
HOST_LITTLE_ENDIAN = sys.byteorder == "little"


def be_u64_array(buf: bytes) -> array[int]:
    """Big-endian u64 bytes → native array('Q').  (``array``, and the ``collections``
    package it imports, load with the first table decoded: not for ``info`` (start-up).)"""
    from array import array

    a = array("Q", buf)
    assert a.itemsize == 8
    if HOST_LITTLE_ENDIAN:
        a.byteswap()
    return a


def pack_be_u64_array(a: array[int]) -> bytes:
    if not HOST_LITTLE_ENDIAN:
        return a.tobytes()
    from array import array

    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


class L2Table:
    """One L2 table: ``entries`` as native u64 (extended L2: entry, bitmap pairs)."""

    __slots__ = ("entries",)

    def __init__(self, entries: array[int]) -> None:
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
        self.tables: OrderedDict[int, T] = new_lru()
        self.dirty: set[int] = set()
        self.before_write: Callable[[], None] | None = None

    def get(self, offset: int) -> T:
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
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
        self.tables[offset] = table
        self.tables.move_to_end(offset)
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
                self.tables.popitem(last=False)

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
    cache = TableCache(host, cs, lambda b: L2Table(be_u64_array(b)),
                       min(32768, max(64, (16 << 20) // cs)), "L2 table")
    cache.before_write = before_write
    return cache


def new_lru() -> OrderedDict[Any, Any]:
    """An empty LRU map (``collections`` is imported when one is first made)."""
    from collections import OrderedDict

    return OrderedDict()
