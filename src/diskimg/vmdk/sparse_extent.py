"""Grain-mapped extents: what they share (:class:`GrainMappedExtent`, and the defaults of
every extent without compressed grains), and hosted sparse extents (VMDK4 ``KDMV``:
monolithicSparse, twoGbMaxExtentSparse, streamOptimized; and COWD vmfsSparse through its
converted header): the grain directory and grain tables mapped to
:class:`~diskimg.plan.Run` s.  This is the read side, all a read-only open loads; a
writable extent is a :class:`~diskimg.vmdk.sparse_write.WritableSparseExtent` (grain
allocation, grain-table write-back, the stream writer), whose module the first writable
open imports (start-up, issue 20).
"""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import CorruptImageError, UsageError
from diskimg.plan import Run, RunKind
from diskimg.vmdk import sparse as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.vmdk.compressed import CompressedGrains
    from diskimg.vmdk.extent import Fill
    from diskimg.vmdk.stream import StreamWriter

_GT_CACHE = 4096      # grain tables kept in memory (2 KiB each with 512 entries)
_UNALLOC, _ZERO, _DATA, _COMPRESSED = (RunKind.UNALLOCATED, RunKind.ZERO, RunKind.DATA,
                                       RunKind.COMPRESSED)
_GTE_ZEROED = S.GTE_ZEROED      # entries above it locate a grain (see _classify)


class _NoCompression:
    """For extents whose format has no compressed grains (a mapper never plans one)."""

    filename: str
    appendable = False
    compressed = False

    def read_compressed(self, run: Run, part: memoryview) -> None:
        raise CorruptImageError(f"Compressed grain at offset {run.host or 0:#x} in "
                                f"'{self.filename}', whose format has none", offset=run.host)

    def finish(self) -> None:
        """Nothing to do at close."""


class GrainMappedExtent(_NoCompression):
    """What the grain-mapped extents (hosted sparse, COWD, seSparse) share: ``status``
    from the subclass's ``lookup``, and DATA runs read only when their grain lies inside
    the file (checked against ``fsize``)."""

    host: Host
    filename: str
    fsize: int
    gb: int
    #: how errors name a grain of this extent type
    grain_noun = "Grain"

    def lookup(self, off: int, length: int) -> Run:
        raise NotImplementedError

    def zero_init(self) -> bool:
        """A grain never written reads as zeros (or, in a delta, as its parent)."""
        return True

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        """A read-only extent (a writable one's class has its own ``write``)."""
        raise UsageError(f"Cannot write to read-only extent '{self.filename}'")

    def flush(self) -> None:
        """Nothing to write back: a read-only extent changes nothing."""

    def zeroable(self, off: int, length: int) -> bool:
        return False

    def mark_zeroed(self, off: int, length: int) -> None:
        raise UsageError(f"'{self.filename}' has no zeroed grains")

    def read_data(self, run: Run, part: memoryview) -> None:
        host = run.host
        assert host is not None
        if host >= self.fsize:
            raise CorruptImageError(f"{self.grain_noun} at offset {host:#x} for guest "
                                    f"offset {run.offset:#x} lies past the end of "
                                    f"'{self.filename}'", offset=host)
        self.host.preadinto(host, part)

    def status(self, off: int, length: int) -> Status:
        r = self.lookup(off, length)
        k = r.kind
        if k is RunKind.UNALLOCATED:
            return Status(r.length, False, False, True)
        if k is RunKind.ZERO:
            return Status(r.length, True, False, True)
        if k is RunKind.COMPRESSED:
            return Status(r.length, True, True, False, None, self.filename)
        return Status(r.length, True, True, False, r.host, self.filename)


class SparseExtent(GrainMappedExtent):
    """A hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized),
    read-only (:class:`~diskimg.vmdk.sparse_write.WritableSparseExtent` adds writes).

    Invariants: the grain directory is validated to lie inside the file at open; every
    grain table is checked to lie inside the file before it is read.
    """

    #: the stream writer of a writable streamOptimized extent, once written to
    stream: StreamWriter | None = None

    def __init__(self, host: Host, header: S.SparseHeader, filename: str, typ: str,
                 read_only: bool, *, footer_header: S.SparseHeader | None = None,
                 cowd_l1_size: int | None = None) -> None:
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
        #: grain tables by directory index, least recently used first
        self._gts: dict[int, memoryview] = {}
        #: tables changed in memory, not yet written (a writable extent's): kept cached
        self._dirty: set[int] = set()
        self._cgrains: CompressedGrains | None = None     # made on the first compressed read

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
        if len(self._gts) > _GT_CACHE:     # the least recently used clean table goes
            dirty = self._dirty
            old = next((k for k in self._gts if k not in dirty), None)
            if old is not None:
                del self._gts[old]
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

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.compressed:
            d["compressed"] = True
        d.update({"virtual-size": self.size, "filename": self.filename,
                  "cluster-size": self.gb, "format": self.type})
        return d
