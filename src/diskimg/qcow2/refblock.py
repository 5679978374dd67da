"""The refcount-block codec: qcow2's refcount entries of every width, decoded and encoded
(:mod:`diskimg.qcow2.refcount` re-exports it with the allocator; the checker imports this
module alone, at start-up: issue 20).
"""

from __future__ import annotations

import struct

from diskimg.qcow2.entries import be_table, pack_be_table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array

    from diskimg.qcow2.entries import Word

__all__ = ["REFT_OFFSET_MASK", "decode_refblock", "encode_refblock", "max_refcount",
           "refblock_entries", "refcount_typecode"]

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


# --- the refcount-block codec (docs/interop/qcow2.txt, "Host cluster management") ---------
# A refcount block holds cluster_size * 8 >> refcount_order entries of 1 << refcount_order
# bits (order 0..6).  Entries of 8 bits or more are big-endian unsigned integers; narrower
# entries are packed into bytes starting from the least significant bit:
#   refcount = (block[i / (8 / bits)] >> ((i % (8 / bits)) * bits)) & ((1 << bits) - 1)


def refblock_entries(cluster_size: int, order: int) -> int:
    """Refcounts one refcount block holds: ``cluster_size * 8 >> order``."""
    return cluster_size * 8 >> order


def max_refcount(order: int) -> int:
    """The largest refcount an entry of width ``1 << order`` bits holds."""
    return (1 << (1 << order)) - 1


assert struct.calcsize("Q") == 8 and struct.calcsize("H") == 2 and struct.calcsize("I") == 4


def refcount_typecode(order: int) -> Word:
    """The memoryview (and ``array``) format holding one decoded refcount of width
    ``1 << order`` (narrow widths decode into bytes)."""
    if order <= 3:
        return "B"
    if order > 6:
        raise KeyError(order)
    return "H" if order == 4 else "I" if order == 5 else "Q"


def _narrow_pos(i: int, order: int) -> tuple[int, int, int]:
    """(byte index, bit shift, value mask) of entry ``i`` of a sub-byte-width block."""
    bits = 1 << order
    per = 8 >> order
    return i // per, (i % per) * bits, (1 << bits) - 1


#: :func:`_narrow_tables` by order, made when first asked for
_NARROW: dict[int, tuple[list[bytes], dict[bytes, int]]] = {}


def _narrow_tables(order: int) -> tuple[list[bytes], dict[bytes, int]]:
    """Byte -> its decoded entries, and back (the LSB-first rule of _narrow_pos)."""
    tables = _NARROW.get(order)
    if tables is None:
        tables = _NARROW[order] = _make_narrow_tables(order)
    return tables


def _make_narrow_tables(order: int) -> tuple[list[bytes], dict[bytes, int]]:
    per = 8 >> order
    dec = []
    for b in range(256):
        vals = []
        for k in range(per):
            _, shift, mask = _narrow_pos(k, order)
            vals.append((b >> shift) & mask)
        dec.append(bytes(vals))
    return dec, {v: b for b, v in enumerate(dec)}


def decode_refblock(raw: bytes, order: int) -> memoryview:
    """Every refcount of a block (``raw`` big-endian on-disk bytes) as a writable native
    memoryview of format :func:`refcount_typecode` (cache.be_table)."""
    if order < 3:
        table = _narrow_tables(order)[0]
        return memoryview(bytearray(b"".join(table[b] for b in raw)))
    return be_table(raw, refcount_typecode(order))


def encode_refblock(vals: memoryview | array[int], order: int) -> bytes:
    """On-disk bytes of refcounts ``vals`` (of format :func:`refcount_typecode`, its
    length a multiple of the entries per byte); the inverse of :func:`decode_refblock`."""
    if order < 3:
        per = 8 >> order
        back = _narrow_tables(order)[1]
        raw = bytes(vals)
        return bytes(back[raw[i:i + per]] for i in range(0, len(raw), per))
    return pack_be_table(vals)
