"""The block cache every host over one remote object reads through (FsspecHost, and
HttpHost for the reads its stream does not take), written once.

A read of ``[offset, end)`` is planned by :meth:`BlockCache.plan`: the cached blocks it
covers are copied into the caller's buffer; the missing ones become fetches --

- ``direct``: whole blocks wholly inside the read go straight into the caller's buffer
  and are not cached (a large read is not read again; caching it would copy it twice),
  split into parts of at least ``min_part`` bytes, as many as ``parts`` (the host's
  parallel connections), so a large read is fetched by all of them at once;
- with ``parts == 1`` (a host that fetches one range at a time, where each request is a
  round trip) every run of missing blocks is one fetch: cached, or, when the run is
  larger than the cache, exactly the read's own bytes straight into its buffer;
- cached: a partial block at either edge of the read, a small read, and the read-ahead
  of a small sequential read (it doubles up to :data:`READAHEAD_MAX` blocks while reads
  follow each other) are fetched into blocks, kept in a bounded LRU and copied out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

READAHEAD_MAX = 16           # blocks read ahead at most while small reads are sequential
SMALL_BLOCKS = 4             # a read of fewer blocks than this is "small" (read-ahead)


class Fetch:
    """One range to fetch: ``[lo, hi)`` of the object; ``direct``: into the caller's
    buffer at ``lo - offset``, else into cache blocks from ``lo`` on."""

    __slots__ = ("direct", "hi", "lo")

    def __init__(self, lo: int, hi: int, direct: bool) -> None:
        self.lo, self.hi, self.direct = lo, hi, direct

    def __repr__(self) -> str:
        return f"Fetch({self.lo}, {self.hi}, direct={self.direct})"


class BlockCache:
    """A bounded LRU of ``block``-byte blocks of one object of ``size`` bytes
    (``cache_bytes`` in all), with the read-ahead state of its reader.  Thread-safe."""

    def __init__(self, block: int, cache_bytes: int) -> None:
        self.block = block
        self.max_blocks = cache_bytes // block
        self._lru: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._next = -1                      # where a sequential read would start
        self._ahead = 0                      # read-ahead window, in blocks

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def discard(self, offset: int, length: int) -> None:
        """Forget the blocks that hold any of ``[offset, offset + length)`` (written)."""
        bs = self.block
        with self._lock:
            for b in range(offset // bs, (offset + max(length, 1) - 1) // bs + 1):
                self._lru.pop(b, None)

    def plan(self, offset: int, end: int, size: int, buf: memoryview, *, parts: int = 1,
             min_part: int = 0) -> list[Fetch]:
        """Copy the cached blocks of ``[offset, end)`` (``end <= size``) into ``buf``
        (which starts at ``offset``) and return what is left to fetch."""
        bs = self.block
        first, last = offset // bs, (end - 1) // bs
        missing: list[int] = []
        with self._lock:
            for b in range(first, last + 1):
                blk = self._lru.get(b)
                if blk is None:
                    missing.append(b)
                    continue
                self._lru.move_to_end(b)
                lo, hi = max(b * bs, offset), min((b + 1) * bs, end)
                buf[lo - offset : hi - offset] = blk[lo - b * bs : hi - b * bs]
            sequential = offset == self._next
            self._next = end
            self._ahead = min(max(self._ahead * 2, 2), READAHEAD_MAX) if sequential else 0
            small = last - first < SMALL_BLOCKS
            ahead = [] if not (missing and small and self._ahead) else [
                b for b in range(last + 1, min(last + 1 + self._ahead, -(-size // bs)))
                if b not in self._lru]
        fetches: list[Fetch] = []
        if parts == 1:      # one fetch at a time: a request per run of missing blocks
            for b0, count in _runs(missing + ahead):
                lo, hi = b0 * bs, min((b0 + count) * bs, size)
                if count > self.max_blocks:   # too big to cache: the read's own bytes
                    fetches.append(Fetch(max(lo, offset), min(hi, end), True))
                else:
                    fetches.append(Fetch(lo, hi, False))
            return fetches
        inner = [b for b in missing if b * bs >= offset and min((b + 1) * bs, size) <= end]
        if len(inner) < 2:
            inner = []
        inside = set(inner)
        for b0, count in _runs(inner):                  # straight into the caller's buffer
            lo, hi = b0 * bs, min((b0 + count) * bs, size)
            fetches.extend(_split(lo, hi, bs, parts, min_part))
        cached = [b for b in missing if b not in inside] + ahead
        for b0, count in _runs(cached, SMALL_BLOCKS):
            fetches.append(Fetch(b0 * bs, min((b0 + count) * bs, size), False))
        return fetches

    def store(self, lo: int, data: memoryview, offset: int, buf: memoryview) -> None:
        """Keep ``data`` (the object's bytes from block-aligned ``lo``) as blocks and copy
        what overlaps ``buf`` (which starts at ``offset``) into it."""
        bs = self.block
        hi = lo + len(data)
        a, b = max(lo, offset), min(hi, offset + len(buf))
        if a < b:
            buf[a - offset : b - offset] = data[a - lo : b - lo]
        with self._lock:
            for i in range(0, len(data), bs):
                blk = lo // bs + i // bs
                self._lru[blk] = bytes(data[i : i + bs])
                self._lru.move_to_end(blk)
            while len(self._lru) > self.max_blocks:
                self._lru.popitem(last=False)


def _runs(blocks: list[int], most: int = 0) -> list[tuple[int, int]]:
    """Sorted distinct ``blocks`` as (first, count) runs of at most ``most`` blocks
    (0: unbounded)."""
    runs: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if runs and runs[-1][0] + runs[-1][1] == b and (not most or runs[-1][1] < most):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _split(lo: int, hi: int, bs: int, parts: int, min_part: int) -> list[Fetch]:
    """``[lo, hi)`` as at most ``parts`` direct fetches of whole blocks, each at least
    ``min_part`` bytes (but the last)."""
    nblocks = -(-(hi - lo) // bs)
    per = max(-(-nblocks // max(parts, 1)), -(-min_part // bs), 1)
    return [Fetch(lo + i * bs, min(lo + (i + per) * bs, hi), True)
            for i in range(0, nblocks, per)]
