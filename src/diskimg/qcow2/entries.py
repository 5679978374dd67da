"""Pure codecs for L1/L2 entries and compressed-cluster descriptors (no I/O), and
:class:`TableBreaks`, where a whole L2 table's entries break a run (the map's and the
checker's).

Bit layouts from docs/interop/qcow2.txt; names from QEMU's qcow2.h.
"""

from __future__ import annotations

import sys

#: the byte order of ``memoryview.cast`` words: the tables are big-endian on disk
HOST_LITTLE_ENDIAN = sys.byteorder == "little"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
SUBCLUSTERS_PER_CLUSTER = 32
#: Extended-L2 bitmap: bit i (0..31) "subcluster i allocated", bit 32+i "reads as zeros".
L2_BITMAP_ALL_ALLOC = (1 << SUBCLUSTERS_PER_CLUSTER) - 1
L2_BITMAP_ALL_ZERO = L2_BITMAP_ALL_ALLOC << SUBCLUSTERS_PER_CLUSTER


class ClusterType:
    """What a (standard-L2) entry says about its guest cluster (QCOW2_CLUSTER_*): plain
    ints, as QEMU's enum values (an IntEnum would import :mod:`enum`, which costs every
    command's start-up: issue 20)."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


class SubclusterType:
    """QCOW2_SUBCLUSTER_*: the state of one subcluster of an extended-L2 entry (plain
    ints, as :class:`ClusterType`)."""

    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


def cluster_type(entry: int, *, extended: bool, has_data_file: bool) -> int:
    """Classify an L2 entry (the one rule for every reader, writer and the checker).

    With extended L2 the zero flag lives in the bitmap, so bit 0 is ignored here (it
    must be 0) and zero-ness is per subcluster (:func:`subcluster_type`).

    Host offset 0 means "no cluster" except with an external data file, where 0 is the
    first cluster of the data file: there every data cluster has refcount 1, so its
    entry carries QCOW_OFLAG_COPIED, and an entry with offset 0 and COPIED is NORMAL
    (docs/interop/qcow2.txt, L2 entries).  A zero-flagged entry with offset 0 stays
    ZERO_PLAIN, as in QEMU."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    off = entry & L2E_OFFSET_MASK
    if not extended and entry & QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if off else ClusterType.ZERO_PLAIN
    if off or (has_data_file and entry & QCOW_OFLAG_COPIED):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


def l2_offset(l1: memoryview, cluster: int, l2_bits: int, cs: int,
              l1_table_offset: int) -> tuple[int, int]:
    """(L1 index, L2 table host offset or 0) of guest cluster index ``cluster``: its L1
    entry's offset, refused beyond the table (``l1``, native) or when not cluster aligned.
    The one L1 lookup of reads (mapper), writes (cluster) and resize."""
    l1i = cluster >> l2_bits
    if l1i >= len(l1):
        from diskimg.errors import CorruptImageError

        raise CorruptImageError(f"Guest cluster {cluster} lies beyond the L1 table "
                                f"({len(l1)} entries)")
    off = l1[l1i] & L1E_OFFSET_MASK
    if off % cs:
        from diskimg.errors import CorruptImageError

        raise CorruptImageError(f"L2 table offset {off:#x} in L1 entry {l1i} is not "
                                "cluster aligned", offset=l1_table_offset + 8 * l1i)
    return l1i, off


def subcluster_type(entry: int, bitmap: int, index: int, *,
                    has_data_file: bool) -> int:
    """State of subcluster ``index`` (0..31) of an extended L2 entry + bitmap.  Whether
    the entry has a host cluster is :func:`cluster_type`'s rule (offset 0 with COPIED is
    a host cluster in an external data file)."""
    t = cluster_type(entry, extended=True, has_data_file=has_data_file)
    if t == ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED if bitmap == 0 else SubclusterType.INVALID
    alloc = bitmap >> index & 1
    zero = bitmap >> (SUBCLUSTERS_PER_CLUSTER + index) & 1
    has_host = t == ClusterType.NORMAL
    if alloc and zero:
        return SubclusterType.INVALID
    if zero:
        return SubclusterType.ZERO_ALLOC if has_host else SubclusterType.ZERO_PLAIN
    if alloc:
        return SubclusterType.NORMAL if has_host else SubclusterType.INVALID
    return SubclusterType.UNALLOCATED_ALLOC if has_host else SubclusterType.UNALLOCATED_PLAIN


