"""The write side of a hosted sparse extent (:class:`WritableSparseExtent`): grain
allocation, grain-table write-back, zeroed grains, and the stream writer of an empty
streamOptimized extent.  Imported by the first writable open of a sparse extent: a
read-only open and its reads load only :mod:`diskimg.vmdk.sparse_extent` (start-up,
issue 20).

Sparse write ordering: a grain's data is written before the grain table entry pointing at
it; dirty grain tables go to disk (both the GD's and the redundant GD's copy) on flush.
"""

from __future__ import annotations

import struct

from diskimg.errors import CorruptImageError, UnsupportedFeatureError
from diskimg.vmdk import sparse as S
from diskimg.vmdk.sparse_extent import _DATA, _GT_CACHE, _UNALLOC, SparseExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from diskimg.hostio.host import Host
    from diskimg.plan import RunKind
    from diskimg.vmdk.extent import Fill
    from diskimg.vmdk.stream import StreamWriter


def _zeroed_run(n: int) -> memoryview:
    """``n`` grain table entries meaning "zeroed grain"."""
    return S.u32_table([S.GTE_ZEROED] * n)


class WritableSparseExtent(SparseExtent):
    """A hosted sparse extent opened for writing.

    Invariants (beyond :class:`SparseExtent`'s): new grains are appended at
    ``next_sector`` (grain aligned, past every byte in use); a grain table entry is set
    only after its grain's data is written.  Compressed extents are read-only except for
    an empty one, which accepts sequential writes (see :class:`StreamWriter`).
    """

    def __init__(self, host: Host, header: S.SparseHeader, filename: str, typ: str, *,
                 footer_header: S.SparseHeader | None = None, footer_at: int = 0) -> None:
        super().__init__(host, header, filename, typ, False, footer_header=footer_header)
        h, g, fsize = self.header, self.geo, self.fsize
        self.rgd: memoryview | None = None
        if h.flags & S.FLAG_RGD and not self.compressed:
            self.rgd = S.le_u32_array(host.pread_exact(
                h.rgd_offset * S.SECTOR, g.gd_entries * 4, "redundant grain directory"))
        gsec = h.grain_size
        fsec = -(-fsize // S.SECTOR)
        self.next_sector = -(-fsec // gsec) * gsec     # grain aligned, past the file
        #: a writable compressed extent is written front to back by a StreamWriter made on
        #: the first write (opening never changes the file)
        self.appendable = self.compressed
        if self.appendable:
            from diskimg.vmdk.markers import check_stream_append  # stream writes: on use

            check_stream_append(h, footer_at if footer_header is not None else 0, g, fsize)
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
            from diskimg.vmdk.stream import StreamWriter  # write side: loaded on use

            self.stream = StreamWriter(self.host, self.header,
                                       truncate_at=self.header.overhead * S.SECTOR)
        return self.stream

    # --- writes ----------------------------------------------------------------------
    def _set_run(self, grain: int, count: int, sector: int) -> None:
        """Point the entries of grains ``[grain, grain + count)`` at consecutive grains
        from ``sector`` (already written), one slice assignment per grain table."""
        gs = self.header.grain_size
        for g, gdi, idx, n, t in self._table_runs(grain, grain + count):
            first = sector + (g - grain) * gs
            t[idx:idx + n] = S.u32_table(range(first, first + n * gs, gs))
            self._dirty.add(gdi)
        if len(self._dirty) > _GT_CACHE // 2:     # bound memory: write tables back early
            self._write_gts()

    def _table_runs(self, g: int, end: int) -> Iterator[tuple[int, int, int, int, memoryview]]:
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

    def _alloc_gt(self, gdi: int) -> memoryview:
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
        t = memoryview(bytearray(self.geo.gt_bytes)).cast("I")
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
            run = self.lookup(off + pos, len(data) - pos)
            kind, n, host = run.kind, run.length, run.host or 0
            if kind is _DATA:
                if host < self.header.overhead * S.SECTOR or host >= self.fsize:
                    raise CorruptImageError(f"Grain at offset {host:#x} overlaps the "
                                            f"metadata of '{self.filename}' or lies past "
                                            "its end", offset=host)
                self.host.pwrite(host, data[pos:pos + n])
                pos += n
                continue
            # allocate the grains of this run (UNALLOCATED or ZERO), one pwrite
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
    def _base(kind: RunKind, off: int, mv: memoryview, fill: Fill) -> None:
        if kind is _UNALLOC:
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
