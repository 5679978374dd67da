"""Reading compressed grains (streamOptimized; zlib, optionally behind grain markers).

One :class:`CompressedGrains` per compressed extent.  Whole grains are read with one
pread per group of grains that follow each other in the file and inflated straight into
the caller's buffer, on the process's inflate pool when a request holds at least
:data:`_PARALLEL_MIN` of them (zlib releases the GIL).  A grain read only partly is
inflated once and cached (up to :data:`WHOLE_GRAIN_MAX`), or streamed through one
:class:`GrainInflater` when larger.

Invariants: memory follows the request (plus one grain), never the number or size of
grains; every grain's marker size is bounded by deflate's worst case and the file end;
output past the end of a zlib stream reads as zeros; a pool task never writes into a
caller's buffer after the call returns or raises.
"""

from __future__ import annotations

import _thread  # threading's Lock and local, without importing threading (start-up)
import mmap
import os
import zlib
from collections import OrderedDict

from diskimg.errors import CorruptImageError
from diskimg.hostio import aligned_buffer, zero_fill
from diskimg.vmdk.markers import GRAIN_MARKER

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from diskimg.hostio.host import Host

if TYPE_CHECKING:     # the worker pool module is imported when a pool is first needed
    from diskimg.hostio.workers import Job, WorkerPool

_MARKER = GRAIN_MARKER.size
_GRAIN_CACHE = 8      # decompressed grains kept
WHOLE_GRAIN_MAX = 1 << 20  # larger compressed grains are streamed, never held whole
#: whole compressed grains in one request before they are inflated on the pool
_PARALLEL_MIN = 4
#: grains read with one pread: a group spans at most this many bytes of the file, and
#: neighbours lie at most this far apart beyond a grain record (a GT marker + table fits)
_GROUP_MAX = 4 << 20
_GROUP_GAP = 64 << 10
_BATCH_BYTES = 8 << 20
#: pool threads; the thread asking takes a share too, so one CPU per inflating thread
_POOL_WORKERS = min(4, (os.cpu_count() or 1) - 1)
_pool: WorkerPool | None = None
_pool_lock = _thread.allocate_lock()


def _inflate_pool() -> WorkerPool | None:
    """The process's grain-inflate pool (zlib releases the GIL), made on first use (and
    again in a forked child, whose copy has no threads); None on a single CPU."""
    global _pool
    if _POOL_WORKERS < 1:
        return None
    with _pool_lock:
        if _pool is None:
            from diskimg.hostio.workers import worker_pool

            _pool = worker_pool(_POOL_WORKERS, "inflate")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, _thread.allocate_lock()


os.register_at_fork(after_in_child=_forget_pool)


class _Scratch(_thread._local):
    buf: mmap.mmap | None = None


_local = _Scratch()


def _scratch(n: int) -> memoryview:
    """This thread's page-aligned scratch buffer, at least ``n`` bytes (reused, grown on
    demand; the largest request is bounded by the batch and group limits above)."""
    buf = _local.buf
    if buf is None or len(buf) < n:
        buf = _local.buf = aligned_buffer(max(n, 1 << 20))
    return memoryview(buf)


_INFLATE_CHUNK = 256 << 10   # output bytes produced per inflate step while skipping
_INPUT_CHUNK = 256 << 10     # compressed bytes read from the file per step


