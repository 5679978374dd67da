"""qcow2's tables: pure codecs for L1/L2 entries and compressed-cluster descriptors,
:class:`TableBreaks` (where a whole L2 table's entries break a run: the map's and the
checker's), the one byte-order codec of every table (:func:`be_table`,
:func:`pack_be_table`), and :class:`TableCache`, the write-back LRU cache of cluster-sized
metadata tables.  (One module, not two: every command that reads a table needs both, and
a module costs its import: start-up, issue 20; :mod:`diskimg.qcow2.cache` re-exports the
table codec and cache by their old module.)

Bit layouts from docs/interop/qcow2.txt; names from QEMU's qcow2.h.

Invariant of the cache (QEMU's cache dependency): before any table of a cache is written
to disk, ``before_write()`` runs; the L2 cache passes the refcount cache's flush there, so
a cluster is never referenced on disk before its refcount is.  Tables are written in
offset order.
"""

from __future__ import annotations

import struct
import sys

from diskimg.hostio.file import trailing_zeros, zero_run

#: the byte order of ``memoryview.cast`` words: the tables are big-endian on disk
HOST_LITTLE_ENDIAN = sys.byteorder == "little"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections import OrderedDict
    from collections.abc import Callable
    from typing import Any, Generic, Literal, Protocol, TypeVar

    from diskimg.hostio.host import Host

    class Table(Protocol):
        def pack(self) -> bytes: ...

    T = TypeVar("T", bound=Table)
    #: the formats of qcow2's unsigned table words: 1, 2, 4 and 8 bytes
    Word = Literal["B", "H", "I", "Q"]
else:  # typing is for the type checker: not imported at run time (start-up).  There,
    # ``Generic[T]`` is ``object``: a one-entry mapping, so that no class is built for it
    T = None
    Generic = {T: object}

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


