"""vmdk extents behind one protocol: FlatExtent (FLAT, VMFS), ZeroExtent, SparseExtent.

Offsets passed to an extent are bytes relative to the extent's first guest byte, and every
call stays inside the extent (the image splits requests at extent boundaries).  ``fill`` is
a callable ``fill(extent_offset, buf)`` supplying the bytes below this layer (the parent
image, or zeros) for unallocated sparse grains.

Sparse write ordering: a grain's data is written before the grain table entry pointing at
it; dirty grain tables go to disk (both the GD's and the redundant GD's copy) on flush.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from diskimg.device import Status
from diskimg.errors import CorruptImageError, FormatError, UnsupportedFeatureError, UsageError
from diskimg.hostio import HostFile, aligned_buffer, all_zero, zero_fill
from diskimg.vmdk import sparse as S

if TYPE_CHECKING:     # concurrent.futures is imported when a pool is first needed
    from concurrent.futures import Future, ThreadPoolExecutor

Fill = Callable[[int, memoryview], None]
UNALLOC, ZERO, DATA, COMPRESSED = "unalloc", "zero", "data", "compressed"
_GT_CACHE = 4096      # grain tables kept in memory (2 KiB each with 512 entries)
_GRAIN_CACHE = 8      # decompressed grains kept
_WHOLE_GRAIN_MAX = 1 << 20  # larger compressed grains are streamed, never held whole


#: whole compressed grains in one request before they are inflated on the pool
_PARALLEL_MIN = 4
#: grains read with one pread: a group spans at most this many bytes of the file, and
#: neighbours lie at most this far apart beyond a grain record (a GT marker + table fits)
_GROUP_MAX = 4 << 20
_GROUP_GAP = 64 << 10
_BATCH_BYTES = 8 << 20
#: pool threads; the thread asking takes a share too, so one CPU per inflating thread
_POOL_WORKERS = min(4, (os.cpu_count() or 1) - 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _inflate_pool() -> ThreadPoolExecutor | None:
    """The process's grain-inflate pool (zlib releases the GIL), made on first use (and
    again in a forked child, whose copy has no threads); None on a single CPU."""
    global _pool
    if _POOL_WORKERS < 1:
        return None
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="diskimg-inflate")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


_local = threading.local()


def _scratch(n: int) -> memoryview:
    """This thread's page-aligned scratch buffer, at least ``n`` bytes (reused, grown on
    demand; the largest request is bounded by the batch and group limits above)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = aligned_buffer(max(n, 1 << 20))
    return memoryview(buf)


_PAD = bytes(S.SECTOR)
#: streamOptimized records are written with one pwritev per this many bytes
_EMIT_BATCH = 1 << 20


class Extent(Protocol):
    size: int
    filename: str
    host: HostFile | None
    read_only: bool

    def status(self, off: int, length: int) -> Status: ...
    def readinto(self, off: int, buf: memoryview, fill: Fill) -> None: ...
    def write(self, off: int, data: memoryview, fill: Fill) -> None: ...
    def zeroable(self, off: int, length: int) -> bool: ...
    def mark_zeroed(self, off: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def info(self) -> dict[str, Any]: ...


class FlatExtent:
    """FLAT / VMFS extent: guest bytes at ``start`` in a host file.  Bytes past the end of
    the host file read as zeros."""

    def __init__(self, host: HostFile, start: int, size: int, filename: str, typ: str,
                 read_only: bool) -> None:
        self.host, self.start, self.size = host, start, size
        self.filename, self.type, self.read_only = filename, typ, read_only

    def status(self, off: int, length: int) -> Status:
        h = self.start + off
        for s, n, is_data in self.host.data_extents(h, length):
            return Status(n, True, True, not is_data, s, self.filename)
        return Status(length, True, True, True, h, self.filename)

    def readinto(self, off: int, buf: memoryview, fill: Fill) -> None:
        self.host.preadinto(self.start + off, buf)

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        self.host.pwrite(self.start + off, data)

    def zeroable(self, off: int, length: int) -> bool:
        """Never: like qemu, zeroes go to a flat extent as written zero bytes."""
        return False

    def mark_zeroed(self, off: int, length: int) -> None:
        raise UsageError("A flat extent has no zeroed grains")

    def flush(self) -> None:
        self.host.flush()

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.type}


class ZeroExtent:
    """ZERO extent: reads zeros, refuses writes.  ``no_access``: a NOACCESS extent line,
    whose reads fail (qemu 7.2 silently drops such lines, shifting later extents)."""

    host = None

    def __init__(self, size: int, typ: str = "ZERO", no_access: str | None = None) -> None:
        self.size, self.filename, self.type, self.read_only = size, "", typ, True
        self.no_access = no_access

    def status(self, off: int, length: int) -> Status:
        return Status(length, True, False, True)

    def readinto(self, off: int, buf: memoryview, fill: Fill) -> None:
        if self.no_access:
            raise UnsupportedFeatureError(f"Cannot read extent '{self.no_access}': its "
                                          "access mode is NOACCESS")
        zero_fill(buf)

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        raise UsageError("Cannot write to a ZERO extent")

    def zeroable(self, off: int, length: int) -> bool:
        return not self.no_access

    def mark_zeroed(self, off: int, length: int) -> None:
        """A ZERO extent reads as zeros already."""

    def flush(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.type}


