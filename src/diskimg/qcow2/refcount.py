"""Refcounts: the refcount table, refcount blocks of every width, and cluster allocation.

Allocation is QEMU's: the first run of free clusters at or after ``free_cluster_index``.
A new refcount block is placed at the first free cluster; when the refcount table is full
it is grown into fresh clusters at the end of the image (new blocks first, then the table),
written and synced before the header switches to it.  Invariant: a refcount block and the
table entry that points at it reach the disk before anything relies on them.
"""

from __future__ import annotations

import struct

from diskimg.errors import CorruptImageError, UsageError
from diskimg.hostio import all_zero
from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import TableCache, be_u64_table, pack_be_u64_array, u64_zeros
from diskimg.qcow2.layout import QCOW_MAX_REFTABLE_SIZE, Header
from diskimg.qcow2.refblock import REFT_OFFSET_MASK as REFT_OFFSET_MASK  # the codec, re-
from diskimg.qcow2.refblock import _narrow_pos  # exported (check imports it alone)
from diskimg.qcow2.refblock import decode_refblock as decode_refblock
from diskimg.qcow2.refblock import encode_refblock as encode_refblock
from diskimg.qcow2.refblock import max_refcount as max_refcount
from diskimg.qcow2.refblock import refblock_entries as refblock_entries
from diskimg.qcow2.refblock import refcount_typecode as refcount_typecode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.hostio.host import Host


class _Again(Exception):
    """QEMU's ``-EAGAIN`` from refcount-block allocation: refcount metadata was just
    allocated, so the caller must search for free clusters again."""


def refcount_metadata_clusters(clusters: int, cs: int, refcount_order: int,
                               generous: bool = False) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) needed to count ``clusters`` clusters
    plus those blocks and table clusters themselves: the fixed point of QEMU's
    ``qcow2_refcount_metadata_size``.  ``generous`` adds half the table size to
    ``clusters`` once, as QEMU's ``generous_increase`` does.  The one copy of this rule
    (allocation, create and ``measure`` use it)."""
    per_block = refblock_entries(cs, refcount_order)
    per_table_cluster = cs // 8
    blocks = table = 0
    while True:
        nb = -(-(clusters + blocks + table) // per_block)
        nt = -(-nb // per_table_cluster)
        if (nb, nt) == (blocks, table):
            if generous:
                clusters += -(-nt // 2)
                generous = False
                continue
            return blocks, table
        blocks, table = nb, nt


def refcount_blocks_for(clusters: int, cs: int, refcount_order: int,
                        generous: bool = False) -> int:
    """The refcount blocks of :func:`refcount_metadata_clusters`."""
    return refcount_metadata_clusters(clusters, cs, refcount_order, generous)[0]


def refcount_order_of(bits: int) -> int:
    """The refcount order of a ``refcount_bits`` option value: a power of two from 1 to
    64 (orders 0..6); any other width is refused with qemu's message."""
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    return bits.bit_length() - 1