def first_masked(table: memoryview | array[int], i: int, last: int, mask: int) -> int:
    """The first ``k`` in ``[i, last)`` with ``table[k] & mask`` (``table``: native u64
    entries, an L1 table), else ``last``.  Runs of zero entries are passed over by
    ``zero_run`` (memcmp), then blocks from the first non-zero entry, growing from 8
    entries to 4096, are tested as big integers (no Python work per entry, no more memory
    than a 32 KiB block): a 16 TiB image's L1 table of 32768 mostly empty entries costs
    a few memcmp passes, not 32768 steps.  Lane ``j`` of a block's integer is its entry
    ``j`` in either byte order, the mask being laid out as the entries are."""
    words = memoryview(table)
    k, block = i, 8
    while k < last:
        k += zero_run(words[k:last].cast("B"), word=8) // 8
        end = min(last, k + block)
        x = int.from_bytes(words[k:end].cast("B"), "little")
        x &= int.from_bytes(mask.to_bytes(8, sys.byteorder) * (end - k), "little")
        if x:
            return k + ((x & -x).bit_length() - 1) // 64
        k = end
        block = min(block * 8, 4096)
    return last


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

    The masks are made from ``lo``, the entry before the first non-zero one (``buf``, ``n``
    and :meth:`value` are of those), the zero head before it given its masks' known bytes.

    ``table``: the table's bytes, big-endian as on disk (``big``, the checker's) or a
    decoded table (:func:`be_u64_table`, the L2 cache's)."""

    __slots__ = ("buf", "lo", "n", "cs", "full", "order", "x", "_nonzero", "_same",
                 "_stepped")

    def __init__(self, table: memoryview | bytes, cs: int, big: bool = False) -> None:
        buf = memoryview(table).cast("B")
        # only the entries up to the last non-zero one, and one zero entry after it (the
        # break that ends the last run) are in the masks: a break searched past them is
        # not found, which is right, every entry there being zero as its predecessor
        n = len(buf) // 8
        used = min(n, n - trailing_zeros(buf) // 8 + 1)
        lo = max(0, zero_run(buf[: 8 * used], word=8) // 8 - 1)
        self.buf, self.lo, self.n = buf[8 * lo : 8 * used], lo, used - lo
        self.cs, self.full = cs, n
        self.order: Literal["big", "little"] = \
            "big" if big or not HOST_LITTLE_ENDIAN else "little"
        self.x: int | None = None
        self._nonzero: bytes | None = None
        self._same: bytes | None = None
        self._stepped: bytes | None = None

    def value(self) -> int:
        """The entries from ``lo`` as one integer: entry ``lo + j`` in bits 64j..64j+63
        (little-endian), or in bits 64(n-1-j).. (big-endian)."""
        if self.x is None:
            self.x = int.from_bytes(self.buf, self.order)
        return self.x

    def _mask(self, here: int, nxt: int, head: bytes = bytes(8)) -> bytes:
        """Per entry ``j``: whether lane ``j`` of ``here`` differs from lane ``j + 1``
        of ``nxt`` (the next entry's lane in either byte order), after ``head`` (the
        mask of one entry of the zero head) for each entry before ``lo``."""
        size = 8 * self.n
        if self.order == "little":
            mask = (here ^ (nxt >> 64)).to_bytes(size, "little").translate(_NONZERO)
        else:  # (the first entry's lane of nxt << 64 goes past the table: cut off)
            mask = (here ^ (nxt << 64)).to_bytes(size + 8, "big")[8:].translate(_NONZERO)
        return head * self.lo + mask if self.lo else mask

    def nonzero(self) -> bytes:
        if self._nonzero is None:
            self._nonzero = bytes(8 * self.lo) + bytes(self.buf).translate(_NONZERO)
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
                # (in the zero head each entry plus cs differs from the next in cs's bytes)
                head = self.cs.to_bytes(8, self.order).translate(_NONZERO)
                self._stepped = self._mask(x + step, x, head)
        return self._stepped or None


# --- the tables' byte order and their cache --------------------------------------------
#: bytes of tables byte-swapped without ``array`` (on a little-endian host) before the
#: module is imported: importing it (and the ``collections`` package its initialisation
#: loads) costs about 1.8 ms of CPU, a swap of a full 64 KiB table without it about
#: 0.1 ms (with it 6 us).  So a small image's map or check never imports it, and a big
#: walk pays the import once, after eight full tables (issue 20: start-up).  A table's
#: zero tail is not swapped, nor counted (:func:`be_table`).
PURE_SWAP_BYTES = 8 << 16
_pure_left = PURE_SWAP_BYTES


def swap_pure(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """Each word of ``buf`` (of the size of ``typecode``: ``"H"``, ``"I"`` or ``"Q"``)
    byte-reversed, as a writable native view of that format, with bytes and memoryview
    operations only: the whole buffer reversed (words in reverse order, each one's bytes
    swapped), then the words put back in order."""
    rev = bytearray(buf)
    rev.reverse()
    return memoryview(bytearray(memoryview(rev).cast(typecode)[::-1])).cast(typecode)


def _swapped_array(buf: bytes | bytearray | memoryview, typecode: Word) -> array[int]:
    from array import array

    a = array(typecode)
    a.frombytes(buf)
    a.byteswap()
    return a


def swap_array(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """:func:`swap_pure` by ``array.byteswap`` (a view of the array)."""
    return memoryview(_swapped_array(buf, typecode))


def _swap(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    global _pure_left
    if _pure_left > 0 and "array" not in sys.modules:
        _pure_left -= len(buf)  # (a race between threads only changes which swap runs)
        return swap_pure(buf, typecode)
    return swap_array(buf, typecode)


def be_table(buf: bytes | bytearray | memoryview, typecode: Word) -> memoryview:
    """Big-endian unsigned words (``typecode`` ``"B"``, ``"H"``, ``"I"`` or ``"Q"``: 1, 2,
    4 or 8 bytes) → a writable native memoryview of that format: ``t[i]``, ``t[i] = v``,
    ``len(t)``, slices (views: copy with ``.tolist()`` or :func:`u64_copy` what must not
    change).  The one decode of qcow2's tables (L1, L2, refcount table, refcount blocks
    of byte-or-wider entries); :func:`pack_be_table` is its inverse."""
    if typecode == "B" or not HOST_LITTLE_ENDIAN:
        return memoryview(bytearray(buf)).cast(typecode)
    start, used = _swap_used(buf, typecode)
    n = len(buf)
    if used.nbytes == n:
        return used
    out = bytearray(n)  # (the zero head and tail)
    out[start : start + used.nbytes] = used.cast("B")
    return memoryview(out).cast(typecode)


def _swap_used(buf: bytes | bytearray | memoryview, typecode: Word) -> tuple[int, memoryview]:
    """The words of ``buf`` from its first to its last non-zero one, byte-swapped: (the
    first one's byte offset, a new native memoryview of ``typecode``); (``len(buf)``,
    empty) when ``buf`` is all zeros.  The zero head and tail (most of a sparse image's
    tables) are zero in either byte order, so neither the decode nor the encode swaps
    them (a 64 KiB table with a few entries: a few memcmp passes instead of a
    byte-reversal of every word); each puts them back its own way (the one rule of both)."""
    n = len(buf)
    size = struct.calcsize(typecode)
    used = -(-(n - trailing_zeros(buf)) // size) * size
    if not used:
        return n, memoryview(b"").cast(typecode)
    start = zero_run(memoryview(buf).cast("B")[:used], word=size)
    if start == 0 and used == n:
        return 0, _swap(buf, typecode)
    return start, _swap(memoryview(buf)[start:used], typecode)


def be_u64_table(buf: bytes | bytearray | memoryview) -> memoryview:
    """:func:`be_table` of u64 entries (an L1, L2 or refcount table)."""
    return be_table(buf, "Q")


_WORDS: dict[int, Word] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def pack_be_table(t: array[int] | memoryview) -> bytes:
    """A native table (``array`` or :func:`be_table`'s view, of any of its formats) → its
    big-endian bytes (as in :func:`be_table`, only the words from the first non-zero one
    to the last are swapped: :func:`_swap_used`)."""
    mv = memoryview(t)
    raw = mv.cast("B")
    if mv.itemsize == 1 or not HOST_LITTLE_ENDIAN:
        return raw.tobytes()
    start, used = _swap_used(raw, _WORDS[mv.itemsize])
    # (the zero head and tail: no zeroed copy of the whole table)
    return b"".join((bytes(start), used.cast("B"))).ljust(len(raw), b"\0")


#: the u64 tables' name for it
pack_be_u64_array = pack_be_table


def u64_copy(table: memoryview | array[int]) -> memoryview:
    """A copy of a native u64 table (or ``array("Q")``), as :func:`be_u64_table` makes."""
    return memoryview(bytearray(memoryview(table).cast("B"))).cast("Q")


def u64_zeros(n: int) -> memoryview:
    """A table of ``n`` zero entries."""
    return memoryview(bytearray(8 * n)).cast("Q")


def u64_run(first: int, n: int, step: int) -> memoryview:
    """The ``n`` native u64 values ``first, first + step, ...`` (read-only), to compare
    with, or assign to, a slice of a table."""
    if not step:
        return memoryview(struct.pack("=Q", first) * n).cast("Q")
    return memoryview(struct.pack(f"={n}Q", *range(first, first + n * step, step))).cast("Q")


def be_u64_array(buf: bytes) -> array[int]:
    """:func:`be_u64_table` as an ``array("Q")``, for the tables that use ``array``'s
    methods (a writer's refcount table, the amend passes, create, snapshot L1 tables).
    (``array``, and the ``collections`` package it imports, load with the first one:
    not for ``info``, ``map`` or ``check``.)"""
    if HOST_LITTLE_ENDIAN:
        return _swapped_array(buf, "Q")
    from array import array

    a = array("Q")
    a.frombytes(buf)
    return a


class L2Table:
    """One L2 table: ``entries`` as native u64 (extended L2: entry, bitmap pairs), a
    :func:`be_u64_table` view."""

    __slots__ = ("entries",)

    def __init__(self, entries: memoryview) -> None:
        self.entries = entries

    def pack(self) -> bytes:
        return pack_be_u64_array(self.entries)


class TableCache(Generic[T]):
    """Cache of tables keyed by host offset.  ``load(bytes)`` builds a table."""

    def __init__(self, host: Host, table_size: int, load: Callable[[bytes], T],
                 capacity: int, what: str) -> None:
        self.host = host
        self.table_size = table_size
        self.load = load
        self.capacity = max(2, capacity)
        self.what = what
        #: least recently used first: a plain dict (insertion order), a table used again
        #: moves to the end by being taken out and put back (the C ``OrderedDict`` would
        #: load the ``_collections`` module with every image that reads a table)
        self.tables: dict[int, T] = {}
        self.dirty: set[int] = set()
        self.before_write: Callable[[], None] | None = None

    def get(self, offset: int) -> T:
        tables = self.tables
        t = tables.get(offset)
        if t is not None:
            tables[offset] = tables.pop(offset)
            return t
        data = self.host.pread_exact(offset, self.table_size, self.what)
        t = self.load(data)
        self._insert(offset, t)
        return t

    def put(self, offset: int, table: T, dirty: bool = True) -> None:
        """Insert a new (e.g. freshly allocated) table."""
        self._insert(offset, table)
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _insert(self, offset: int, table: T) -> None:
        self.tables.pop(offset, None)
        self.tables[offset] = table  # (the newest: at the end)
        if len(self.tables) > self.capacity:
            self._evict()

    def _evict(self) -> None:
        # never the newest entry: the caller is about to use (and maybe dirty) it
        for off in list(self.tables)[:-1]:
            if len(self.tables) <= self.capacity:
                return
            if off not in self.dirty:
                del self.tables[off]
        if len(self.tables) > self.capacity:
            self.flush()
            while len(self.tables) > self.capacity:
                del self.tables[next(iter(self.tables))]  # the least recently used

    def flush(self) -> None:
        """Write every dirty table (after ``before_write``)."""
        if not self.dirty:
            return
        if self.before_write is not None:
            self.before_write()
        for off in sorted(self.dirty):
            t = self.tables.get(off)
            if t is not None:
                self.host.pwrite(off, t.pack())
        self.dirty.clear()

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()


def l2_table_cache(host: Host, cs: int,
                   before_write: Callable[[], None] | None) -> TableCache[L2Table]:
    """An image's L2 table cache (16 MiB of tables, 64 to 32768 of them); a read-write
    image passes its refcount flush as ``before_write``."""
    cache = TableCache(host, cs, lambda b: L2Table(be_u64_table(b)),
                       min(32768, max(64, (16 << 20) // cs)), "L2 table")
    cache.before_write = before_write
    return cache


def new_lru() -> OrderedDict[Any, Any]:
    """An empty LRU map: CPython's C ``OrderedDict`` (which ``collections`` re-exports)
    from its extension module, so that the ``collections`` package, its classes and the
    operator, keyword and reprlib modules it imports are not loaded (issue 20: start-up)."""
    if TYPE_CHECKING:
        from collections import OrderedDict
    else:
        try:
            from _collections import OrderedDict
        except ImportError:  # (another interpreter)
            from collections import OrderedDict
    return OrderedDict()