def _zeroed_run(n: int) -> array[int]:
    """``n`` grain table entries meaning "zeroed grain"."""
    return array("I", [S.GTE_ZEROED]) * n


class GrainMappedExtent:
    """What the grain-mapped extents (hosted sparse, COWD, seSparse) share: ``status`` and
    ``readinto`` over the subclass's ``lookup(off, length) -> (kind, n, host)``.

    Invariants: a run never reads past its ``n`` bytes; UNALLOC runs come from ``fill``,
    ZERO runs are zeros, DATA runs are read at ``host`` only when it lies inside the file
    (checked against ``fsize``), COMPRESSED runs go to :meth:`_read_compressed`.
    """

    host: HostFile
    filename: str
    fsize: int
    gb: int
    #: how errors name a grain of this extent type
    grain_noun = "Grain"

    def lookup(self, off: int, length: int) -> tuple[str, int, int]:
        raise NotImplementedError

    def zeroable(self, off: int, length: int) -> bool:
        return False

    def mark_zeroed(self, off: int, length: int) -> None:
        raise UsageError(f"'{self.filename}' has no zeroed grains")

    def _read_compressed(self, host: int, off: int, part: memoryview) -> None:
        raise CorruptImageError(f"Compressed grain at offset {host:#x} in '{self.filename}', "
                                "whose format has none", offset=host)

    def status(self, off: int, length: int) -> Status:
        kind, n, host = self.lookup(off, length)
        if kind == UNALLOC:
            return Status(n, False, False, True)
        if kind == ZERO:
            return Status(n, True, False, True)
        if kind == COMPRESSED:
            return Status(n, True, True, False, None, self.filename)
        return Status(n, True, True, False, host, self.filename)

    def readinto(self, off: int, buf: memoryview, fill: Fill) -> None:
        pos = 0
        while pos < len(buf):
            kind, n, host = self.lookup(off + pos, len(buf) - pos)
            part = buf[pos:pos + n]
            if kind == UNALLOC:
                fill(off + pos, part)
            elif kind == ZERO:
                zero_fill(part)
            elif kind == DATA:
                if host >= self.fsize:
                    raise CorruptImageError(f"{self.grain_noun} at offset {host:#x} for guest "
                                            f"offset {off + pos:#x} lies past the end of "
                                            f"'{self.filename}'", offset=host)
                self.host.preadinto(host, part)
            else:
                self._read_compressed(host, off + pos, part)
            pos += n


