"""The one codec of a qcow2 persistent bitmap's table and data clusters.

docs/interop/qcow2.txt, "Bitmaps": a bitmap's table is ``table_size`` big-endian u64
entries, one per cluster of bitmap data.  Bits 9-55 hold the host offset of that data
cluster; with offset 0, bit 0 says whether the cluster is all ones (1) or all zeros (0);
the other bits are reserved.  The data is LSB-first: bit ``i`` of byte ``j`` covers guest
bytes from ``(8 * j + i) << granularity_bits``.

:func:`load` reads a bitmap into one in-memory bit array (a ``bytearray`` of
``ceil(bits / 8)`` bytes, data cluster ``k`` being bytes ``[k * cs, (k + 1) * cs)``);
:func:`store` writes a bit array to freshly allocated clusters (refcounts first, so a
crash leaves at most leaked clusters; no cluster that anything else points at is
written) and returns the new table's offset; :func:`host_ranges` names the clusters a
stored bitmap holds, for freeing once nothing on disk points at them any more.
"""

from __future__ import annotations

import struct

from diskimg.errors import FormatError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from diskimg.qcow2.bitmaps import BitmapEntry
    from diskimg.qcow2.metadata import MetadataImage

#: table entry: all-ones flag (offset 0 only), host offset, reserved bits
TABLE_FLAG_ALL_ONES = 1
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
# QEMU's limits (qcow2-bitmap.c), applied when a bitmap is loaded
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
_NONZERO = rb"[^\x00]+"  # runs of non-zero bytes (compiled on first use, by re's cache)
_PIECE = 512


def nb_bits(disk_size: int, granularity_bits: int) -> int:
    """Bits a bitmap of ``granularity_bits`` needs for a disk of ``disk_size`` bytes."""
    return -(-disk_size >> granularity_bits)


