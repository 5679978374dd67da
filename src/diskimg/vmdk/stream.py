"""Writing a streamOptimized extent front to back (:class:`StreamWriter`)."""

from __future__ import annotations

import os
from array import array
from collections import deque

from diskimg.errors import UsageError
from diskimg.hostio import all_zero
from diskimg.vmdk import markers as M
from diskimg.vmdk import sparse as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from diskimg.hostio.host import Host
    from diskimg.hostio.sink import Sink


def _is_sink(host: Host | Sink) -> TypeIs[Sink]:
    """Whether ``host`` is a forward-only :class:`~diskimg.hostio.sink.Sink` (imported
    here, not at module level: opening a vmdk for info does not load it)."""
    from diskimg.hostio.sink import Sink

    return isinstance(host, Sink)

if TYPE_CHECKING:     # the worker pool module is imported when a pool is first needed
    from diskimg.hostio.workers import Job, WorkerPool

_PAD = bytes(S.SECTOR)
#: streamOptimized records are written with one pwritev per this many bytes
_EMIT_BATCH = 1 << 20


class StreamWriter:
    """Writes a streamOptimized extent front to back, VMware's layout: grains (marker +
    zlib data), after the grains of each grain table a GT marker + table, then a GD
    marker + directory, footer marker + footer header, end-of-stream marker.

    Grains must arrive in ascending order; a partly written grain is held in memory until
    a later grain (or :meth:`finish`) completes it.  All-zero grains are not stored.
    Grains are deflated on a small thread pool (zlib releases the GIL) and appended in
    order; at most ``2 * threads`` grains are in flight (bounded memory).

    ``host`` is the extent's file (truncated at ``truncate_at``; the header's
    ``gd_offset`` is set to GD_AT_END at the end if it was not) or a :class:`Sink` that
    already received ``truncate_at`` bytes (header and descriptor, GD_AT_END): then
    nothing is ever sought back to, and the output is the same bytes.
    """

    def __init__(self, host: Host | Sink, header: S.SparseHeader, truncate_at: int, *,
                 threads: int | None = None, level: int = 6) -> None:
        self.host, self.header = host, header
        self.gb = header.grain_size * S.SECTOR
        self.gtes = header.num_gtes_per_gt
        self.gd_entries = -(-header.capacity // (header.grain_size * self.gtes))
        self.pos = truncate_at
        if _is_sink(host):
            if host.offset != truncate_at:
                raise UsageError(f"the stream is at offset {host.offset}, not {truncate_at}")
        else:
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
        self._pool: WorkerPool | None = None
        if n > 1:
            from diskimg.hostio.workers import worker_pool

            self._pool = worker_pool(n, "deflate")
        self._inflight: deque[tuple[int, Job[bytes]]] = deque()
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
            if _is_sink(self.host):
                self.host.writev(self._out)
            else:
                self.host.pwritev(self._out_at, self._out)
            self._out = []
        self._out_at = self.pos

    def _close_gt(self) -> None:
        if self.gt is not None and any(self.gt):
            nsec = -(-self.gtes * 4 // S.SECTOR)
            self._emit(M.Marker(nsec, 0, M.MARKER_GT).pack())
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
        n = M.GRAIN_MARKER.size + len(compressed)
        at = self._emit(M.GRAIN_MARKER.pack(grain * self.header.grain_size, len(compressed)),
                        compressed, _PAD[:-n % S.SECTOR])
        assert self.gt is not None
        self.gt[idx] = at // S.SECTOR

    def add_grain(self, grain: int, data: bytes) -> None:
        """Queue one whole, non-zero grain of guest data (ascending ``grain``)."""
        if grain <= self.last_added:
            raise UsageError("streamOptimized grains must be added in ascending order")
        self.last_added = grain
        if self._pool is None:
            self.put_grain(grain, M.compress_grain(data, self.level))
            return
        self._inflight.append((grain, self._pool.submit(M.compress_grain, data, self.level)))
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
        self._emit(M.Marker(gd_sec, 0, M.MARKER_GD).pack())
        gd_at = self._emit(S.pack_le_u32_array(self.gd).ljust(gd_sec * S.SECTOR, b"\0"))
        footer = self.header.with_(gd_offset=gd_at // S.SECTOR, rgd_offset=0,
                                   flags=self.header.flags & ~S.FLAG_RGD)
        self._emit(M.Marker(1, 0, M.MARKER_FOOTER).pack())
        host = self.host
        if not _is_sink(host) and \
                S.SparseHeader.parse(host.pread(0, S.SECTOR)).gd_offset != S.GD_AT_END:
            host.pwrite(0, footer.with_(gd_offset=S.GD_AT_END).pack())
        self._emit(footer.pack())
        self._emit(M.Marker(0, 0, M.MARKER_EOS).pack())
        self._flush_out()
        if _is_sink(host):
            host.flush()
        else:
            host.truncate(self.pos)
            host.flush()