class RefBlock:
    """One refcount block of ``1 << order`` bit entries (order 0..6), get/set by index.

    Byte-or-wider entries are held decoded (:func:`decode_refblock`); narrower ones stay
    packed in a bytearray and are read/written in place by the rule of ``_narrow_pos``."""

    __slots__ = ("data", "order")

    def __init__(self, order: int, raw: bytes) -> None:
        self.order = order
        if order >= 3:
            self.data: memoryview | bytearray = decode_refblock(raw, order)
        else:
            self.data = bytearray(raw)

    def __getitem__(self, i: int) -> int:
        if self.order >= 3:
            return self.data[i]
        byte, shift, mask = _narrow_pos(i, self.order)
        return (self.data[byte] >> shift) & mask

    def __setitem__(self, i: int, v: int) -> None:
        if self.order >= 3:
            self.data[i] = v
            return
        byte, shift, mask = _narrow_pos(i, self.order)
        b = self.data[byte]
        self.data[byte] = (b & ~(mask << shift)) | ((v & mask) << shift)

    def first_used(self, lo: int, hi: int) -> int:
        """Index of the first non-zero entry in [lo, hi), else ``hi`` (C-speed scan for
        byte-or-wider entries)."""
        if self.order >= 3:
            seg = self.data[lo:hi]
            if all_zero(seg):
                return hi
            for k, v in enumerate(seg):
                if v:
                    return lo + k
            return hi  # pragma: no cover - count said there is a non-zero entry
        for i in range(lo, hi):
            if self[i]:
                return i
        return hi

    def count_used(self, n: int) -> int:
        """Number of non-zero entries among the first ``n``."""
        if isinstance(self.data, memoryview):  # (order >= 3)
            return n - self.data[:n].tolist().count(0)
        return sum(1 for i in range(n) if self[i])

    def fill(self, lo: int, hi: int, value: int) -> None:
        """Set entries [lo, hi) to ``value`` (one slice assignment for wide entries)."""
        if hi <= lo:
            return
        if isinstance(self.data, memoryview):  # (order >= 3)
            fmt = refcount_typecode(self.order)
            self.data[lo:hi] = memoryview(struct.pack("=" + fmt, value) * (hi - lo)).cast(fmt)
            return
        for i in range(lo, hi):
            self[i] = value

    def pack(self) -> bytes:
        if isinstance(self.data, memoryview):  # (order >= 3)
            return encode_refblock(self.data, self.order)
        return bytes(self.data)