class SparseExtent(GrainMappedExtent):
    """A hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized).

    Invariants: the grain directory is validated to lie inside the file at open; every
    grain table is checked to lie inside the file before it is read; new grains are
    appended at ``next_sector`` (grain aligned, past every byte in use); a grain table
    entry is set only after its grain's data is written.  Compressed extents are read-only
    here except for an empty one, which accepts sequential writes (see :class:`StreamWriter`).
    """

    def __init__(self, host: HostFile, header: S.SparseHeader, filename: str, typ: str,
                 read_only: bool, *, footer_header: S.SparseHeader | None = None,
                 footer_at: int = 0, cowd_l1_size: int | None = None) -> None:
        self.host = host
        self.header = h = footer_header or header
        self.filename, self.type = filename, typ
        fsize = host.size()
        self.fsize = fsize
        self.geo = g = S.geometry(h, fsize, writable=not read_only, cowd_l1_size=cowd_l1_size)
        self.size = g.capacity_bytes
        self.gb = g.grain_bytes
        self.read_only = read_only
        self.compressed = h.compressed
        self.has_markers = h.has_markers
        self.zero_grain = bool(h.flags & S.FLAG_ZERO_GRAIN)
        self.gd = S.le_u32_array(host.pread_exact(h.gd_offset * S.SECTOR, g.gd_entries * 4,
                                                  "grain directory"))
        self.rgd: array[int] | None = None
        if h.flags & S.FLAG_RGD and not read_only and not self.compressed:
            self.rgd = S.le_u32_array(host.pread_exact(
                h.rgd_offset * S.SECTOR, g.gd_entries * 4, "redundant grain directory"))
        self._gts: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty: set[int] = set()
        self._grains: OrderedDict[int, bytes] = OrderedDict()
        self._cursor: tuple[int, S.GrainInflater] | None = None
        gsec = h.grain_size
        fsec = -(-fsize // S.SECTOR)
        self.next_sector = -(-fsec // gsec) * gsec     # grain aligned, past the file
        #: a writable compressed extent is written front to back by a StreamWriter made on
        #: the first write (opening never changes the file)
        self.appendable = self.compressed and not read_only
        self.stream: StreamWriter | None = None
        if self.appendable:
            S.check_stream_append(h, footer_at if footer_header is not None else 0, g, fsize)
            if fsize > h.overhead * S.SECTOR and self._holds_data():
                raise UnsupportedFeatureError(
                    f"'{filename}': a streamOptimized image that already holds data is "
                    "read-only (write a new one front to back)")

    def _holds_data(self) -> bool:
        """Whether any grain table entry is set (each distinct table read once: time
        bounded by the file size, not by the number of directory entries)."""
        seen: set[int] = set()
        for gdi, sec in enumerate(self.gd):
            if sec and sec not in seen:
                seen.add(sec)
                t = self._gt(gdi)
                if t is not None and any(t):
                    return True
        return False

    def _stream(self) -> StreamWriter:
        """The stream writer, created (truncating at the validated ``overHead``) on the
        first write."""
        if self.stream is None:
            self.stream = StreamWriter(self.host, self.header,
                                       truncate_at=self.header.overhead * S.SECTOR)
        return self.stream

    def _not_streaming(self) -> None:
        """A streamOptimized extent being written front to back cannot be read back in
        the same session (its grains and tables are only complete at close): refuse,
        rather than read data written in this session as zeros."""
        if self.stream is not None:
            raise UsageError(f"'{self.filename}': a streamOptimized image being written "
                             "cannot be read before it is closed")

    def status(self, off: int, length: int) -> Status:
        self._not_streaming()
        return super().status(off, length)

    def readinto(self, off: int, buf: memoryview, fill: Fill) -> None:
        self._not_streaming()
        super().readinto(off, buf, fill)

    # --- tables --------------------------------------------------------------------
    def _gt(self, gdi: int) -> array[int] | None:
        t = self._gts.get(gdi)
        if t is not None:
            self._gts.move_to_end(gdi)
            return t
        sec = self.gd[gdi]
        if sec == 0:
            return None
        off = sec * S.SECTOR
        h = self.header
        if not self.read_only and sec < max(1, h.desc_offset + min(h.desc_size, 2048)):
            raise CorruptImageError(
                f"Grain table {gdi} at offset {off:#x} overlaps the header or descriptor of "
                f"'{self.filename}'", offset=h.gd_offset * S.SECTOR + 4 * gdi)
        if off + self.geo.gt_bytes > self.fsize:
            raise CorruptImageError(
                f"Grain table {gdi} at offset {off:#x} (grain directory entry at "
                f"{self.header.gd_offset * S.SECTOR + 4 * gdi:#x}) lies past the end of "
                f"'{self.filename}'", offset=self.header.gd_offset * S.SECTOR + 4 * gdi)
        t = S.le_u32_array(self.host.pread(off, self.geo.gt_bytes))
        self._gts[gdi] = t
        if len(self._gts) > _GT_CACHE:
            for k in list(self._gts):
                if k not in self._dirty:
                    del self._gts[k]
                    break
        return t

    def _classify(self, gte: int) -> str:
        if gte == 0:
            return UNALLOC
        if gte == S.GTE_ZEROED and self.zero_grain:
            return ZERO
        return COMPRESSED if self.compressed else DATA

    def lookup(self, off: int, length: int) -> tuple[str, int, int]:
        """(kind, run length, host byte offset) for the run at ``off``; a run never
        crosses a grain table; DATA runs are host-contiguous (``host`` is that of ``off``);
        a COMPRESSED run is a series of compressed grains (``host`` is the first one's
        grain, read through :meth:`_read_compressed`)."""
        gb, gtes = self.gb, self.geo.gtes
        grain = off // gb
        in_g = off - grain * gb
        gdi, idx = divmod(grain, gtes)
        max_len = min(length, (gtes - idx) * gb - in_g)
        t = self._gt(gdi)
        if t is None:
            return UNALLOC, max_len, 0
        kind = self._classify(t[idx])
        host = t[idx] * S.SECTOR if kind in (DATA, COMPRESSED) else 0
        n = gb - in_g
        i = idx + 1
        if kind == UNALLOC and n < max_len:      # fast path: a run of zero entries
            rest = t[i:].tobytes()
            zeros = (len(rest) - len(rest.lstrip(b"\0"))) // 4
            return kind, min(n + zeros * gb, max_len), 0
        nxt = host + gb
        while n < max_len:
            k2 = self._classify(t[i])
            if k2 != kind or (kind == DATA and t[i] * S.SECTOR != nxt):
                break
            n += gb
            nxt += gb
            i += 1
        return kind, min(n, max_len), (host + in_g if kind == DATA else host)

    # --- reads -----------------------------------------------------------------------
    def _read_compressed(self, host: int, off: int, part: memoryview) -> None:
        """Guest bytes ``[off, off + len(part))`` of a run of compressed grains (one grain
        table; ``host`` is the grain at ``off``).

        Whole grains up to :data:`_WHOLE_GRAIN_MAX` are read with one pread per group of
        grains that follow each other in the file and inflated straight into ``part`` (on
        the inflate pool when there are at least :data:`_PARALLEL_MIN`); a grain the
        request covers only partly goes through :meth:`_read_grain` (cached).  Memory
        follows the request (plus one grain), never the number or size of grains."""
        gb, gtes = self.gb, self.geo.gtes
        t = self._gt(off // gb // gtes)
        assert t is not None
        whole: list[tuple[int, memoryview]] = []
        pos = 0
        while pos < len(part):
            o = off + pos
            g0 = o - o % gb
            n = min(g0 + gb - o, len(part) - pos)
            h = host if pos == 0 else t[(o // gb) % gtes] * S.SECTOR
            if gb <= _WHOLE_GRAIN_MAX and o == g0 and n == min(gb, self.size - g0):
                whole.append((h, part[pos:pos + n]))
            else:
                self._read_grain(h, o, part[pos:pos + n])
            pos += n
        if whole:
            self._inflate_whole(whole)

    def _read_grain(self, host: int, off: int, part: memoryview) -> None:
        """Guest bytes ``[off, off + len(part))`` of the compressed grain at ``host``.

        Grains up to :data:`_WHOLE_GRAIN_MAX` are inflated once (only up to the extent's
        end) and cached; larger ones are streamed through one :class:`S.GrainInflater`
        kept for sequential reads, so memory follows the request, not the grain size."""
        in_g = off % self.gb
        if self.gb <= _WHOLE_GRAIN_MAX:
            g = self._grains.get(host)
            if g is None:
                want = min(self.gb, self.size - (off - in_g))
                out = bytearray(want)
                self._inflater(host).readinto(0, memoryview(out))
                g = self._grains[host] = bytes(out)
                if len(self._grains) > _GRAIN_CACHE:
                    self._grains.popitem(last=False)
            part[:] = g[in_g:in_g + len(part)]
            return
        cur = self._cursor
        if cur is None or cur[0] != host or cur[1].pos > in_g:
            cur = self._cursor = (host, self._inflater(host))
        cur[1].readinto(in_g, part)

    def _bound(self) -> int:
        """The most bytes a grain's zlib stream may take (deflate's worst case + slack)."""
        gb = self.gb
        return gb + (gb >> 12) + (gb >> 14) + (gb >> 25) + 13 + 64

    def _inflate_whole(self, items: list[tuple[int, memoryview]]) -> None:
        """Inflate whole grains ``(host, destination)`` (each destination is the grain's
        guest bytes, ``len`` at most :data:`_WHOLE_GRAIN_MAX`).

        Grains whose records follow each other in the file (ascending, at most a grain
        table's marker apart, a group at most :data:`_GROUP_MAX` long) are read with one
        pread; a hostile table (grains out of order, far apart, shared) only costs more
        preads.  At most about :data:`_BATCH_BYTES` of file data is held at once.  On the
        pool, every task has finished (or failed) before this returns or
        raises, so nothing writes into the caller's buffer afterwards."""
        tail = self._bound() + (S.GRAIN_MARKER.size if self.has_markers else 0)
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
        futs: list[Future[None]] = []
        for i in range(step, len(jobs), step):
            try:
                futs.append(pool.submit(self._inflate_jobs, jobs[i:i + step]))
            except RuntimeError:        # interpreter shutting down: inflate here
                mine += jobs[i:i + step]
        try:
            self._inflate_jobs(mine)
        finally:
            from concurrent.futures import wait

            wait(futs)
        for f in futs:
            f.result()

    def _inflate_jobs(self, jobs: list[tuple[memoryview, int, int, memoryview]]) -> None:
        """Inflate each ``(file bytes, their offset, grain offset, destination)``: the
        grain marker is checked like :meth:`_inflater` does; output past the end of the
        zlib stream (or a truncated one) reads as zeros."""
        bound = self._bound()
        for buf, base, h, dst in jobs:
            at = h - base
            if self.has_markers:
                if at + S.GRAIN_MARKER.size > len(buf):
                    raise CorruptImageError(f"Grain marker at offset {h:#x} truncated",
                                            offset=h)
                _lba, size = S.GRAIN_MARKER.unpack_from(buf, at)
                if size == 0 or size > bound or h + 12 + size > self.fsize:
                    raise CorruptImageError(f"Grain marker at offset {h:#x} has invalid size "
                                            f"{size}", offset=h)
                src = buf[at + 12:at + 12 + size]
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

    def _inflater(self, host: int) -> S.GrainInflater:
        """An inflater for the compressed grain at file offset ``host`` (its marker checked
        when the extent has markers)."""
        if host >= self.fsize:
            raise CorruptImageError(f"Compressed grain at offset {host:#x} lies past the end "
                                    f"of '{self.filename}'", offset=host)
        bound = self._bound()
        if self.has_markers:
            head = self.host.pread(host, 12)
            if len(head) < 12:
                raise CorruptImageError(f"Grain marker at offset {host:#x} truncated",
                                        offset=host)
            _lba, size = S.GRAIN_MARKER.unpack(head)
            if size == 0 or size > bound or host + 12 + size > self.fsize:
                raise CorruptImageError(f"Grain marker at offset {host:#x} has invalid size "
                                        f"{size}", offset=host)
            return S.GrainInflater(self.host.pread, host + 12, host + 12 + size, host)
        return S.GrainInflater(self.host.pread, host, min(host + bound, self.fsize), host)

    # --- writes ----------------------------------------------------------------------
    def _set_run(self, grain: int, count: int, sector: int) -> None:
        """Point the entries of grains ``[grain, grain + count)`` at consecutive grains
        from ``sector`` (already written), one slice assignment per grain table."""
        gs = self.header.grain_size
        for g, gdi, idx, n, t in self._table_runs(grain, grain + count):
            first = sector + (g - grain) * gs
            t[idx:idx + n] = array("I", range(first, first + n * gs, gs))
            self._dirty.add(gdi)
        if len(self._dirty) > _GT_CACHE // 2:     # bound memory: write tables back early
            self._write_gts()

    def _table_runs(self, g: int, end: int) -> Iterator[tuple[int, int, int, int, array[int]]]:
        """``(grain, gdi, idx, n, table)`` for grains ``[g, end)`` split at grain-table
        boundaries; missing tables are allocated (callers are about to set entries)."""
        gtes = self.geo.gtes
        while g < end:
            gdi, idx = divmod(g, gtes)
            n = min(gtes - idx, end - g)
            t = self._gt(gdi)
            if t is None:
                t = self._alloc_gt(gdi)
            yield g, gdi, idx, n, t
            g += n

    def _alloc_gt(self, gdi: int) -> array[int]:
        """A grain directory entry of 0 on write: append a zeroed grain table (and one for
        the redundant directory), then point the directory entries at them."""
        nsec = -(-self.geo.gt_bytes // S.SECTOR)
        copies = 2 if self.rgd is not None else 1
        gs = self.header.grain_size
        start = self._reserve(-(-(nsec * copies) // gs) * gs)
        self.host.pwrite(start * S.SECTOR, bytes(nsec * copies * S.SECTOR))
        self.fsize = max(self.fsize, self.host.size())
        self.gd[gdi] = start
        self.host.pwrite(self.header.gd_offset * S.SECTOR + 4 * gdi, struct.pack("<I", start))
        if self.rgd is not None:
            self.rgd[gdi] = start + nsec
            self.host.pwrite(self.header.rgd_offset * S.SECTOR + 4 * gdi,
                             struct.pack("<I", start + nsec))
        t = array("I", bytes(self.geo.gt_bytes))
        self._gts[gdi] = t
        return t

    def _reserve(self, nsec: int) -> int:
        """Reserve ``nsec`` sectors at the end of the file; sector numbers are u32."""
        sec = self.next_sector
        if sec + nsec > 0xFFFFFFFF:
            raise UnsupportedFeatureError(f"Sparse extent '{self.filename}' is full: grain "
                                          "offsets past 2 TiB do not fit a grain table entry")
        self.next_sector += nsec
        return sec

    def _alloc_grains(self, n: int) -> int:
        return self._reserve(n * self.header.grain_size) * S.SECTOR

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        if self.appendable:
            self._stream().write(off, data)
            return
        gb = self.gb
        pos = 0
        while pos < len(data):
            kind, n, host = self.lookup(off + pos, len(data) - pos)
            if kind == DATA:
                if host < self.header.overhead * S.SECTOR or host >= self.fsize:
                    raise CorruptImageError(f"Grain at offset {host:#x} overlaps the "
                                            f"metadata of '{self.filename}' or lies past "
                                            "its end", offset=host)
                self.host.pwrite(host, data[pos:pos + n])
                pos += n
                continue
            # allocate the grains of this run (UNALLOC or ZERO), one pwrite
            g0 = (off + pos) // gb
            in_g = (off + pos) - g0 * gb
            end = off + pos + n
            g1 = -(-end // gb)
            if in_g == 0 and end % gb == 0:
                out: bytearray | memoryview = data[pos:pos + n]  # whole grains: no copy
            else:
                out = bytearray((g1 - g0) * gb)
                mv = memoryview(out)
                if in_g:
                    self._base(kind, g0 * gb, mv[:gb], fill)
                if end % gb and (in_g == 0 or g1 - 1 > g0):
                    self._base(kind, (g1 - 1) * gb, mv[(g1 - 1 - g0) * gb:], fill)
                mv[in_g:in_g + n] = data[pos:pos + n]
            host = self._alloc_grains(g1 - g0)
            self.host.pwrite(host, out)
            self.fsize = max(self.fsize, host + len(out))
            self._set_run(g0, g1 - g0, host // S.SECTOR)
            pos += n

    @staticmethod
    def _base(kind: str, off: int, mv: memoryview, fill: Fill) -> None:
        if kind == UNALLOC:
            fill(off, mv)
        # ZERO: already zeros

    def zeroable(self, off: int, length: int) -> bool:
        """qemu's dry run of vmdk_co_pwrite_zeroes: only whole grains of an extent with
        zeroed-grain entries (not a compressed one) can be marked zeroed."""
        return (self.zero_grain and not self.compressed and off % self.gb == 0
                and length % self.gb == 0)

    def mark_zeroed(self, off: int, length: int) -> None:
        """Set the entries of the whole grains ``[off, off + length)`` to zeroed (qemu:
        VMDK_GTE_ZEROED, whatever they held); the grains' old data is leaked, as in qemu."""
        for _g, gdi, idx, n, t in self._table_runs(off // self.gb, (off + length) // self.gb):
            if t[idx:idx + n] != _zeroed_run(n):
                t[idx:idx + n] = _zeroed_run(n)
                self._dirty.add(gdi)
                if len(self._dirty) > _GT_CACHE // 2:
                    self._write_gts()

    def flush(self) -> None:
        if self.read_only:
            return
        if self.appendable:
            return
        self._write_gts()
        self.host.flush()

    def _write_gts(self) -> None:
        """Write dirty grain tables (primary and redundant copy); grain data is already on
        disk before any table pointing at it."""
        nbytes = self.geo.gt_bytes
        writes: list[tuple[int, bytes]] = []
        for gdi in sorted(self._dirty):
            raw = S.pack_le_u32_array(self._gts[gdi])[:nbytes]
            writes.append((self.gd[gdi] * S.SECTOR, raw))
            if self.rgd is not None and self.rgd[gdi]:
                writes.append((self.rgd[gdi] * S.SECTOR, raw))
        # tables that lie back to back in the file (qemu's layout) go out with one pwritev
        writes.sort(key=lambda w: w[0])
        i = 0
        while i < len(writes):
            at, parts = writes[i][0], [writes[i][1]]
            end = at + nbytes
            i += 1
            while i < len(writes) and writes[i][0] == end and len(parts) < 512:
                parts.append(writes[i][1])
                end += nbytes
                i += 1
            self.host.pwritev(at, list(parts))
        self._dirty.clear()

    def finish(self) -> None:
        """Close-time work: a stream writer writes its tables, footer and EOS marker."""
        if self.stream is not None and not self.read_only:
            self.stream.finish()
            self.stream = None

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.compressed:
            d["compressed"] = True
        d.update({"virtual-size": self.size, "filename": self.filename,
                  "cluster-size": self.gb, "format": self.type})
        return d

    def check_redundant(self) -> list[dict[str, Any]]:
        """Findings where the redundant grain directory / tables disagree with the primary
        ones (qemu neither reads nor checks them; VMware tools repair from them)."""
        h = self.header
        if not h.flags & S.FLAG_RGD or self.compressed:
            return []
        n = self.geo.gt_bytes
        rgd = self.rgd if self.rgd is not None else S.le_u32_array(self.host.pread_exact(
            h.rgd_offset * S.SECTOR, len(self.gd) * 4, "redundant grain directory"))
        out: list[dict[str, Any]] = []
        for i, (a, b) in enumerate(zip(self.gd, rgd, strict=True)):
            if bool(a) != bool(b) or (a and self.host.pread(a * S.SECTOR, n) !=
                                      self.host.pread(b * S.SECTOR, n)):
                out.append({"extent": self.filename, "offset": b * S.SECTOR,
                            "problem": f"redundant grain table {i} differs from the primary"})
                if len(out) >= 100:
                    break
        return out

    def check_grains(self) -> list[tuple[int, str]]:
        """(guest offset, message) for grain table entries pointing past the file end."""
        out: list[tuple[int, str]] = []
        fsize = self.host.size()
        for gdi in range(len(self.gd)):
            t = self._gt(gdi)
            if t is None:
                continue
            for idx, gte in enumerate(t):
                if self._classify(gte) in (DATA, COMPRESSED) and gte * S.SECTOR >= fsize:
                    g = gdi * self.geo.gtes + idx
                    out.append((g * self.gb, f"ERROR: cluster offset for sector "
                                             f"{g * self.gb // S.SECTOR} points after EOF"))
                    return out
        return out


class SeSparseExtent(GrainMappedExtent):
    """seSparse extent (ESXi 6.5+ snapshots), read-only like qemu 7.2's driver.

    Directory entries are u64 ``0x1000_0000_xxxx_xxxx`` (table index in the low 32 bits);
    table entries are u64 with the type in the top nibble: 0 unallocated, 1 unmapped and
    2 zero (both read as zeros), 3 allocated (grain index in bits 0-47 << 12 | bits 48-59).
    """

    GTES = 4096
    grain_noun = "seSparse grain"

    def __init__(self, host: HostFile, h: S.SeSparseHeader, filename: str, typ: str) -> None:
        h.validate()
        self.host, self.header, self.filename, self.type = host, h, filename, typ
        self.read_only = True
        self.fsize = host.size()
        self.size = h.capacity * S.SECTOR
        self.gb = h.grain_size * S.SECTOR
        vh = host.pread(h.volatile_header_offset * S.SECTOR, 32)
        if len(vh) < 32 or struct.unpack_from("<Q", vh)[0] != S.SESPARSE_VOLATILE_MAGIC:
            raise FormatError("Bad seSparse volatile header magic",
                              offset=h.volatile_header_offset * S.SECTOR)
        if struct.unpack_from("<Q", vh, 24)[0]:
            raise UnsupportedFeatureError("Image is dirty, Replaying journal not supported")
        per_gt = self.GTES * self.gb
        need = -(-self.size // per_gt)
        n = h.grain_dir_size * S.SECTOR // 8
        if n < need or n > S.MAX_GD_ENTRIES:
            raise FormatError(f"seSparse grain directory size {h.grain_dir_size} sectors does "
                              f"not fit capacity {h.capacity}", offset=8 * 17)
        raw = host.pread_exact(h.grain_dir_offset * S.SECTOR, n * 8, "seSparse grain directory")
        self.gd = struct.unpack(f"<{n}Q", raw)
        self._gts: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def _gt(self, gdi: int) -> tuple[int, ...] | None:
        t = self._gts.get(gdi)
        if t is not None:
            return t
        ent = self.gd[gdi]
        if ent == 0:
            return None
        where = self.header.grain_dir_offset * S.SECTOR + 8 * gdi
        if ent >> 32 != 0x10000000:
            raise CorruptImageError(f"Invalid seSparse grain directory entry {ent:#x}",
                                    offset=where)
        off = (self.header.grain_tables_offset * S.SECTOR + (ent & 0xFFFFFFFF) * self.GTES * 8)
        if off + self.GTES * 8 > self.fsize:
            raise CorruptImageError(f"seSparse grain table {gdi} at {off:#x} lies past the "
                                    "end of the file", offset=where)
        t = struct.unpack(f"<{self.GTES}Q", self.host.pread(off, self.GTES * 8))
        self._gts[gdi] = t
        if len(self._gts) > 256:
            self._gts.popitem(last=False)
        return t

    def lookup(self, off: int, length: int) -> tuple[str, int, int]:
        gb = self.gb
        grain, in_g = divmod(off, gb)
        gdi, idx = divmod(grain, self.GTES)
        n = min(length, gb - in_g)
        t = self._gt(gdi)
        if t is None:
            return UNALLOC, min(length, (self.GTES - idx) * gb - in_g), 0
        e = t[idx]
        kind = e >> 60
        if kind == 0:
            if e:
                raise CorruptImageError(f"Invalid seSparse grain table entry {e:#x}")
            return UNALLOC, n, 0
        if kind in (1, 2):
            return ZERO, n, 0
        if kind != 3:
            raise CorruptImageError(f"Invalid seSparse grain table entry {e:#x}")
        g = ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)
        host = self.header.grains_offset * S.SECTOR + g * gb
        return DATA, n, host + in_g

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        raise UnsupportedFeatureError("Writes to seSparse extents are not supported")

    def flush(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename,
                "cluster-size": self.gb, "format": self.type}


class StreamWriter:
    """Writes a streamOptimized extent front to back, VMware's layout: grains (marker +
    zlib data), after the grains of each grain table a GT marker + table, then a GD
    marker + directory, footer marker + footer header, end-of-stream marker.

    Grains must arrive in ascending order; a partly written grain is held in memory until
    a later grain (or :meth:`finish`) completes it.  All-zero grains are not stored.
    Grains are deflated on a small thread pool (zlib releases the GIL) and appended in
    order; at most ``2 * threads`` grains are in flight (bounded memory).
    """

    def __init__(self, host: HostFile, header: S.SparseHeader, truncate_at: int, *,
                 threads: int | None = None, level: int = 6) -> None:
        self.host, self.header = host, header
        self.gb = header.grain_size * S.SECTOR
        self.gtes = header.num_gtes_per_gt
        self.gd_entries = -(-header.capacity // (header.grain_size * self.gtes))
        self.pos = truncate_at
        host.truncate(truncate_at)
        self._out: list[bytes | bytearray | memoryview] = []  # emitted, not written ...
        self._out_at = truncate_at  # ... starting at this file offset
        self.gd = array("I", bytes(4 * self.gd_entries))
        self.gt: array[int] | None = None
        self.gt_index = -1
        self.cur_grain = -1
        self.last_added = -1
        self.cur = bytearray()
        self.level = level
        n = threads if threads is not None else min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        if n > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(n)
        self._inflight: deque[tuple[int, Future[bytes]]] = deque()
        self._max_inflight = 2 * n

    def _emit(self, *parts: bytes) -> int:
        """Append ``parts`` (one record) to the stream; returns its file offset.  Records
        are gathered and written with one ``pwritev`` per :data:`_EMIT_BATCH` bytes."""
        at = self.pos
        for rec in parts:
            self._out.append(rec)
            self.pos += len(rec)
        if self.pos - self._out_at >= _EMIT_BATCH:
            self._flush_out()
        return at

    def _flush_out(self) -> None:
        if self._out:
            self.host.pwritev(self._out_at, self._out)
            self._out = []
        self._out_at = self.pos

    def _close_gt(self) -> None:
        if self.gt is not None and any(self.gt):
            nsec = -(-self.gtes * 4 // S.SECTOR)
            self._emit(S.Marker(nsec, 0, S.MARKER_GT).pack())
            at = self._emit(S.pack_le_u32_array(self.gt).ljust(nsec * S.SECTOR, b"\0"))
            self.gd[self.gt_index] = at // S.SECTOR
        self.gt = None

    def put_grain(self, grain: int, compressed: bytes) -> None:
        """Append grain ``grain`` (already zlib-compressed data), in ascending order."""
        gdi, idx = divmod(grain, self.gtes)
        if gdi != self.gt_index:
            self._close_gt()
            self.gt_index = gdi
            self.gt = array("I", bytes(4 * self.gtes))
        n = S.GRAIN_MARKER.size + len(compressed)
        at = self._emit(S.GRAIN_MARKER.pack(grain * self.header.grain_size, len(compressed)),
                        compressed, _PAD[:-n % S.SECTOR])
        assert self.gt is not None
        self.gt[idx] = at // S.SECTOR

    def add_grain(self, grain: int, data: bytes) -> None:
        """Queue one whole, non-zero grain of guest data (ascending ``grain``)."""
        if grain <= self.last_added:
            raise UsageError("streamOptimized grains must be added in ascending order")
        self.last_added = grain
        if self._pool is None:
            self.put_grain(grain, S.compress_grain(data, self.level))
            return
        self._inflight.append((grain, self._pool.submit(S.compress_grain, data, self.level)))
        while len(self._inflight) > self._max_inflight:
            self._pop()

    def _pop(self) -> None:
        g, fut = self._inflight.popleft()
        self.put_grain(g, fut.result())

    def _flush_cur(self) -> None:
        if self.cur_grain >= 0 and not all_zero(self.cur):
            self.add_grain(self.cur_grain, bytes(self.cur))
        self.cur_grain = -1

    def write(self, off: int, data: memoryview) -> None:
        gb = self.gb
        pos = 0
        while pos < len(data):
            g, in_g = divmod(off + pos, gb)
            n = min(gb - in_g, len(data) - pos)
            if g != self.cur_grain:
                if g < self.cur_grain or g <= self.last_added:
                    raise UsageError("streamOptimized images are written front to back: "
                                     f"guest offset {off + pos} lies before data already "
                                     "written")
                self._flush_cur()
                self.cur_grain = g
                self.cur = bytearray(gb)
            self.cur[in_g:in_g + n] = data[pos:pos + n]
            pos += n

    def close(self) -> None:
        """Stop the compression threads (without writing anything)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def finish(self) -> None:
        """Write the pending grains, the last grain table, GD, footer and EOS marker."""
        try:
            self._flush_cur()
            while self._inflight:
                self._pop()
        finally:
            self.close()
        self._close_gt()
        gd_sec = -(-self.gd_entries * 4 // S.SECTOR)
        self._emit(S.Marker(gd_sec, 0, S.MARKER_GD).pack())
        gd_at = self._emit(S.pack_le_u32_array(self.gd).ljust(gd_sec * S.SECTOR, b"\0"))
        footer = self.header.with_(gd_offset=gd_at // S.SECTOR, rgd_offset=0,
                                   flags=self.header.flags & ~S.FLAG_RGD)
        self._emit(S.Marker(1, 0, S.MARKER_FOOTER).pack())
        if S.SparseHeader.parse(self.host.pread(0, S.SECTOR)).gd_offset != S.GD_AT_END:
            self.host.pwrite(0, footer.with_(gd_offset=S.GD_AT_END).pack())
        self._emit(footer.pack())
        self._emit(S.Marker(0, 0, S.MARKER_EOS).pack())
        self._flush_out()
        self.host.truncate(self.pos)
        self.host.flush()


def new_cid(previous: int = 0) -> int:
    """A new content ID: random (qemu: g_random_int()), or with ``SOURCE_DATE_EPOCH`` set
    derived from it and the previous CID (reproducible, still different from it)."""
    from diskimg.reproducible import random_u32

    cid = random_u32("vmdk-cid", previous)
    return cid if cid != previous else cid ^ 1


def guard_type(typ: str) -> None:
    if typ in ("VMFSRDM", "VMFSRAW"):
        raise UnsupportedFeatureError(f"Unsupported vmdk extent type '{typ}'")
    if typ not in ("SPARSE", "FLAT", "VMFS", "ZERO", "VMFSSPARSE", "SESPARSE"):
        raise FormatError(f"Unknown vmdk extent type '{typ}'")
