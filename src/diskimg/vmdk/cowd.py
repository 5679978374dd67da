"""The VMDK3 / ESX vmfsSparse ("COWD") extent header: parse, pack, and its hosted-sparse
view (the extent is then read as a :class:`~diskimg.vmdk.sparse_extent.SparseExtent`).
Imported when a descriptor names a VMFSSPARSE extent (start-up, issue 20)."""

from __future__ import annotations

import struct

from diskimg.errors import FormatError
from diskimg.slotted import FrozenRecord, set_fields
from diskimg.vmdk.sparse import COWD_GTES, SECTOR, SparseHeader


class CowdHeader(FrozenRecord):
    """The VMDK3 / ESX vmfsSparse ("COWD") header: little-endian u32 fields after the
    magic.  Grain tables have 4096 entries; offsets are in sectors."""

    __slots__ = ("version", "flags", "disk_sectors", "granularity", "l1dir_offset",
                 "l1dir_size", "file_sectors", "cylinders", "heads", "sectors_per_track")
    version: int
    flags: int
    disk_sectors: int
    granularity: int
    l1dir_offset: int
    l1dir_size: int
    file_sectors: int
    cylinders: int
    heads: int
    sectors_per_track: int

    def __init__(self, version: int, flags: int, disk_sectors: int, granularity: int,
                 l1dir_offset: int, l1dir_size: int, file_sectors: int = 0,
                 cylinders: int = 0, heads: int = 0, sectors_per_track: int = 0) -> None:
        set_fields(self, version, flags, disk_sectors, granularity, l1dir_offset, l1dir_size,
                   file_sectors, cylinders, heads, sectors_per_track)

    FMT = struct.Struct("<4s10I")
    GTES = COWD_GTES

    @classmethod
    def parse(cls, buf: bytes) -> CowdHeader:
        if len(buf) < cls.FMT.size or buf[:4] != b"COWD":
            raise FormatError("Not a COWD (vmfsSparse) extent", offset=0)
        return cls(*cls.FMT.unpack_from(buf, 0)[1:])

    def pack(self) -> bytes:
        return self.FMT.pack(b"COWD", self.version, self.flags, self.disk_sectors,
                             self.granularity, self.l1dir_offset, self.l1dir_size,
                             self.file_sectors, self.cylinders, self.heads,
                             self.sectors_per_track).ljust(SECTOR, b"\0")

    def as_sparse(self) -> SparseHeader:
        """The equivalent hosted-sparse view (grain directory = the L1 directory)."""
        return SparseHeader(1, 0, self.disk_sectors, self.granularity, 0, 0, self.GTES, 0,
                            self.l1dir_offset, 1)
