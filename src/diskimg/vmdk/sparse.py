"""Hosted sparse extent records: the SparseExtentHeader and the grain directory / table
entries (u32 arrays), what every open of a sparse vmdk decodes.

All integers are little-endian.  Offsets in these records are in 512-byte sectors.  Pure
codecs, no I/O.  :func:`geometry` validates a header against the file it lives in and
bounds every size derived from it before anything is allocated.  The records only some
images have are codecs of their own, imported when first used (start-up, issue 20):
streamOptimized markers, grains and footer (:mod:`diskimg.vmdk.markers`), the COWD header
(:mod:`diskimg.vmdk.cowd`), the seSparse header (:mod:`diskimg.vmdk.sesparse`).
"""

from __future__ import annotations

import sys

from diskimg.errors import CorruptImageError, FormatError, UnsupportedFeatureError
from diskimg.slotted import FrozenRecord, set_fields

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterable

SECTOR = 512
VMDK4_MAGIC = b"KDMV"
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1  # grain table entry meaning "reads as zeros" when FLAG_ZERO_GRAIN is set
#: qemu 7.2's limits
MAX_GTES = 512
#: entries of a COWD (vmfsSparse) grain table
COWD_GTES = 4096
MAX_GRAIN_SECTORS = 0x200000
MAX_GD_ENTRIES = 32 * 1024 * 1024
EOL_CHARS = b"\n \r\n"


class SparseHeader(FrozenRecord):
    """SparseExtentHeader (512 bytes; the first 79 carry fields, the rest is padding)."""

    __slots__ = ("version", "flags", "capacity", "grain_size", "desc_offset", "desc_size",
                 "num_gtes_per_gt", "rgd_offset", "gd_offset", "overhead",
                 "unclean_shutdown", "eol", "compress_algorithm")
    version: int
    flags: int
    capacity: int            # sectors
    grain_size: int          # sectors
    desc_offset: int         # sectors
    desc_size: int           # sectors
    num_gtes_per_gt: int
    rgd_offset: int          # sectors
    gd_offset: int           # sectors, GD_AT_END for a streamOptimized footer
    overhead: int            # sectors before the first grain
    unclean_shutdown: int
    eol: bytes
    compress_algorithm: int

    def __init__(self, version: int, flags: int, capacity: int, grain_size: int,
                 desc_offset: int, desc_size: int, num_gtes_per_gt: int, rgd_offset: int,
                 gd_offset: int, overhead: int, unclean_shutdown: int = 0,
                 eol: bytes = EOL_CHARS, compress_algorithm: int = 0) -> None:
        set_fields(self, version, flags, capacity, grain_size, desc_offset, desc_size,
                   num_gtes_per_gt, rgd_offset, gd_offset, overhead, unclean_shutdown, eol,
                   compress_algorithm)

    #: (offset, width) of each integer field, in ``__slots__`` order but ``eol``: the
    #: layout ``struct.Struct("<4sIIQQQQIQQQB4sH")`` gives, read with ``int.from_bytes``
    #: (the struct module is a shared library a read-only open need not load: start-up)
    INTS = ((4, 4), (8, 4), (12, 8), (20, 8), (28, 8), (36, 8), (44, 4), (48, 8), (56, 8),
            (64, 8), (72, 1), (77, 2))
    EOL_AT = 73
    SIZE = 79

    @classmethod
    def parse(cls, buf: bytes) -> SparseHeader:
        if len(buf) < cls.SIZE:
            raise FormatError(f"VMDK sparse header truncated ({len(buf)} bytes)", offset=0)
        if buf[:4] != VMDK4_MAGIC:
            raise FormatError("Not a VMDK sparse extent (magic 'KDMV' missing at 0)",
                              offset=0)
        (version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, unclean,
         comp) = [int.from_bytes(buf[o:o + n], "little") for o, n in cls.INTS]
        return cls(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
                   unclean, bytes(buf[cls.EOL_AT:cls.EOL_AT + 4]), comp)

    def pack(self) -> bytes:
        out = bytearray(SECTOR)
        out[:4] = VMDK4_MAGIC
        values = (self.version, self.flags, self.capacity, self.grain_size,
                  self.desc_offset, self.desc_size, self.num_gtes_per_gt, self.rgd_offset,
                  self.gd_offset, self.overhead, self.unclean_shutdown,
                  self.compress_algorithm)
        for (o, n), value in zip(self.INTS, values):
            out[o:o + n] = value.to_bytes(n, "little")
        out[self.EOL_AT:self.EOL_AT + 4] = self.eol.ljust(4, b"\0")[:4]
        return bytes(out)

    def with_(self, **kw: int) -> SparseHeader:
        return self.replace(**kw)

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return self.compressed and bool(self.flags & FLAG_MARKER)