def table_size(disk_size: int, granularity_bits: int, cs: int) -> int:
    """Entries of the table of such a bitmap (one per data cluster)."""
    return -(-nb_bits(disk_size, granularity_bits) // (8 * cs))


def empty(disk_size: int, granularity_bits: int) -> bytearray:
    """An all-clear bit array for such a bitmap."""
    return bytearray(-(-nb_bits(disk_size, granularity_bits) // 8))


def entry_invalid(ent: int, cs: int) -> bool:
    """Whether a table entry is invalid: a reserved bit set, a data offset not cluster
    aligned, or an offset together with the all-ones flag (the checker counts these, the
    I/O path refuses them)."""
    off = ent & TABLE_OFFSET_MASK
    return bool(ent & TABLE_RESERVED_MASK or off % cs or (off and ent & TABLE_FLAG_ALL_ONES))


def decode_table(raw: bytes, cs: int, where: int) -> list[int]:
    """The entries of a table read from host offset ``where``; a reserved bit, an
    unaligned offset or an offset with the all-ones flag is a :class:`FormatError`
    naming the entry's offset."""
    entries = list(struct.unpack(f">{len(raw) // 8}Q", raw))
    for i, ent in enumerate(entries):
        if entry_invalid(ent, cs):
            raise FormatError(f"Bitmap table entry {i} at {where + 8 * i:#x} is invalid "
                              f"({ent:#018x})", offset=where + 8 * i)
    return entries


def encode_table(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def check_entry(e: BitmapEntry, disk_size: int, cs: int) -> None:
    """Refuse a directory entry whose table cannot be this image's (QEMU's checks on
    load): raises :class:`FormatError` naming the bitmap and its table offset."""
    bad = ""
    if e.type != 1:
        bad = f"has unknown type {e.type}"
    elif not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS:
        bad = f"has invalid granularity bits {e.granularity_bits}"
    elif e.table_offset % cs or not e.table_offset:
        bad = f"has an invalid table offset {e.table_offset:#x}"
    elif (e.table_size > MAX_TABLE_SIZE or e.table_size * cs > MAX_PHYS_SIZE
          or e.table_size != table_size(disk_size, e.granularity_bits, cs)):
        bad = f"has an invalid table size {e.table_size}"
    if bad:
        raise FormatError(f"Bitmap '{e.name}' {bad}", offset=e.table_offset)


def read_table(img: MetadataImage, e: BitmapEntry) -> list[int]:
    """The decoded table of bitmap ``e`` (checked first)."""
    check_entry(e, img.size, img.cs)
    raw = img.host.pread_exact(e.table_offset, 8 * e.table_size, "bitmap table")
    return decode_table(raw, img.cs, e.table_offset)


def load(img: MetadataImage, e: BitmapEntry) -> bytearray:
    """Bitmap ``e`` as one bit array."""
    cs = img.cs
    bits = empty(img.size, e.granularity_bits)
    for k, ent in enumerate(read_table(img, e)):
        chunk = bits[k * cs : (k + 1) * cs]
        off = ent & TABLE_OFFSET_MASK
        if off:
            data = img.host.pread_exact(off, cs, "bitmap data")[: len(chunk)]
        elif ent & TABLE_FLAG_ALL_ONES:
            data = b"\xff" * len(chunk)
        else:
            continue
        bits[k * cs : k * cs + len(data)] = data
    return bits


def store(img: MetadataImage, bits: bytes | bytearray) -> tuple[int, int]:
    """Write ``bits`` as a new table and data clusters; returns (table offset, size).

    Clusters are allocated and their refcounts flushed before anything is written to
    them, and they are new, so nothing else on disk points at them; data clusters of all
    zeros are left out (entry 0).  Synced; nothing on disk points at the result yet."""
    cs = img.cs
    n = max(1, -(-len(bits) // cs))
    entries = [0] * n
    chunks = [(k, bytes(bits[k * cs : (k + 1) * cs])) for k in range(n)]
    chunks = [(k, c) for k, c in chunks if any(c)]
    tclusters = -(-8 * n // cs)
    table_off = img.refcounts.alloc(tclusters)
    for k, _c in chunks:
        entries[k] = img.refcounts.alloc(1)
    img.flush_refcounts()
    for k, c in chunks:
        img.host.pwrite(entries[k], c.ljust(cs, b"\0"))
    img.host.pwrite(table_off, encode_table(entries).ljust(tclusters * cs, b"\0"))
    img.host.flush()
    return table_off, n


def host_ranges(img: MetadataImage, e: BitmapEntry) -> list[tuple[int, int]]:
    """The host (offset, length) ranges bitmap ``e`` holds: its table and data clusters."""
    cs = img.cs
    out = [(e.table_offset, -(-8 * e.table_size // cs) * cs)]
    out += [(ent & TABLE_OFFSET_MASK, cs) for ent in read_table(img, e)
            if ent & TABLE_OFFSET_MASK]
    return out


def set_range(bits: bytearray, granularity_bits: int, offset: int, length: int) -> None:
    """Set the bits covering guest bytes [offset, offset + length)."""
    first, last = offset >> granularity_bits, (offset + length - 1) >> granularity_bits
    b0, b1 = first >> 3, last >> 3
    if b0 == b1:
        bits[b0] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
        return
    bits[b0] |= (0xFF << (first & 7)) & 0xFF
    bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    bits[b1] |= 0xFF >> (7 - (last & 7))


def merge_into(dst: bytearray, dst_gbits: int, src: bytes | bytearray, src_gbits: int,
               disk_size: int) -> None:
    """Set in ``dst`` every bit covering a byte dirty in ``src`` (granularities may
    differ)."""
    if dst_gbits == src_gbits:
        for i, (a, b) in enumerate(zip(dst, src, strict=False)):
            if b:
                dst[i] = a | b
        return
    for off, length in extents(src, src_gbits, disk_size):
        set_range(dst, dst_gbits, off, length)


def extents(bits: bytes | bytearray, granularity_bits: int,
            disk_size: int) -> Iterator[tuple[int, int]]:
    """The dirty guest ranges (offset, length) of a bit array, merged and clipped to
    ``disk_size``."""
    import re  # an image without bitmaps never gets here (start-up)

    run_start = run_end = -1
    limit = nb_bits(disk_size, granularity_bits)
    for m in re.finditer(_NONZERO, bits):
        for piece in range(m.start(), m.end(), _PIECE):  # bounded big-int work per run
            base = piece * 8
            value = int.from_bytes(bits[piece : min(piece + _PIECE, m.end())], "little")
            while value:
                low = (value & -value).bit_length() - 1
                value >>= low
                ones = (value ^ (value + 1)).bit_length() - 1
                value >>= ones
                start = base + low
                base = start + ones
                if start == run_end:
                    run_end = base
                    continue
                if run_start < run_end:
                    yield _clip(run_start, min(run_end, limit), granularity_bits, disk_size)
                run_start, run_end = start, base
                if run_start >= limit:  # bits past the disk's end mean nothing
                    return
    if run_start < run_end:
        yield _clip(run_start, min(run_end, limit), granularity_bits, disk_size)


def _clip(first: int, end: int, gbits: int, disk_size: int) -> tuple[int, int]:
    off = first << gbits
    return off, min(end << gbits, disk_size) - off
