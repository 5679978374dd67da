"""Hosted sparse extents (VMDK4 ``KDMV``: monolithicSparse, twoGbMaxExtentSparse,
streamOptimized; and COWD vmfsSparse through its converted header): the grain directory
and grain tables, mapped to :class:`~diskimg.plan.Run` s, and grain allocation on write.

Sparse write ordering: a grain's data is written before the grain table entry pointing at
it; dirty grain tables go to disk (both the GD's and the redundant GD's copy) on flush.
"""

from __future__ import annotations

import struct

from diskimg.errors import CorruptImageError, UnsupportedFeatureError, UsageError
from diskimg.plan import Run, RunKind
from diskimg.vmdk import sparse as S
from diskimg.vmdk.extent import GrainMappedExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.vmdk.compressed import CompressedGrains
    from diskimg.vmdk.extent import Fill
    from diskimg.vmdk.stream import StreamWriter

_GT_CACHE = 4096      # grain tables kept in memory (2 KiB each with 512 entries)
_UNALLOC, _ZERO, _DATA, _COMPRESSED = (RunKind.UNALLOCATED, RunKind.ZERO, RunKind.DATA,
                                       RunKind.COMPRESSED)
_GTE_ZEROED = S.GTE_ZEROED      # entries above it locate a grain (see _classify)


def _zeroed_run(n: int) -> memoryview:
    """``n`` grain table entries meaning "zeroed grain"."""
    return S.u32_table([S.GTE_ZEROED] * n)


