"""Emptying a qcow2 image after ``commit`` (QEMU's ``bdrv_make_empty``): every guest
cluster is dropped so the image reads entirely from its backing file.

Works on a :class:`HostFile` plus a parsed :class:`Header` of an image nobody else has
open.  Write ordering follows QEMU: new structures are written and synced before the
header points at them; clusters are freed only after nothing on disk refers to them.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from diskimg.qcow2 import entries as E
from diskimg.qcow2 import header_io
from diskimg.qcow2.amend_header import nb_bitmaps
from diskimg.qcow2.entries import be_u64_array, pack_be_u64_array
from diskimg.qcow2.cluster import clear_unknown_autoclear
from diskimg.qcow2.layout import (
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_CRYPT_LUKS,
    Header,
)
from diskimg.qcow2.refcount import RefBlock, Refcounts, refblock_entries

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

__all__ = ["make_empty"]


def make_empty(host: Host, h: Header, data_host: Host | None = None) -> None:
    """Drop every guest cluster of the image so it reads entirely from its backing file.

    A v3 image without snapshots, bitmaps, LUKS or data file is rebuilt from scratch as
    QEMU does (header, one-cluster refcount table, one refcount block, zeroed L1 table,
    file truncated after it); any other image has every active L2 entry cleared and its
    clusters freed (shared L2 tables are copied first).  ``data_host`` is the image's
    external data file (opened writable): the clusters the cleared entries held there are
    deallocated, as qemu's full discard does."""
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    clear_unknown_autoclear(host, h)
    # header, refcount table and one refcount block, then the L1 table, all counted by
    # that one block
    if (h.version >= 3 and not h.nb_snapshots and not nb_bitmaps(h)
            and 3 + l1_clusters <= refblock_entries(cs, h.refcount_order)
            and h.crypt_method != QCOW_CRYPT_LUKS
            and not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE):
        _make_completely_empty(host, h, l1_clusters)
    else:
        _discard_all(host, h, data_host)


def _make_completely_empty(host: Host, h: Header, l1_clusters: int) -> None:
    cs = h.cluster_size
    # mark dirty: until the new refcounts are in place the old ones are wrong
    dirty = h.version >= 3 and not h.incompatible_features & QCOW2_INCOMPAT_DIRTY
    if dirty:
        header_io.set_incompat(host, h.incompatible_features | QCOW2_INCOMPAT_DIRTY)
        host.flush()
    host.pwrite(h.l1_table_offset, bytes(l1_clusters * cs))
    host.pwrite(cs, bytes((2 + l1_clusters) * cs))
    host.flush()
    header_io.set_tables(host, l1_offset=3 * cs, reftable_offset=cs, reftable_clusters=1)
    host.flush()
    # refcount table entry 0: the block in cluster 2
    host.pwrite(cs, pack_be_u64_array(array("Q", [2 * cs])))
    host.flush()
    blk = RefBlock(h.refcount_order, bytes(cs))
    blk.fill(0, 3 + l1_clusters, 1)
    host.pwrite(2 * cs, blk.pack())
    host.flush()
    if dirty:
        header_io.set_incompat(host, h.incompatible_features)
        host.flush()
    host.truncate((3 + l1_clusters) * cs)
    host.flush()
    h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters = 3 * cs, cs, 1


def _free_entry(rc: Refcounts, host: Host, ent: int, cb: int, extended: bool,
                data_file: bool, data_host: Host | None) -> None:
    """Drop the reference an L2 entry holds (data, zero-allocated or compressed).  The
    clusters of an external data file carry no refcount: there the host cluster is only
    deallocated in ``data_host`` (when given)."""
    if data_file:
        t = E.cluster_type(ent, extended=extended, has_data_file=True)
        if data_host is not None and t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
            data_host.punch_hole(ent & E.L2E_OFFSET_MASK, 1 << cb)
        return
    t = E.cluster_type(ent, extended=extended, has_data_file=False)
    if t == E.ClusterType.COMPRESSED:
        for c in E.compressed_host_clusters(ent, cb):
            rc.update(c, -1)
        return
    off = ent & E.L2E_OFFSET_MASK
    if off and rc.update(off >> cb, -1) == 0:
        host.punch_hole(off, 1 << cb)


def _discard_all(host: Host, h: Header, data_host: Host | None) -> None:
    """qemu's full discard of every active cluster of the disk (v2, snapshots, bitmaps,
    ...).  Like qemu's, it covers the disk only: what the active L1 table maps past its
    end (a snapshot's VM state that ``snapshot -a`` copied there) stays."""
    cs, cb = h.cluster_size, h.cluster_bits
    disk_clusters = -(-h.size // cs)
    extended = h.extended_l2
    data_file = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
    rc = Refcounts(host, h)
    l1 = be_u64_array(host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table"))
    step = 2 if extended else 1
    per = cs // (8 * step)  # L2 entries per table
    freed_tables: list[int] = []
    for i in range(min(len(l1), -(-disk_clusters // per))):
        l2_off = l1[i] & E.L1E_OFFSET_MASK
        if not l2_off:
            continue
        ents = be_u64_array(host.pread_exact(l2_off, cs, "L2 table"))
        used = step * min(per, disk_clusters - i * per)  # the entries inside the disk
        if not l1[i] & E.QCOW_OFLAG_COPIED:
            # shared with a snapshot: give the active image its own copy first
            new_off = rc.alloc(1)
            rc.flush()
            host.flush()
            host.pwrite(new_off, pack_be_u64_array(ents))
            host.flush()
            l1[i] = new_off | E.QCOW_OFLAG_COPIED
            host.pwrite(h.l1_table_offset + 8 * i, pack_be_u64_array(l1[i:i + 1]))
            host.flush()
            freed_tables.append(l2_off)
            l2_off = new_off
        old = array("Q", ents)
        changed = False
        for j in range(0, used, step):
            if ents[j] or (extended and ents[j + 1]):
                ents[j] = 0
                if extended:
                    ents[j + 1] = 0
                changed = True
        if changed:
            host.pwrite(l2_off, pack_be_u64_array(ents))
            host.flush()
            for j in range(0, used, step):
                if old[j]:
                    _free_entry(rc, host, old[j], cb, extended, data_file, data_host)
    for off in freed_tables:
        rc.update(off >> cb, -1)
    rc.flush()
    host.flush()