def subcluster_mask(lo: int, hi: int) -> int:
    """The allocation-bit mask of subclusters lo..hi-1 (0 <= lo <= hi <= 32)."""
    return ((1 << hi) - 1) ^ ((1 << lo) - 1)


def bitmap_with_alloc(bitmap: int, mask: int) -> int:
    """``bitmap`` with the subclusters of allocation mask ``mask`` allocated (their zero
    bits cleared: a subcluster is never both)."""
    return (bitmap | mask) & ~(mask << SUBCLUSTERS_PER_CLUSTER) & (
        L2_BITMAP_ALL_ALLOC | L2_BITMAP_ALL_ZERO)


def bitmap_with_zero(bitmap: int, mask: int) -> int:
    """``bitmap`` with the subclusters of allocation mask ``mask`` reading as zeros
    (their allocation bits cleared)."""
    return (bitmap | mask << SUBCLUSTERS_PER_CLUSTER) & ~mask & (
        L2_BITMAP_ALL_ALLOC | L2_BITMAP_ALL_ZERO)


def bitmap_conflicts(bitmap: int) -> int:
    """Subclusters marked both allocated and zero (non-zero means a corrupt bitmap)."""
    return bitmap >> SUBCLUSTERS_PER_CLUSTER & bitmap


def compressed_layout(cluster_bits: int) -> tuple[int, int]:
    """(offset bits x, sector-count mask) of a compressed descriptor: x = 62-(cluster_bits-8)."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << (cluster_bits - 8)) - 1


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte length to read) of a compressed cluster descriptor.

    The length is (nb_csectors + 1) * 512 minus the offset's position in its sector,
    per the spec; it may extend past the compressed data (trailing bytes are ignored)."""
    x, mask = compressed_layout(cluster_bits)
    desc = entry & ((1 << 62) - 1)
    host = desc & ((1 << x) - 1)
    nb_csectors = (desc >> x) & mask
    return host, (nb_csectors + 1) * 512 - (host & 511)


def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
    """Indices of the host clusters a compressed cluster descriptor's bytes touch (each
    holds one reference for it)."""
    host, length = decode_compressed(entry, cluster_bits)
    return range((host & ~511) >> cluster_bits, ((host + length - 1) >> cluster_bits) + 1)


def encode_compressed(host: int, length: int, cluster_bits: int) -> int:
    """Descriptor for ``length`` compressed bytes at ``host`` (COMPRESSED flag set)."""
    x, mask = compressed_layout(cluster_bits)
    nb = (host + length - 1) // 512 - host // 512
    if nb > mask or host >> x:
        raise ValueError("compressed cluster does not fit a descriptor")
    return QCOW_OFLAG_COMPRESSED | (nb << x) | host


#: each byte value -> 0 (zero) or 1 (non-zero): :class:`TableBreaks`' masks, found with find
_NONZERO = bytes(1) + b"\x01" * 255
#: (values, entries) -> :func:`lanes` of a whole table, made once
_LANES: dict[tuple[tuple[int, ...], int], tuple[int, ...]] = {}


def lanes(values: tuple[int, ...], n: int, full: int) -> tuple[int, ...]:
    """Each of ``values`` (u64) repeated in lanes, as one big integer (entry ``j`` in bits
    64j..64j+63; the same in either byte order), for the ``n`` masked entries of an L2
    table of ``full``: a table used up to a quarter gets ``n`` lanes made for it alone;
    any other the whole table's, made once and kept, which an AND cuts to its ``n``
    entries (a caller that adds one cuts it itself)."""
    m = n if 4 * n < full else full
    got = _LANES.get((values, m)) if m == full else None
    if got is None:
        got = tuple(int.from_bytes(v.to_bytes(8, "little") * m, "little") for v in values)
        if m == full:
            _LANES[(values, m)] = got
    return got