class SparseExtent(GrainMappedExtent):
    """A hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized).

    Invariants: the grain directory is validated to lie inside the file at open; every
    grain table is checked to lie inside the file before it is read; new grains are
    appended at ``next_sector`` (grain aligned, past every byte in use); a grain table
    entry is set only after its grain's data is written.  Compressed extents are read-only
    here except for an empty one, which accepts sequential writes (see :class:`StreamWriter`).
    """

    def __init__(self, host: Host, header: S.SparseHeader, filename: str, typ: str,
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
        #: the kind of a grain table entry that locates a grain (above 1, see _classify)
        self.data_kind = _COMPRESSED if h.compressed else _DATA
        self.gtes = g.gtes
        self.has_markers = h.has_markers
        self.zero_grain = bool(h.flags & S.FLAG_ZERO_GRAIN)
        self.gd = S.le_u32_array(host.pread_exact(h.gd_offset * S.SECTOR, g.gd_entries * 4,
                                                  "grain directory"))
        self.rgd: memoryview | None = None
        if h.flags & S.FLAG_RGD and not read_only and not self.compressed:
            self.rgd = S.le_u32_array(host.pread_exact(
                h.rgd_offset * S.SECTOR, g.gd_entries * 4, "redundant grain directory"))
        #: grain tables by directory index, least recently used first
        self._gts: dict[int, memoryview] = {}
        self._dirty: set[int] = set()
        self._cgrains: CompressedGrains | None = None     # made on the first compressed read
        gsec = h.grain_size
        fsec = -(-fsize // S.SECTOR)
        self.next_sector = -(-fsec // gsec) * gsec     # grain aligned, past the file
        #: a writable compressed extent is written front to back by a StreamWriter made on
        #: the first write (opening never changes the file)
        self.appendable = self.compressed and not read_only
        self.stream: StreamWriter | None = None
        if self.appendable:
            from diskimg.vmdk.markers import check_stream_append  # write side: on use

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

    # --- tables --------------------------------------------------------------------
    def _gt(self, gdi: int) -> memoryview | None:
        gts = self._gts
        t = gts.get(gdi)
        if t is not None:
            gts[gdi] = gts.pop(gdi)       # most recently used last
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

    def _classify(self, gte: int) -> RunKind:
        """The run kind of grain table entry ``gte`` (the one rule for this extent)."""
        if gte == 0:
            return _UNALLOC
        if gte == S.GTE_ZEROED and self.zero_grain:
            return _ZERO
        return self.data_kind

    def _not_streaming(self) -> None:
        """A streamOptimized extent being written front to back cannot be read back in
        the same session (its grains and tables are only complete at close): refuse,
        rather than read data written in this session as zeros."""
        if self.stream is not None:
            raise UsageError(f"'{self.filename}': a streamOptimized image being written "
                             "cannot be read before it is closed")

    def lookup(self, off: int, length: int) -> Run:
        """The run at ``off`` (at most ``length`` bytes); a run never crosses a grain
        table; a DATA run is host-contiguous (``host`` is that of ``off``); a COMPRESSED
        run is a series of compressed grains, ``host`` the grain record of the first one
        (read through :meth:`read_compressed`); UNALLOCATED and ZERO runs have no host.
        Refused while the extent is being streamed (reads and status come here)."""
        if self.stream is not None:
            self._not_streaming()
        gb, gtes = self.gb, self.gtes
        grain = off // gb
        in_g = off - grain * gb
        gdi, idx = divmod(grain, gtes)
        max_len = min(length, (gtes - idx) * gb - in_g)
        t = self._gt(gdi)
        if t is None:
            return Run(off, max_len, _UNALLOC)
        ent = t[idx]
        kind = self.data_kind if ent > _GTE_ZEROED else self._classify(ent)
        n = gb - in_g
        i = idx + 1
        if kind is _UNALLOC:
            if n < max_len:                    # fast path: a run of zero entries
                rest = t[i:i - (-(max_len - n) // gb)].tobytes()   # only the entries needed
                zeros = (len(rest) - len(rest.lstrip(b"\0"))) // 4
                n += zeros * gb
            return Run(off, min(n, max_len), _UNALLOC)
        host = ent * S.SECTOR
        if kind is _DATA:
            # host-contiguous grains: entry i holds ent + (i - idx) * grain sectors, which
            # is above 1, so _classify of it is DATA as well
            gs = self.header.grain_size
            nxt_sec = ent + gs
            while n < max_len and t[i] == nxt_sec:
                n += gb
                nxt_sec += gs
                i += 1
        else:
            while n < max_len and self._classify(t[i]) is kind:
                n += gb
                i += 1
        if kind is _ZERO:
            return Run(off, min(n, max_len), _ZERO, entry=ent)
        return Run(off, min(n, max_len), kind, host + in_g if kind is _DATA else host,
                   ent, self.filename)

    # --- reads -----------------------------------------------------------------------
    def read_compressed(self, run: Run, part: memoryview) -> None:
        """Guest bytes of a COMPRESSED run (one grain table; ``run.host`` is the grain at
        ``run.offset``; ``part`` is at most ``run.length`` bytes).

        Whole grains up to :data:`WHOLE_GRAIN_MAX` are inflated straight into ``part``
        (:meth:`CompressedGrains.inflate_whole`: grouped preads, on the pool when there
        are enough); a grain the request covers only partly goes through
        :meth:`CompressedGrains.read_grain` (cached)."""
        gb, gtes = self.gb, self.geo.gtes
        off, host = run.offset, run.host
        assert host is not None
        t = self._gt(off // gb // gtes)
        assert t is not None
        from diskimg.vmdk.compressed import WHOLE_GRAIN_MAX, CompressedGrains  # on use

        cg = self._cgrains
        if cg is None:
            cg = self._cgrains = CompressedGrains(self.host, self.filename, gb, self.fsize,
                                                  self.has_markers)
        whole: list[tuple[int, memoryview]] = []
        pos = 0
        while pos < len(part):
            o = off + pos
            g0 = o - o % gb
            n = min(g0 + gb - o, len(part) - pos)
            h = host if pos == 0 else t[(o // gb) % gtes] * S.SECTOR
            want = min(gb, self.size - g0)
            if gb <= WHOLE_GRAIN_MAX and o == g0 and n == want:
                whole.append((h, part[pos:pos + n]))
            else:
                cg.read_grain(h, o - g0, part[pos:pos + n], want)
            pos += n
        if whole:
            cg.inflate_whole(whole)

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
                if self._classify(gte) in (_DATA, _COMPRESSED) and gte * S.SECTOR >= fsize:
                    g = gdi * self.geo.gtes + idx
                    out.append((g * self.gb, f"ERROR: cluster offset for sector "
                                             f"{g * self.gb // S.SECTOR} points after EOF"))
                    return out
        return out

