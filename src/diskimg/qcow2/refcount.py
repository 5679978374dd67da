"""Refcounts: the refcount table, refcount blocks of every width, and cluster allocation.

Allocation is QEMU's: the first run of free clusters at or after ``free_cluster_index``.
A new refcount block is placed at the first free cluster; when the refcount table is full
it is grown into fresh clusters at the end of the image (new blocks first, then the table),
written and synced before the header switches to it.  Invariant: a refcount block and the
table entry that points at it reach the disk before anything relies on them.
"""

from __future__ import annotations

import struct
import sys
from array import array

from diskimg.errors import CorruptImageError
from diskimg.hostio import HostFile
from diskimg.qcow2.cache import TableCache, be_u64_array, pack_be_u64_array
from diskimg.qcow2.layout import QCOW_MAX_REFTABLE_SIZE, Header

_LITTLE = sys.byteorder == "little"
_WIDE = {3: "B", 4: "H", 5: "I", 6: "Q"}
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


class RefBlock:
    """One refcount block of ``1 << order`` bit entries (order 0..6)."""

    __slots__ = ("data", "order")

    def __init__(self, order: int, raw: bytes) -> None:
        self.order = order
        if order >= 3:
            a = array(_WIDE[order], raw)
            if _LITTLE and order > 3:
                a.byteswap()
            self.data: array[int] | bytearray = a
        else:
            self.data = bytearray(raw)

    def __getitem__(self, i: int) -> int:
        if self.order >= 3:
            return self.data[i]
        bits = 1 << self.order
        per = 8 // bits
        return (self.data[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)

    def __setitem__(self, i: int, v: int) -> None:
        if self.order >= 3:
            self.data[i] = v
            return
        bits = 1 << self.order
        per = 8 // bits
        shift = (i % per) * bits
        mask = ((1 << bits) - 1) << shift
        b = self.data[i // per]
        self.data[i // per] = (b & ~mask) | ((v << shift) & mask)

    def first_used(self, lo: int, hi: int) -> int:
        """Index of the first non-zero entry in [lo, hi), else ``hi`` (C-speed scan for
        byte-or-wider entries)."""
        if self.order >= 3:
            seg = self.data[lo:hi]
            if seg.count(0) == len(seg):
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
        if isinstance(self.data, array):
            return n - self.data[:n].count(0)
        return sum(1 for i in range(n) if self[i])

    def fill(self, lo: int, hi: int, value: int) -> None:
        """Set entries [lo, hi) to ``value`` (one slice assignment for wide entries)."""
        if hi <= lo:
            return
        if isinstance(self.data, array):
            self.data[lo:hi] = array(self.data.typecode, [value]) * (hi - lo)
            return
        for i in range(lo, hi):
            self[i] = value

    def pack(self) -> bytes:
        if self.order > 3 and _LITTLE:
            assert isinstance(self.data, array)
            a = array(self.data.typecode, self.data)
            a.byteswap()
            return a.tobytes()
        if isinstance(self.data, array):
            return self.data.tobytes()
        return bytes(self.data)


class Refcounts:
    """Refcount table + block cache + allocator for one image file."""

    def __init__(self, host: HostFile, header: Header, cache_tables: int = 32) -> None:
        self.host = host
        self.header = header
        cs = header.cluster_size
        self.cs = cs
        self.cluster_bits = header.cluster_bits
        self.order = header.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.block_bits = header.cluster_bits + 3 - self.order  # log2(entries per block)
        raw = host.pread_exact(header.refcount_table_offset,
                               header.refcount_table_clusters * cs, "refcount table")
        self.table = be_u64_array(raw)
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
    def set(self, cluster: int, value: int) -> None:
        if not 0 <= value <= self.max_refcount:
            raise CorruptImageError(f"Refcount of cluster {cluster} would overflow "
                                    f"({value} > {self.max_refcount})")
        ri = cluster >> self.block_bits
        off = self._block_offset(ri)
        if not off:
            self._new_block(ri, depth=0)
            off = self._block_offset(ri)
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

    def find_free(self, n: int) -> int:
        """First cluster index of a run of ``n`` free clusters at or after
        ``free_cluster_index`` (refcounts not changed).  Scans whole refcount blocks at a
        time; a cluster no refcount block covers is free."""
        c = self.free_cluster_index
        run = 0
        start = c
        bb = self.block_bits
        while run < n:
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
        ``free_cluster_index``); returns the host byte offset.  Refcounts are set one
        refcount block at a time; a block needed on the way is created in cluster order,
        exactly as setting them one by one would."""
        start = self.find_free(n)
        self.free_cluster_index = start + n
        self._set_run(start, start + n, 1)
        return start * self.cs

    def _set_run(self, first: int, end: int, value: int) -> None:
        """Set the refcount of clusters [first, end) to ``value`` (creating refcount blocks
        as needed, in cluster order)."""
        if not 0 <= value <= self.max_refcount:
            raise CorruptImageError(f"Refcount of cluster {first} would overflow "
                                    f"({value} > {self.max_refcount})")
        bb = self.block_bits
        c = first
        while c < end:
            ri = c >> bb
            off = self._block_offset(ri)
            if not off:
                self._new_block(ri, depth=0)
                off = self._block_offset(ri)
            base = ri << bb
            stop = min(end, base + (1 << bb))
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
        if not off or off % cs == 0 or cs - off % cs < size:
            start = self.find_free(-(-size // cs)) * cs
            if not off or -(-off // cs) * cs != start:
                off = start
        last = (off + size - 1) // cs
        # reserve first, so a refcount block allocated below never lands on this range
        self.free_cluster_index = max(self.free_cluster_index, last + 1)
        for c in range(off // cs, last + 1):
            self.update(c, 1)
        self.free_byte_offset = off + size
        return off

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

    def _new_block(self, ri: int, depth: int) -> None:
        if depth > 8:
            raise CorruptImageError("Refcount block allocation does not converge")
        if ri >= len(self.table):
            self._grow_table(ri)
            return
        loc = self.find_free(1)
        self.free_cluster_index = loc + 1
        lri = loc >> self.block_bits
        blk = RefBlock(self.order, bytes(self.cs))
        if lri == ri:
            blk[loc & ((1 << self.block_bits) - 1)] = 1  # the block describes itself
        else:
            if not self._block_offset(lri):
                self._new_block(lri, depth + 1)
            self.set(loc, 1)
        self.blocks.flush()  # refcounts of the new block's own cluster, if elsewhere
        self.host.pwrite(loc * self.cs, blk.pack())
        self.host.flush()
        self.table[ri] = loc * self.cs
        self._write_table_entry(ri)
        self.blocks.put(loc * self.cs, blk, dirty=False)
        self.free_cluster_index = max(self.free_cluster_index, loc + 1)

    def _grow_table(self, ri: int) -> None:
        """Move the refcount table to new clusters at the end, big enough for entry ``ri``."""
        cs = self.cs
        old_off = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        start = max(-(-self.host.size() // cs), self.free_cluster_index)
        while self.get(start):
            start += 1
        per_block = 1 << self.block_bits
        nb_blocks = 0
        table_clusters = old_clusters
        for _ in range(64):
            area_end = start + nb_blocks + table_clusters
            need = {ri}
            for bi in range(start // per_block, (area_end - 1) // per_block + 1):
                if not self._block_offset(bi):
                    need.add(bi)
            entries = max(max(need) + 1, len(self.table))
            new_tc = max(old_clusters, -(-entries * 8 // cs))
            new_tc += new_tc // 2  # headroom, like QEMU's growth
            if len(need) == nb_blocks and new_tc <= table_clusters:
                break
            nb_blocks, table_clusters = len(need), max(table_clusters, new_tc)
        else:
            raise CorruptImageError("Refcount table growth does not converge")
        if table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
            raise CorruptImageError("Refcount table would exceed the maximum size (8 MiB); "
                                    "image too large for this cluster size")
        need_sorted = sorted(need)
        new_blocks = {bi: RefBlock(self.order, bytes(cs)) for bi in need_sorted}
        block_loc = {bi: start + k for k, bi in enumerate(need_sorted)}
        table_start = start + len(need_sorted)
        self.blocks.flush()
        for c in range(start, table_start + table_clusters):
            bi = c >> self.block_bits
            if bi in new_blocks:
                new_blocks[bi][c & (per_block - 1)] = 1
            else:
                self.set(c, 1)
        self.blocks.flush()
        for bi, blk in new_blocks.items():
            self.host.pwrite(block_loc[bi] * cs, blk.pack())
        table = array("Q", self.table)
        table.extend([0] * (table_clusters * cs // 8 - len(table)))
        for bi in need_sorted:
            table[bi] = block_loc[bi] * cs
        self.host.pwrite(table_start * cs, pack_be_u64_array(table))
        self.host.flush()
        self.host.pwrite(48, struct.pack(">QI", table_start * cs, table_clusters))
        self.host.flush()
        self.header.refcount_table_offset = table_start * cs
        self.header.refcount_table_clusters = table_clusters
        self.table = table
        for bi, blk in new_blocks.items():
            self.blocks.put(block_loc[bi] * cs, blk, dirty=False)
        self.free_cluster_index = max(self.free_cluster_index, table_start + table_clusters)
        self.free(old_off, old_clusters * cs)

    def flush(self) -> None:
        self.blocks.flush()
