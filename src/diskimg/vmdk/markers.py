"""streamOptimized records: the metadata markers, grain records (marker + zlib data), the
footer, the deflate side of a grain, and the rules a stream extent is appended under.

Pure codecs, no I/O; little-endian, offsets in 512-byte sectors.  Imported by the stream
writer, the compressed-grain reader, lint and the opening of a streamOptimized file (its
footer): reading a monolithicSparse image does not load it (start-up, issue 20).
"""

from __future__ import annotations

import struct

from diskimg.errors import CorruptImageError, FormatError
from diskimg.slotted import FrozenRecord, set_fields
from diskimg.vmdk.sparse import FLAG_RGD, SECTOR, VMDK4_MAGIC, Geometry, SparseHeader

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3


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
