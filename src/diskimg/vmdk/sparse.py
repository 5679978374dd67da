"""Hosted sparse extent records: SparseExtentHeader, markers, grain tables, zlib grains.

All integers are little-endian.  Offsets in these records are in 512-byte sectors.  Pure
codecs, no I/O.  :func:`geometry` validates a header against the file it lives in and
bounds every size derived from it before anything is allocated.
"""

from __future__ import annotations

import struct
import sys

from diskimg.errors import CorruptImageError, FormatError, UnsupportedFeatureError
from diskimg.slotted import FrozenRecord, set_field, set_fields

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
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
#: qemu 7.2's limits
MAX_GTES = 512
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

    FMT = struct.Struct("<4sIIQQQQIQQQB4sH")

    @classmethod
    def parse(cls, buf: bytes) -> SparseHeader:
        if len(buf) < cls.FMT.size:
            raise FormatError(f"VMDK sparse header truncated ({len(buf)} bytes)", offset=0)
        (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
         unclean, eol, comp) = cls.FMT.unpack_from(buf, 0)
        if magic != VMDK4_MAGIC:
            raise FormatError("Not a VMDK sparse extent (magic 'KDMV' missing at 0)",
                              offset=0)
        return cls(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
                   unclean, eol, comp)

    def pack(self) -> bytes:
        head = self.FMT.pack(VMDK4_MAGIC, self.version, self.flags, self.capacity,
                             self.grain_size, self.desc_offset, self.desc_size,
                             self.num_gtes_per_gt, self.rgd_offset, self.gd_offset,
                             self.overhead, self.unclean_shutdown, self.eol,
                             self.compress_algorithm)
        return head.ljust(SECTOR, b"\0")

    def with_(self, **kw: int) -> SparseHeader:
        return self.replace(**kw)

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return self.compressed and bool(self.flags & FLAG_MARKER)


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
    GTES = 4096

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


class Marker(FrozenRecord):
    """streamOptimized metadata marker: ``numSectors u64, size u32 (0), type u32``, padded
    to one sector.  A grain marker is ``lba u64, size u32`` followed by the data."""

    __slots__ = ("value", "size", "type")
    value: int
    size: int
    type: int

    def __init__(self, value: int, size: int, type: int) -> None:
        set_fields(self, value, size, type)

    FMT = struct.Struct("<QII")

    @classmethod
    def parse(cls, buf: bytes) -> Marker:
        return cls(*cls.FMT.unpack_from(buf, 0))

    def pack(self) -> bytes:
        return self.FMT.pack(self.value, self.size, self.type).ljust(SECTOR, b"\0")


GRAIN_MARKER = struct.Struct("<QI")


def pack_grain(lba: int, compressed: bytes) -> bytes:
    """A grain marker + zlib data, padded to a whole sector."""
    rec = GRAIN_MARKER.pack(lba, len(compressed)) + compressed
    return rec + bytes(-len(rec) % SECTOR)


_PROBE = 1024        # bytes per incompressibility sample
_PROBE_SAMPLES = 4   # samples spread over the grain
_PROBE_MIN = 1000    # a sample deflating to at least this many bytes did not compress


def looks_incompressible(data: bytes | bytearray | memoryview) -> bool:
    """True when samples spread over ``data`` do not shrink at all under fast deflate
    (random or already-compressed data).  About 2% of the cost of deflating the grain."""
    n = len(data)
    if n < _PROBE * _PROBE_SAMPLES * 4:
        return False
    step = (n - _PROBE) // (_PROBE_SAMPLES - 1)
    mv = memoryview(data)
    import zlib  # compressed extents only: not loaded to read a plain sparse one

    return all(len(zlib.compress(mv[i * step : i * step + _PROBE], 1)) >= _PROBE_MIN
               for i in range(_PROBE_SAMPLES))


def compress_grain(data: bytes, level: int = 6) -> bytes:
    """zlib stream with header (RFC 1950), as VMware and qemu write it.

    A grain that :func:`looks_incompressible` is stored (deflate level 0): deflate at
    ``level`` would emit stored blocks for it anyway, about 15x slower.  A misjudged grain
    only costs space; the stream is valid zlib either way."""
    import zlib

    if level and looks_incompressible(data):
        return zlib.compress(data, 0)
    return zlib.compress(data, level)