class GrainInflater:
    """The inflated bytes of one compressed grain, produced front to back on demand.

    ``read(offset, n)`` reads the file; the zlib stream starts at ``start`` and is at most
    ``end - start`` bytes long.  Invariants: memory is bounded by the caller's buffer plus
    two chunks (never by the grain size, which may be 1 GiB); output past the end of the
    zlib stream (or past a truncated stream) reads as zeros; :attr:`pos` only grows, so a
    read before it needs a new inflater.  ``where`` is the file offset named in errors.
    """

    def __init__(self, read: Callable[[int, int], bytes], start: int, end: int,
                 where: int) -> None:
        self._read = read
        self._in_pos, self._in_end = start, end
        self._where = where
        self._d = zlib.decompressobj()
        self._pending = b""
        self.pos = 0          # offset in the inflated grain of the next byte produced
        self.done = False     # no more output: stream end, or input exhausted

    def _step(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) more bytes of output; b"" only once :attr:`done`."""
        while not self.done:
            if not self._pending and self._in_pos < self._in_end:
                n = min(_INPUT_CHUNK, self._in_end - self._in_pos)
                self._pending = self._read(self._in_pos, n)
                self._in_pos += n
                if len(self._pending) < n:          # the file ended early
                    self._in_end = self._in_pos
            before = len(self._pending)
            try:
                out = self._d.decompress(self._pending, limit)
            except zlib.error as err:
                raise CorruptImageError(f"Compressed grain at offset {self._where:#x} is not "
                                        f"valid zlib data: {err}", offset=self._where) from None
            self._pending = self._d.unconsumed_tail
            if out:
                self.pos += len(out)
                return out
            if self._d.eof or (len(self._pending) == before
                               and (self._pending or self._in_pos >= self._in_end)):
                self.done = True
        return b""

    def readinto(self, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with inflated bytes ``[start, start + len(buf))``; ``start`` must
        not lie before :attr:`pos`."""
        if start < self.pos:
            raise ValueError("GrainInflater reads front to back")
        while self.pos < start and not self.done:
            self._step(min(_INFLATE_CHUNK, start - self.pos))
        got = 0
        if self.pos == start:
            while got < len(buf):
                out = self._step(len(buf) - got)
                if not out:
                    break
                buf[got:got + len(out)] = out
                got += len(out)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)