def le_u32_array(buf: bytes | bytearray) -> memoryview:
    """The little-endian u32 entries of ``buf`` (a multiple of 4 bytes) as a writable
    native ``"I"`` view of a private copy: indexed, sliced and assigned like an array,
    without importing :mod:`array` (which loads :mod:`collections`: start-up, issue 20)."""
    b = bytearray(buf)
    if sys.byteorder == "big":
        import struct

        n = len(b) // 4
        b = bytearray(struct.pack(f"={n}I", *struct.unpack(f"<{n}I", b)))
    return memoryview(b).cast("I")


def u32_table(values: Iterable[int]) -> memoryview:
    """``values`` as a writable native ``"I"`` view (what a table slice is assigned)."""
    import struct  # the write side only (a read-only open never gets here)

    v = list(values)
    return memoryview(bytearray(struct.pack(f"={len(v)}I", *v))).cast("I")


def pack_le_u32_array(a: memoryview | array[int]) -> bytes:
    """The entries of ``a`` (a view from :func:`le_u32_array` or an ``array("I")``) as
    little-endian u32 bytes."""
    if sys.byteorder == "big":
        import struct

        return struct.pack(f"<{len(a)}I", *a)
    return a.tobytes()


class Geometry(FrozenRecord):
    """Sizes derived from a validated header (bytes unless named otherwise)."""

    __slots__ = ("grain_bytes", "gtes", "gd_entries", "gt_bytes", "capacity_bytes")
    grain_bytes: int
    gtes: int
    gd_entries: int
    gt_bytes: int
    capacity_bytes: int

    def __init__(self, grain_bytes: int, gtes: int, gd_entries: int, gt_bytes: int,
                 capacity_bytes: int) -> None:
        set_fields(self, grain_bytes, gtes, gd_entries, gt_bytes, capacity_bytes)


def geometry(h: SparseHeader, file_size: int, *, writable: bool = False,
             cowd_l1_size: int | None = None) -> Geometry:
    """Validate ``h`` (qemu 7.2's rules plus bounds) and derive the table sizes.

    ``cowd_l1_size``: ``h`` describes a COWD extent whose directory has this many entries
    (4096-entry tables are then allowed).  Raises a :class:`FormatError` naming the header
    field and its offset.
    """
    if h.version < 1 or h.version > 3:
        raise UnsupportedFeatureError(f"Unsupported VMDK version {h.version} (header field "
                                      "version at offset 4)", offset=4)
    if h.version == 3 and writable and not h.flags & FLAG_COMPRESS:
        raise UnsupportedFeatureError("VMDK version 3 must be read only", offset=4)
    if h.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedFeatureError(f"Unsupported VMDK compression algorithm "
                                      f"{h.compress_algorithm} (offset 77)", offset=77)
    if h.num_gtes_per_gt > (COWD_GTES if cowd_l1_size is not None else MAX_GTES):
        raise FormatError(f"L2 table size too big (numGTEsPerGT {h.num_gtes_per_gt} at "
                          "offset 44)", offset=44)
    if h.num_gtes_per_gt * h.grain_size == 0:
        raise FormatError(f"L1 entry size is invalid (grainSize {h.grain_size} at offset 20, "
                          f"numGTEsPerGT {h.num_gtes_per_gt} at offset 44)", offset=20)
    if h.grain_size > MAX_GRAIN_SECTORS:
        raise FormatError(f"Invalid granularity, image may be corrupt (grainSize "
                          f"{h.grain_size} at offset 20)", offset=20)
    if h.capacity > (1 << 63) // SECTOR - 1:
        raise FormatError(f"L1 size too big (capacity {h.capacity} sectors at offset 12)",
                          offset=12)
    per_gt = h.num_gtes_per_gt * h.grain_size
    gd_entries = -(-h.capacity // per_gt)
    if cowd_l1_size is not None:
        if cowd_l1_size < gd_entries:
            raise FormatError(f"COWD l1dir_size {cowd_l1_size} (offset 24) is too small for "
                              f"{h.capacity} sectors", offset=24)
        gd_entries = cowd_l1_size
    if gd_entries > MAX_GD_ENTRIES:
        raise FormatError(f"L1 size too big (capacity {h.capacity} sectors at offset 12 "
                          f"needs {gd_entries} grain directory entries)", offset=12)
    gd_bytes = gd_entries * 4
    fsec = -(-file_size // SECTOR)
    for name, off, field_off in (("gdOffset", h.gd_offset, 56), ("rgdOffset", h.rgd_offset, 48)):
        if name == "rgdOffset" and not h.flags & FLAG_RGD:
            continue
        if off * SECTOR + gd_bytes > file_size or off == 0:
            raise CorruptImageError(f"Grain directory {name} {off} (sector, offset "
                                    f"{field_off}) lies outside the file ({fsec} sectors)",
                                    offset=field_off)
    if h.overhead > fsec and not h.compressed:
        raise CorruptImageError(f"overHead {h.overhead} sectors (offset 64) lies past the "
                                f"end of the file ({fsec} sectors)", offset=64)
    return Geometry(h.grain_size * SECTOR, h.num_gtes_per_gt, gd_entries,
                    h.num_gtes_per_gt * 4, h.capacity * SECTOR)