class Refcounts:
    """Refcount table + block cache + allocator for one image file."""

    def __init__(self, host: Host, header: Header, cache_tables: int = 32) -> None:
        self.host = host
        self.header = header
        cs = header.cluster_size
        self.cs = cs
        self.cluster_bits = header.cluster_bits
        self.order = header.refcount_order
        self.max_refcount = max_refcount(self.order)
        self.block_bits = header.cluster_bits + 3 - self.order  # log2(entries per block)
        raw = host.pread_exact(header.refcount_table_offset,
                               header.refcount_table_clusters * cs, "refcount table")
        # a native view, not an ``array`` (whose import loads ``collections``): a writer
        # of a small image does not load them (start-up, issue 20)
        self.table = be_u64_table(raw)
        self.blocks: TableCache[RefBlock] = TableCache(
            host, cs, lambda b: RefBlock(self.order, b), cache_tables, "refcount block")
        self.free_cluster_index = 0
        self.free_byte_offset = 0  # where the next compressed cluster may go (alloc_bytes)

    # --- reading ---------------------------------------------------------------------
    def _block_offset(self, ri: int) -> int:
        if ri >= len(self.table):
            return 0
        off = self.table[ri] & REFT_OFFSET_MASK
        if off and off % self.cs:
            raise CorruptImageError(
                f"Refcount block offset {off:#x} in refcount table entry {ri} is not cluster "
                "aligned", offset=self.header.refcount_table_offset + 8 * ri)
        return off

    def get(self, cluster: int) -> int:
        """Refcount of host cluster index ``cluster`` (0 past the table's coverage)."""
        off = self._block_offset(cluster >> self.block_bits)
        if not off:
            return 0
        return self.blocks.get(off)[cluster & ((1 << self.block_bits) - 1)]

    def count_used(self, end: int, limit: int) -> int:
        """How many of host clusters [0, end) have a non-zero refcount, counted one
        refcount block at a time and stopping once ``limit`` is reached."""
        bb = self.block_bits
        count = 0
        for ri in range(min(len(self.table), -(-end >> bb))):
            if count >= limit:
                break
            off = self._block_offset(ri)
            if off:
                n = min(1 << bb, end - (ri << bb))
                count += self.blocks.get(off).count_used(n)
        return count

    # --- updating --------------------------------------------------------------------
    def _check_value(self, cluster: int, value: int) -> None:
        if not 0 <= value <= self.max_refcount:
            raise CorruptImageError(f"Refcount of cluster {cluster} would overflow "
                                    f"({value} > {self.max_refcount})")

    def _block_for(self, cluster: int) -> int:
        """Offset of the refcount block covering ``cluster``, created first when missing
        (retried until no more refcount metadata had to be allocated)."""
        for _ in range(64):
            try:
                return self._ensure_block(cluster)
            except _Again:
                continue
        raise CorruptImageError("Refcount block allocation does not converge")  # pragma: no cover

    def set(self, cluster: int, value: int) -> None:
        """Set the refcount of host cluster ``cluster`` (creating its block if needed)."""
        self._check_value(cluster, value)
        off = self._block_for(cluster)
        self.blocks.get(off)[cluster & ((1 << self.block_bits) - 1)] = value
        self.blocks.mark_dirty(off)

    def update(self, cluster: int, delta: int) -> int:
        new = self.get(cluster) + delta
        if new < 0:
            raise CorruptImageError(f"Refcount of cluster {cluster} would become negative",
                                    offset=cluster * self.cs)
        self.set(cluster, new)
        if new == 0:
            if cluster < self.free_cluster_index:
                self.free_cluster_index = cluster
            if self.free_byte_offset and (self.free_byte_offset - 1) // self.cs == cluster:
                self.free_byte_offset = 0  # never append compressed data to a freed cluster
        return new

    def find_free(self, n: int, before: int = -1) -> int:
        """First cluster index of a run of ``n`` free clusters at or after
        ``free_cluster_index`` (refcounts not changed).  Scans whole refcount blocks at a
        time; a cluster no refcount block covers is free.  With ``before`` >= 0 the scan
        stops there: -1 when no such run starts before cluster ``before``."""
        c = self.free_cluster_index
        run = 0
        start = c
        bb = self.block_bits
        while run < n:
            if run == 0 and 0 <= before <= c:
                return -1
            ri = c >> bb
            base = ri << bb
            lim = min(1 << bb, c - base + (n - run))  # never look past what is needed
            off = self._block_offset(ri)
            k = self.blocks.get(off).first_used(c - base, lim) if off else lim
            if k > c - base:
                if run == 0:
                    start = c
                run += k - (c - base)
            if k < lim:  # a used cluster: the run starts again after it
                run = 0
                c = base + k + 1
            else:
                c = base + lim
        return start

    def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (QEMU's order: the first free run at or after
        ``free_cluster_index``); returns the host byte offset.

        Refcounts are set one refcount block at a time.  When a refcount block (or a
        bigger refcount table) had to be made on the way, the clusters set so far are
        released and the search starts again from the same place -- QEMU's ``-EAGAIN``
        loop -- because the new metadata may have taken part of the run."""
        for _ in range(1 << 16):
            start = self.find_free(n)
            self.free_cluster_index = start + n
            try:
                self._alloc_run(start, start + n)
            except _Again:
                continue
            return start * self.cs
        raise CorruptImageError("Cluster allocation does not converge")  # pragma: no cover

    def alloc_at(self, first: int, n: int) -> None:
        """Take the free clusters [first, first + n) (QEMU's ``alloc_clusters_at`` for a
        range whose refcount blocks exist, e.g. right after :meth:`refcount_area`)."""
        for _ in range(64):
            try:
                self._alloc_run(first, first + n)
                return
            except _Again:
                continue
        raise CorruptImageError("Cluster allocation does not converge")  # pragma: no cover

    def alloc_free_at(self, first: int, n: int) -> int:
        """QEMU's ``alloc_clusters_at``: take the free clusters from ``first`` on, at most
        ``n``, up to the first used one; returns how many (0 when ``first`` is used).
        ``free_cluster_index`` is not moved."""
        for _ in range(64):
            k = 0
            while k < n and self.get(first + k) == 0:
                k += 1
            if not k:
                return 0
            try:
                self._alloc_run(first, first + k)
            except _Again:  # new refcount metadata may have taken part of the run
                continue
            return k
        raise CorruptImageError("Cluster allocation does not converge")  # pragma: no cover

    def _alloc_run(self, first: int, end: int) -> None:
        """Set the refcount of the free clusters [first, end) to 1; raises ``_Again`` (with
        the run's refcounts back at 0) after creating refcount metadata."""
        bb = self.block_bits
        c = first
        while c < end:
            try:
                off = self._ensure_block(c)
            except _Again:
                self.free_cluster_index = min(self.free_cluster_index, first)
                self._fill(first, c, 0)
                raise
            base = (c >> bb) << bb
            stop = min(end, base + (1 << bb))
            self.blocks.get(off).fill(c - base, stop - base, 1)
            self.blocks.mark_dirty(off)
            c = stop

    def _fill(self, first: int, end: int, value: int) -> None:
        """Set the refcounts of [first, end) (whose blocks exist) to ``value``."""
        bb = self.block_bits
        c = first
        while c < end:
            base = (c >> bb) << bb
            stop = min(end, base + (1 << bb))
            off = self._block_offset(c >> bb)
            self.blocks.get(off).fill(c - base, stop - base, value)
            self.blocks.mark_dirty(off)
            c = stop

    def alloc_bytes(self, size: int) -> int:
        """Byte-granular allocation for one compressed cluster (QEMU's alloc_bytes).

        Consecutive compressed clusters are packed into shared host clusters; every host
        cluster's refcount counts the compressed clusters overlapping it, so the range
        may later be freed with :meth:`free`.  Returns the host byte offset.
        """
        cs = self.cs
        if not 0 < size <= cs:
            raise ValueError("compressed size must be between 1 and the cluster size")
        off = self.free_byte_offset
        if off and off % cs and self.get(off // cs) >= self.max_refcount:
            off = 0
        for _ in range(64):
            if not off or off % cs == 0 or cs - off % cs < size:
                start = self.find_free(-(-size // cs)) * cs
                if not off or -(-off // cs) * cs != start:
                    off = start
            last = (off + size - 1) // cs
            # reserve first, so a refcount block allocated below never lands on this range
            self.free_cluster_index = max(self.free_cluster_index, last + 1)
            try:
                for c in range(off // cs, last + 1):
                    self._ensure_block(c)
            except _Again:
                off = 0
                continue
            for c in range(off // cs, last + 1):
                self.update(c, 1)
            self.free_byte_offset = off + size
            return off
        raise CorruptImageError("Cluster allocation does not converge")  # pragma: no cover

    def free(self, host_offset: int, length: int) -> None:
        """Drop one reference from every cluster overlapping [host_offset, +length)."""
        first = host_offset // self.cs
        last = (host_offset + length - 1) // self.cs
        for c in range(first, last + 1):
            self.update(c, -1)

    # --- new refcount blocks and table growth ----------------------------------------
    def _write_table_entry(self, ri: int) -> None:
        self.host.pwrite(self.header.refcount_table_offset + 8 * ri,
                         struct.pack(">Q", self.table[ri]))

    def _ensure_block(self, cluster: int) -> int:
        """Offset of the refcount block covering ``cluster``; if there is none, make one
        the way QEMU does and raise ``_Again`` (the caller searches again).

        The new block goes to the first free cluster.  If that cluster is in the range
        the block covers, the block counts itself; otherwise its own cluster is counted
        first (which may make another block).  If the refcount table has no entry for
        it, a new table is built by :meth:`refcount_area` at the first cluster of the
        refcount-block range after both the needed cluster and the new block."""
        ri = cluster >> self.block_bits
        off = self._block_offset(ri)
        if off:
            return off
        loc = self.find_free(1)
        self.free_cluster_index = loc + 1
        if loc == 0:
            raise CorruptImageError("Preventing invalid allocation of refcount block at "
                                    "offset 0")
        blk = RefBlock(self.order, bytes(self.cs))
        if loc >> self.block_bits == ri:
            blk[loc & ((1 << self.block_bits) - 1)] = 1  # the block describes itself
        else:
            try:
                self._alloc_run(loc, loc + 1)
            except _Again:
                self.free_cluster_index = min(self.free_cluster_index, loc)
                raise
            self.blocks.flush()  # refcount of the new block's own cluster first
        self.host.pwrite(loc * self.cs, blk.pack())
        self.host.flush()
        self.blocks.put(loc * self.cs, blk, dirty=False)
        if ri < len(self.table):
            self.table[ri] = loc * self.cs
            self._write_table_entry(ri)
            self.host.flush()
            raise _Again
        per_block = 1 << self.block_bits
        blocks_used = -(-max(cluster + 1, loc + 1) // per_block)
        self.refcount_area(blocks_used * per_block, 0, exact=False, new_index=ri,
                           new_block=loc * self.cs)
        raise _Again

    def _max_table_index(self) -> int:
        for i in range(len(self.table) - 1, -1, -1):
            if self.table[i]:
                return i
        return 0

    def refcount_area(self, start: int, additional: int, *, exact: bool,
                      new_index: int = 0, new_block: int = 0) -> int:
        """Build a new refcount table (and the refcount blocks missing up to its end) at
        host cluster ``start``, big enough to count the clusters before ``start`` plus
        ``additional`` more (with 50% headroom unless ``exact``) -- QEMU's
        ``qcow2_refcount_area``.  ``new_block`` (if set) is hooked in at ``new_index``.

        The new blocks come first, then the table; all of them count themselves.  The
        header is switched to the new table after it is written and synced, then the
        old table's clusters are freed.  Returns the first cluster after the area."""
        cs = self.cs
        per_block = 1 << self.block_bits
        per_table_cluster = cs // 8
        total = refcount_blocks_for(start + additional, cs, self.order, generous=not exact)
        area_index = start // per_block
        table_size = total if exact else total + -(-total // 2)
        table_size = -(-table_size // per_table_cluster) * per_table_cluster
        table_clusters = table_size * 8 // cs
        if table_size * 8 > QCOW_MAX_REFTABLE_SIZE:
            raise CorruptImageError("Refcount table would exceed the maximum size (8 MiB); "
                                    "image too large for this cluster size")
        new_table = u64_zeros(table_size)
        keep = min(table_size, self._max_table_index() + 1, len(self.table))
        new_table[:keep] = self.table[:keep]
        if new_block:
            new_table[new_index] = new_block
        additional_blocks = sum(1 for i in range(area_index, total) if not new_table[i])
        table_at = start + additional_blocks
        end = table_at + table_clusters
        nxt = start
        for i in range(area_index, total):
            if new_table[i]:
                off = new_table[i] & REFT_OFFSET_MASK
                blk = self.blocks.get(off)
            else:
                off = nxt * cs
                blk = RefBlock(self.order, bytes(cs))
                self.blocks.put(off, blk)
                new_table[i] = off
                nxt += 1
            first = i * per_block
            if first < end:
                lo = max(start, first) - first
                hi = min(end - first, per_block)
                blk.fill(lo, hi, 1)
            self.blocks.mark_dirty(off)
        self.blocks.flush()
        self.host.pwrite(table_at * cs, pack_be_u64_array(new_table))
        self.host.flush()
        header_io.set_refcount_table(self.host, table_at * cs, table_clusters)
        self.host.flush()
        old_off = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.header.refcount_table_offset = table_at * cs
        self.header.refcount_table_clusters = table_clusters
        self.table = new_table
        self.free(old_off, old_clusters * cs)
        return end

    def flush(self) -> None:
        self.blocks.flush()