class CompressedGrains:
    """The compressed grains of one extent file: ``gb`` guest bytes each, the file
    ``fsize`` bytes long (fixed: a compressed extent is only ever appended to by a
    stream writer, whose grains are not read back through this object)."""

    def __init__(self, host: Host, filename: str, gb: int, fsize: int,
                 has_markers: bool) -> None:
        self.host, self.filename, self.gb = host, filename, gb
        self.fsize, self.has_markers = fsize, has_markers
        self._grains: OrderedDict[int, bytes] = OrderedDict()
        self._cursor: tuple[int, GrainInflater] | None = None

    def read_grain(self, host: int, in_g: int, part: memoryview, want: int) -> None:
        """Bytes ``[in_g, in_g + len(part))`` of the compressed grain at ``host``, whose
        first ``want`` bytes lie inside the extent.

        Grains up to :data:`WHOLE_GRAIN_MAX` are inflated once (only ``want`` bytes) and
        cached; larger ones are streamed through one :class:`GrainInflater` kept for
        sequential reads, so memory follows the request, not the grain size."""
        if self.gb <= WHOLE_GRAIN_MAX:
            g = self._grains.get(host)
            if g is None:
                out = bytearray(want)
                self.inflater(host).readinto(0, memoryview(out))
                g = self._grains[host] = bytes(out)
                if len(self._grains) > _GRAIN_CACHE:
                    self._grains.popitem(last=False)
            part[:] = g[in_g:in_g + len(part)]
            return
        cur = self._cursor
        if cur is None or cur[0] != host or cur[1].pos > in_g:
            cur = self._cursor = (host, self.inflater(host))
        cur[1].readinto(in_g, part)

    def bound(self) -> int:
        """The most bytes a grain's zlib stream may take (deflate's worst case + slack)."""
        gb = self.gb
        return gb + (gb >> 12) + (gb >> 14) + (gb >> 25) + 13 + 64

    def inflate_whole(self, items: list[tuple[int, memoryview]]) -> None:
        """Inflate whole grains ``(host, destination)`` (each destination is the grain's
        guest bytes, ``len`` at most :data:`WHOLE_GRAIN_MAX`).

        Grains whose records follow each other in the file (ascending, at most a grain
        table's marker apart, a group at most :data:`_GROUP_MAX` long) are read with one
        pread; a hostile table (grains out of order, far apart, shared) only costs more
        preads.  At most about :data:`_BATCH_BYTES` of file data is held at once.  On the
        pool, every task has finished (or failed) before this returns or
        raises, so nothing writes into the caller's buffer afterwards."""
        tail = self.bound() + (GRAIN_MARKER.size if self.has_markers else 0)
        fsize = self.fsize
        groups: list[list[tuple[int, memoryview]]] = []
        for h, dst in items:
            if h >= fsize:
                raise CorruptImageError(f"Compressed grain at offset {h:#x} lies past the end "
                                        f"of '{self.filename}'", offset=h)
            if groups:
                g = groups[-1]
                last, first = g[-1][0], g[0][0]
                if last < h <= last + tail + _GROUP_GAP and h - first <= _GROUP_MAX:
                    g.append((h, dst))
                    continue
            groups.append([(h, dst)])
        i = 0
        while i < len(groups):
            # a batch: groups until about _BATCH_BYTES of file data, read into one
            # per-thread scratch buffer, then inflated
            spans: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
            held = 0
            while i < len(groups) and held < _BATCH_BYTES:
                g = groups[i]
                n = min(g[-1][0] + tail, fsize) - g[0][0]
                spans.append((held, n, g))
                held += n
                i += 1
            scratch = _scratch(held)
            jobs: list[tuple[memoryview, int, int, memoryview]] = []
            for at, n, g in spans:
                buf = scratch[at:at + n]
                self.host.preadinto(g[0][0], buf)
                jobs.extend((buf, g[0][0], h, dst) for h, dst in g)
            self._inflate_batch(jobs)

    def _inflate_batch(self, jobs: list[tuple[memoryview, int, int, memoryview]]) -> None:
        """:meth:`_inflate_jobs` on the pool (the calling thread takes a share) when the
        batch is large enough, else inline."""
        pool = _inflate_pool() if len(jobs) >= _PARALLEL_MIN else None
        if pool is None:
            self._inflate_jobs(jobs)
            return
        step = max(2, -(-len(jobs) // (_POOL_WORKERS + 1)))
        mine = jobs[:step]
        futs: list[Job[None]] = []
        for i in range(step, len(jobs), step):
            try:
                futs.append(pool.submit(self._inflate_jobs, jobs[i:i + step]))
            except RuntimeError:        # interpreter shutting down: inflate here
                mine += jobs[i:i + step]
        try:
            self._inflate_jobs(mine)
        finally:
            from diskimg.hostio.workers import wait

            wait(futs)
        for f in futs:
            f.result()

    def _inflate_jobs(self, jobs: list[tuple[memoryview, int, int, memoryview]]) -> None:
        """Inflate each ``(file bytes, their offset, grain offset, destination)``: the
        grain marker is checked like :meth:`inflater` does; output past the end of the
        zlib stream (or a truncated one) reads as zeros."""
        bound = self.bound()
        for buf, base, h, dst in jobs:
            at = h - base
            if self.has_markers:
                size = self._marker_size(h, buf, at)
                src = buf[at + _MARKER:at + _MARKER + size]
            else:
                src = buf[at:at + bound]
            try:
                out = zlib.decompressobj().decompress(src, len(dst))
            except zlib.error as err:
                raise CorruptImageError(f"Compressed grain at offset {h:#x} is not valid "
                                        f"zlib data: {err}", offset=h) from None
            k = len(out)
            dst[:k] = out
            if k < len(dst):
                zero_fill(dst[k:])

    def inflater(self, host: int) -> GrainInflater:
        """An inflater for the compressed grain at file offset ``host`` (its marker checked
        when the extent has markers)."""
        if host >= self.fsize:
            raise CorruptImageError(f"Compressed grain at offset {host:#x} lies past the end "
                                    f"of '{self.filename}'", offset=host)
        if self.has_markers:
            size = self._marker_size(host, self.host.pread(host, _MARKER), 0)
            return GrainInflater(self.host.pread, host + _MARKER, host + _MARKER + size,
                                   host)
        return GrainInflater(self.host.pread, host, min(host + self.bound(), self.fsize),
                               host)

    def _marker_size(self, h: int, buf: bytes | memoryview, at: int) -> int:
        """The compressed size in the grain marker of the grain at file offset ``h``
        (``buf[at:]`` holds it): non-zero, within deflate's bound and the file."""
        if at + _MARKER > len(buf):
            raise CorruptImageError(f"Grain marker at offset {h:#x} truncated", offset=h)
        _lba, size = GRAIN_MARKER.unpack_from(buf, at)
        if size == 0 or size > self.bound() or h + _MARKER + size > self.fsize:
            raise CorruptImageError(f"Grain marker at offset {h:#x} has invalid size "
                                    f"{size}", offset=h)
        return int(size)