class TableBreaks:
    """Where a standard L2 table's entries break a run, for the whole table at once (a
    few big-integer and bytes operations over its bytes, each made when first needed, no
    Python work per entry): bytes masks, 8 per entry, searched with ``find(1)``.

    The first non-zero byte ``b`` of a mask at or after ``8 * (j - d)`` makes entry
    ``(b >> 3) + d`` the first from ``j`` on that is not what the raw run expects: not
    zero (:meth:`nonzero`, ``d`` 0: a run of zero entries), not equal to its predecessor
    (:meth:`same`, ``d`` 1: a run of equal entries), or, COPIED aside, not its predecessor
    plus ``cs`` (:meth:`stepped`, ``d`` 1: host-contiguous runs).  None for
    :meth:`stepped` when an entry that is not compressed has a reserved bit of 56-61 set
    (adding ``cs`` could carry into a flag): that run is :func:`lookup`'s.

    ``table``: the table's bytes, big-endian as on disk (``big``, the checker's) or a
    decoded table (:func:`diskimg.qcow2.cache.be_u64_table`, the L2 cache's)."""

    __slots__ = ("buf", "n", "cs", "full", "order", "x", "_nonzero", "_same", "_stepped")

    def __init__(self, table: memoryview | bytes, cs: int, big: bool = False) -> None:
        from diskimg.hostio.file import trailing_zeros  # (loaded with the table cache)

        buf = memoryview(table).cast("B")
        # only the entries up to the last non-zero one, and one zero entry after it (the
        # break that ends the last run) are in the masks: a break searched past them is
        # not found, which is right, every entry there being zero as its predecessor
        n = len(buf) // 8
        used = min(n, n - trailing_zeros(buf) // 8 + 1)
        self.buf, self.n, self.cs, self.full = buf[: 8 * used], used, cs, n
        self.order: Literal["big", "little"] = \
            "big" if big or not HOST_LITTLE_ENDIAN else "little"
        self.x: int | None = None
        self._nonzero: bytes | None = None
        self._same: bytes | None = None
        self._stepped: bytes | None = None

    def value(self) -> int:
        """The table as one integer: entry ``j`` in bits 64j..64j+63 (little-endian),
        or in bits 64(n-1-j).. (big-endian)."""
        if self.x is None:
            self.x = int.from_bytes(self.buf, self.order)
        return self.x

    def _mask(self, here: int, nxt: int) -> bytes:
        """Per entry ``j``: whether lane ``j`` of ``here`` differs from lane ``j + 1``
        of ``nxt`` (the next entry's lane in either byte order)."""
        size = 8 * self.n
        if self.order == "little":
            return (here ^ (nxt >> 64)).to_bytes(size, "little").translate(_NONZERO)
        # (the first entry's lane of nxt << 64 goes past the table: cut off)
        return (here ^ (nxt << 64)).to_bytes(size + 8, "big")[8:].translate(_NONZERO)

    def nonzero(self) -> bytes:
        if self._nonzero is None:
            self._nonzero = bytes(self.buf).translate(_NONZERO)
        return self._nonzero

    def same(self) -> bytes:
        if self._same is None:
            x = self.value()
            self._same = self._mask(x, x)
        return self._same

    def stepped(self) -> bytes | None:
        if self._stepped is None:
            n = self.n
            # cs, bits 0-62 (all but COPIED), bits 56-61 and bit 62 (COMPRESSED)
            step, flagless, reserved, compressed = lanes(
                (self.cs, (1 << 63) - 1, 0x3F << 56, 1 << 62), n, self.full)
            if n < self.full:
                step &= (1 << (64 * n)) - 1  # (added, not ANDed: cut to the n lanes)
            x = self.value()
            bad = x & reserved
            if bad and bad & ~(((x & compressed) >> 6) * 0x3F):  # (compressed: 56-61)
                self._stepped = b""
            else:
                x &= flagless  # (lanes below 2**63: adding cs carries into no other)
                self._stepped = self._mask(x + step, x)
        return self._stepped or None
