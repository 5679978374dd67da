"""``amend -o refcount_bits=``: rebuild the refcount structures at a new entry width.

Every cluster's refcount is computed from the current structures, a new refcount table
and new blocks of the new width are written after the end of the file, then one header
write switches table and width together and the old structures are dropped.  The
sizes come from :func:`~diskimg.qcow2.refcount.refcount_metadata_clusters` and the block
bytes from :class:`~diskimg.qcow2.refcount.RefBlock`: no width arithmetic here.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from diskimg.errors import UsageError
from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import pack_be_u64_array
from diskimg.qcow2.layout import (
    HDR_AUTOCLEAR_FEATURES,
    HDR_COMPATIBLE_FEATURES,
    HDR_INCOMPATIBLE_FEATURES,
    HDR_NB_SNAPSHOTS,
    HDR_REFCOUNT_ORDER,
    HDR_REFCOUNT_TABLE_CLUSTERS,
    HDR_REFCOUNT_TABLE_OFFSET,
    HDR_SNAPSHOTS_OFFSET,
    Header,
)
from diskimg.qcow2.refcount import (
    REFT_OFFSET_MASK,
    RefBlock,
    Refcounts,
    max_refcount,
    refblock_entries,
    refcount_metadata_clusters,
)

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

__all__ = ["check_refcount_width", "counts_after_rebuild", "rebuild_refcounts"]


def counts_after_rebuild(host: Host, h: Header) -> list[int]:
    """Every host cluster's refcount (up to the end of the file) once the current
    refcount table and blocks are dropped, as :func:`rebuild_refcounts` carries them
    over."""
    cs, cb = h.cluster_size, h.cluster_bits
    old = Refcounts(host, h)
    counts = [old.get(c) for c in range(-(-host.size() // cs))]
    # old refcount structures are freed after the switch
    old_structs = [h.refcount_table_offset >> cb]
    old_structs += [h.refcount_table_offset // cs + k
                    for k in range(1, h.refcount_table_clusters)]
    for ent in old.table:
        off = ent & REFT_OFFSET_MASK
        if off:
            old_structs.append(off >> cb)
    for c in old_structs:
        if c < len(counts):
            counts[c] = max(0, counts[c] - 1)
    return counts


def check_refcount_width(counts: list[int], new_order: int, cluster_size: int) -> None:
    """Refuse a width too narrow for a refcount in ``counts`` (before any write), naming
    the first such cluster as qemu does."""
    top = max_refcount(new_order)
    for c, v in enumerate(counts):
        if v > top:
            raise UsageError(f"Cannot decrease refcount entry width to {1 << new_order} "
                             f"bits: Cluster at offset {c * cluster_size:#x} has a "
                             f"refcount of {v}")


def rebuild_refcounts(host: Host, h: Header, new_order: int) -> None:
    """Change the refcount width: compute every cluster's refcount (from the current
    structures), write a new table and new blocks of the new width at the end of the file,
    switch the header to them, then free the old structures."""
    cs = h.cluster_size
    counts = counts_after_rebuild(host, h)
    check_refcount_width(counts, new_order, cs)
    end_cluster = len(counts)
    per_block = refblock_entries(cs, new_order)
    start = end_cluster
    # blocks + table covering every cluster including themselves
    nblocks, ntable = refcount_metadata_clusters(start, cs, new_order)
    counts.extend([0] * (start + nblocks + ntable - len(counts)))
    for c in range(start, start + nblocks + ntable):
        counts[c] = 1
    table = array("Q", [0] * (ntable * cs // 8))
    for b in range(nblocks):
        blk = RefBlock(new_order, bytes(cs))
        base = b * per_block
        for k in range(per_block):
            if base + k < len(counts) and counts[base + k]:
                blk[k] = counts[base + k]
        host.pwrite((start + b) * cs, blk.pack())
        table[b] = (start + b) * cs
    host.pwrite((start + nblocks) * cs, pack_be_u64_array(table))
    host.flush()
    h.refcount_order = new_order
    h.refcount_table_offset = (start + nblocks) * cs
    h.refcount_table_clusters = ntable
    # one write switches table and width together (bytes 48..100): a crash between two
    # writes would make qemu read the new blocks at the old width (B11)
    header_io.write_fields(
        host, (HDR_REFCOUNT_TABLE_OFFSET, h.refcount_table_offset),
        (HDR_REFCOUNT_TABLE_CLUSTERS, h.refcount_table_clusters),
        (HDR_NB_SNAPSHOTS, h.nb_snapshots), (HDR_SNAPSHOTS_OFFSET, h.snapshots_offset),
        (HDR_INCOMPATIBLE_FEATURES, h.incompatible_features),
        (HDR_COMPATIBLE_FEATURES, h.compatible_features),
        (HDR_AUTOCLEAR_FEATURES, h.autoclear_features), (HDR_REFCOUNT_ORDER, h.refcount_order))
    host.flush()
