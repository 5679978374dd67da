"""seSparse extents (ESXi 6.5+ snapshots), read-only like qemu 7.2's driver: the constant
header's codec and checks (:class:`SeSparseHeader`), the volatile header, and the u64
grain directory and tables mapped to :class:`~diskimg.plan.Run` s.  Imported when a
descriptor names a SESPARSE extent (start-up, issue 20).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from diskimg.errors import CorruptImageError, FormatError, UnsupportedFeatureError
from diskimg.plan import Run, RunKind
from diskimg.slotted import FrozenRecord, set_field
from diskimg.vmdk import sparse as S
from diskimg.vmdk.sparse_extent import GrainMappedExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.vmdk.extent import Fill

SESPARSE_CONST_MAGIC = 0x00000000CAFEBABE
SESPARSE_VOLATILE_MAGIC = 0x00000000CAFECAFE
SESPARSE_VERSION = 0x0000000200000001


class SeSparseHeader(FrozenRecord):
    """seSparse constant header (sector 0; 26 little-endian u64, sizes/offsets in
    sectors) plus the ``replay_journal`` field of the volatile header."""

    __slots__ = ("fields",)
    fields: tuple[int, ...]

    def __init__(self, fields: tuple[int, ...]) -> None:
        set_field(self, "fields", fields)

    FMT = struct.Struct("<26Q")
    NAMES = ("magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
             "reserved1", "reserved2", "reserved3", "reserved4", "volatile_header_offset",
             "volatile_header_size", "journal_header_offset", "journal_header_size",
             "journal_offset", "journal_size", "grain_dir_offset", "grain_dir_size",
             "grain_tables_offset", "grain_tables_size", "free_bitmap_offset",
             "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset",
             "grains_size")

    @classmethod
    def parse(cls, buf: bytes) -> SeSparseHeader:
        if len(buf) < cls.FMT.size:
            raise FormatError("seSparse header truncated", offset=0)
        return cls(cls.FMT.unpack_from(buf, 0))

    def pack(self) -> bytes:
        return self.FMT.pack(*self.fields).ljust(S.SECTOR, b"\0")

    def __getattr__(self, name: str) -> int:
        try:
            return self.fields[SeSparseHeader.NAMES.index(name)]
        except ValueError:
            raise AttributeError(name) from None

    def validate(self) -> None:
        """qemu 7.2's checks: the only layout VMware writes (4 KiB grains, 4096-entry
        tables), no flags."""
        def off(name: str) -> int:
            return 8 * SeSparseHeader.NAMES.index(name)
        if self.magic != SESPARSE_CONST_MAGIC:
            raise FormatError("Bad seSparse constant header magic", offset=0)
        if self.version != SESPARSE_VERSION:
            raise UnsupportedFeatureError(f"Unsupported seSparse version {self.version:#x}",
                                          offset=off("version"))
        if self.grain_size != 8:
            raise UnsupportedFeatureError(f"Unsupported seSparse grain size {self.grain_size}",
                                          offset=off("grain_size"))
        if self.grain_table_size != 64:
            raise UnsupportedFeatureError(f"Unsupported seSparse grain table size "
                                          f"{self.grain_table_size}",
                                          offset=off("grain_table_size"))
        if self.flags != 0:
            raise UnsupportedFeatureError(f"Unsupported seSparse flags {self.flags:#x}",
                                          offset=off("flags"))
        if self.capacity > (1 << 63) // S.SECTOR - 1:
            raise FormatError("seSparse capacity too large", offset=off("capacity"))


class SeSparseExtent(GrainMappedExtent):
    """seSparse extent (ESXi 6.5+ snapshots), read-only like qemu 7.2's driver.

    Directory entries are u64 ``0x1000_0000_xxxx_xxxx`` (table index in the low 32 bits);
    table entries are u64 with the type in the top nibble: 0 unallocated, 1 unmapped and
    2 zero (both read as zeros), 3 allocated (grain index in bits 0-47 << 12 | bits 48-59).
    """

    GTES = 4096
    grain_noun = "seSparse grain"

    def __init__(self, host: Host, h: SeSparseHeader, filename: str, typ: str) -> None:
        h.validate()
        self.host, self.header, self.filename, self.type = host, h, filename, typ
        self.read_only = True
        self.fsize = host.size()
        self.size = h.capacity * S.SECTOR
        self.gb = h.grain_size * S.SECTOR
        vh = host.pread(h.volatile_header_offset * S.SECTOR, 32)
        if len(vh) < 32 or struct.unpack_from("<Q", vh)[0] != SESPARSE_VOLATILE_MAGIC:
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
        off = self._table_at(gdi)
        if off + self.GTES * 8 > self.fsize:
            raise CorruptImageError(f"seSparse grain table {gdi} at {off:#x} lies past the "
                                    "end of the file", offset=where)
        t = struct.unpack(f"<{self.GTES}Q", self.host.pread(off, self.GTES * 8))
        self._gts[gdi] = t
        if len(self._gts) > 256:
            self._gts.popitem(last=False)
        return t

    def _table_at(self, gdi: int) -> int:
        """File offset of the grain table that directory entry ``gdi`` names."""
        return (self.header.grain_tables_offset * S.SECTOR
                + (int(self.gd[gdi]) & 0xFFFFFFFF) * self.GTES * 8)

    def _bad_entry(self, e: int, gdi: int, idx: int) -> CorruptImageError:
        at = self._table_at(gdi) + 8 * idx
        return CorruptImageError(f"Invalid seSparse grain table entry {e:#x} at offset "
                                 f"{at:#x}", offset=at)

    def lookup(self, off: int, length: int) -> Run:
        """The run at ``off``: a whole missing table is one UNALLOCATED run; otherwise
        one grain (DATA with ``host`` that of ``off``, ZERO, or UNALLOCATED)."""
        gb = self.gb
        grain, in_g = divmod(off, gb)
        gdi, idx = divmod(grain, self.GTES)
        n = min(length, gb - in_g)
        t = self._gt(gdi)
        if t is None:
            return Run(off, min(length, (self.GTES - idx) * gb - in_g), RunKind.UNALLOCATED)
        e = t[idx]
        kind = e >> 60
        if kind == 0:
            if e:
                raise self._bad_entry(e, gdi, idx)
            return Run(off, n, RunKind.UNALLOCATED)
        if kind in (1, 2):
            return Run(off, n, RunKind.ZERO, entry=e)
        if kind != 3:
            raise self._bad_entry(e, gdi, idx)
        g = ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)
        host = self.header.grains_offset * S.SECTOR + g * gb
        return Run(off, n, RunKind.DATA, host + in_g, e, self.filename)

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        raise UnsupportedFeatureError("Writes to seSparse extents are not supported")

    def flush(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename,
                "cluster-size": self.gb, "format": self.type}