def le_u32_array(buf: bytes | bytearray) -> memoryview:
    """The little-endian u32 entries of ``buf`` (a multiple of 4 bytes) as a writable
    native ``"I"`` view of a private copy: indexed, sliced and assigned like an array,
    without importing :mod:`array` (which loads :mod:`collections`: start-up, issue 20)."""
    b = bytearray(buf)
    if sys.byteorder == "big":
        n = len(b) // 4
        b = bytearray(struct.pack(f"={n}I", *struct.unpack(f"<{n}I", b)))
    return memoryview(b).cast("I")


def u32_table(values: Iterable[int]) -> memoryview:
    """``values`` as a writable native ``"I"`` view (what a table slice is assigned)."""
    v = list(values)
    return memoryview(bytearray(struct.pack(f"={len(v)}I", *v))).cast("I")


def pack_le_u32_array(a: memoryview | array[int]) -> bytes:
    """The entries of ``a`` (a view from :func:`le_u32_array` or an ``array("I")``) as
    little-endian u32 bytes."""
    if sys.byteorder == "big":
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
    if h.num_gtes_per_gt > (CowdHeader.GTES if cowd_l1_size is not None else MAX_GTES):
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


def check_stream_append(h: SparseHeader, at: int, geo: Geometry, file_size: int) -> None:
    """Validate the header at file offset ``at`` (0, or the footer's copy) of a
    streamOptimized extent opened for writing, which is appended to from ``overHead``.

    Invariants checked before anything is written: the header and the embedded descriptor
    lie before ``overHead``; ``overHead`` lies inside the file (appending never starts past
    its end, so opening never grows the file); the grain directory lies wholly before
    ``overHead`` (qemu's layout) or wholly after it (VMware's, following the grains).
    Raises :class:`CorruptImageError` naming the field and its offset.
    """
    ov = h.overhead
    fsec = -(-file_size // SECTOR)
    desc_end = h.desc_offset + h.desc_size if h.desc_offset else 1
    if ov < max(1, desc_end):
        raise CorruptImageError(f"overHead {ov} sectors (offset {at + 64}) overlaps the header "
                                f"or the embedded descriptor (sectors 0-{desc_end - 1})",
                                offset=at + 64)
    if ov * SECTOR > file_size:
        raise CorruptImageError(f"overHead {ov} sectors (offset {at + 64}) lies past the end "
                                f"of the file ({fsec} sectors)", offset=at + 64)
    gd_sec = -(-geo.gd_entries * 4 // SECTOR)
    dirs = [("gdOffset", h.gd_offset, 56)]
    if h.flags & FLAG_RGD:
        dirs.append(("rgdOffset", h.rgd_offset, 48))
    for name, off, field_off in dirs:
        if off < ov < off + gd_sec:
            raise CorruptImageError(f"Grain directory {name} {off} (sector, offset "
                                    f"{at + field_off}) straddles overHead {ov}",
                                    offset=at + field_off)


def parse_footer(buf: bytes, where: int) -> SparseHeader:
    """The last 1536 bytes of a streamOptimized file: footer marker, header, EOS marker."""
    if len(buf) != 3 * SECTOR:
        raise FormatError("Invalid footer (file too short for a streamOptimized footer)",
                          offset=where)
    fm = Marker.parse(buf[:SECTOR])
    eos = Marker.parse(buf[2 * SECTOR:])
    if (buf[SECTOR:SECTOR + 4] != VMDK4_MAGIC or fm.size != 0 or fm.type != MARKER_FOOTER
            or eos.value != 0 or eos.size != 0 or eos.type != MARKER_EOS):
        raise FormatError(f"Invalid footer at offset {where:#x}", offset=where)
    return SparseHeader.parse(buf[SECTOR:2 * SECTOR])


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
        return self.FMT.pack(*self.fields).ljust(SECTOR, b"\0")

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
        if self.capacity > (1 << 63) // SECTOR - 1:
            raise FormatError("seSparse capacity too large", offset=off("capacity"))
