"""``amend -o compat=`` and ``lazy_refcounts=``: upgrade a v2 header to v3, downgrade a v3
one to v2 (expanding zero clusters, which v2 cannot express), and set the lazy-refcounts
compatible bit.

Works on a :class:`HostFile` plus a parsed :class:`Header` of an image nobody else has
open.  The header is rewritten whole through :mod:`.amend_header`; new clusters are
written and synced before a table points at them.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from diskimg.errors import UsageError
from diskimg.qcow2 import entries as E
from diskimg.qcow2.amend_header import read_header, set_feature_bits, write_header
from diskimg.qcow2.entries import be_u64_array, pack_be_u64_array
from diskimg.qcow2.layout import (
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Header,
    pack_feature_table,
)
from diskimg.qcow2.refcount import Refcounts

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

__all__ = [
    "LAZY_NEEDS_V3",
    "check_downgradable",
    "downgrade_to_v2",
    "expand_zero_clusters",
    "set_lazy_refcounts",
    "upgrade_to_v3",
]

#: refcount order v2 implies (16-bit refcounts)
V2_REFCOUNT_ORDER = 4

LAZY_NEEDS_V3 = ("Lazy refcounts only supported with compatibility level 1.1 and above "
                 "(use compat=1.1 or greater)")


def check_downgradable(h: Header) -> None:
    """Refuse what a v2 header cannot express (before ``amend`` writes anything)."""
    if h.refcount_order != V2_REFCOUNT_ORDER:
        raise UsageError("compat=0.10 requires refcount_bits=16")
    if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
        raise UsageError("Cannot downgrade an image with a data file")
    bad = h.incompatible_features & ~(QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_DIRTY)
    if bad:
        raise UsageError(f"Cannot downgrade an image with incompatible features {bad:#x} set")
    if h.compression_type != 0:
        # qemu-img 7.2 downgrades and silently loses the compression type; refuse instead
        raise UsageError("Cannot downgrade an image with incompatible features "
                         f"{QCOW2_INCOMPAT_COMPRESSION:#x} set")


def downgrade_to_v2(host: Host, h: Header) -> None:
    """compat=0.10: refuse what v2 cannot express, expand zero clusters, rewrite the
    header as version 2 (no feature table, no v3 fields)."""
    check_downgradable(h)
    expand_zero_clusters(host, h)
    h2 = read_header(host)
    h2.version = 2
    h2.header_length = V2_HEADER_LENGTH
    h2.incompatible_features = h2.compatible_features = h2.autoclear_features = 0
    h2.refcount_order = V2_REFCOUNT_ORDER
    h2.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, None)
    h2.compression_type = 0
    write_header(host, h2)
    h.version, h.header_length = 2, V2_HEADER_LENGTH
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    h.extensions = h2.extensions


def upgrade_to_v3(host: Host, h: Header) -> None:
    """compat=1.1: a v3 header with the feature-name table (as qemu writes it)."""
    h2 = read_header(host)
    h2.version = 3
    h2.header_length = V3_HEADER_LENGTH + 8
    h2.refcount_order = V2_REFCOUNT_ORDER
    if h2.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE) is None and h2.cluster_size >= 8192:
        h2.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, pack_feature_table())
    write_header(host, h2)
    h.version, h.header_length, h.extensions = 3, h2.header_length, h2.extensions


def _l1_tables(host: Host, h: Header) -> list[array[int]]:
    """The active L1 table, then every snapshot's (through the snapshot-table codec)."""
    tables = [be_u64_array(host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table"))]
    if h.nb_snapshots:
        from diskimg.qcow2.snapshot import QCOW_MAX_SNAPSHOTS_SIZE, read_entries

        snaps = read_entries(host, h.snapshots_offset, h.nb_snapshots,
                             QCOW_MAX_SNAPSHOTS_SIZE)
        tables += [be_u64_array(host.pread_exact(sn.l1_table_offset, sn.l1_size * 8,
                                                 "snapshot L1 table")) for sn in snaps]
    return tables


def expand_zero_clusters(host: Host, h: Header) -> None:
    """Replace every zero cluster (active and snapshot tables) by an explicit cluster of
    zeros.  A zero-allocated cluster keeps its host cluster, written with zeros, when
    only its L2 table refers to it; one that another table (a snapshot) still reads is
    left alone and the entry gets its own cluster of zeros (or none without a backing
    file), so the snapshot keeps its data (qemu 7.2 zeroes the shared cluster)."""
    cs, cb = h.cluster_size, h.cluster_bits
    rc = Refcounts(host, h)
    backed = h.backing_file is not None
    data_file = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
    done: dict[int, array[int]] = {}
    released: list[tuple[int, int]] = []
    for l1 in _l1_tables(host, h):
        for i in range(len(l1)):
            l2_off = l1[i] & E.L1E_OFFSET_MASK
            if not l2_off or l2_off in done:
                continue
            ents = be_u64_array(host.pread_exact(l2_off, cs, "L2 table"))
            changed = False
            for j, ent in enumerate(ents):
                t = E.cluster_type(ent, extended=h.extended_l2, has_data_file=data_file)
                if t == E.ClusterType.ZERO_ALLOC:
                    off = ent & E.L2E_OFFSET_MASK
                    l2_ref = rc.get(l2_off >> cb)
                    if rc.get(off >> cb) <= l2_ref:
                        # only this L2 table refers to the cluster: zero it in place
                        host.pwrite(off, bytes(cs))
                        ents[j] = off | (E.QCOW_OFLAG_COPIED if l2_ref == 1 else 0)
                        changed = True
                        continue
                    # another table (a snapshot) still reads the cluster's data: qemu 7.2
                    # zeroes it in place and destroys that data.  Give this entry its
                    # own zeros instead and drop its references to the shared cluster
                    # once the L2 table no longer points at it.
                    released.append((off, l2_ref))
                    if not backed:
                        ents[j] = 0
                        changed = True
                        continue
                    t = E.ClusterType.ZERO_PLAIN
                if t == E.ClusterType.ZERO_PLAIN:
                    if not backed:
                        ents[j] = 0  # unallocated reads as zeros without a backing file
                        changed = True
                        continue
                    l2_ref = rc.get(l2_off >> cb)
                    off = rc.alloc(1)
                    if l2_ref > 1:
                        # referenced once per table sharing this L2 table
                        rc.set(off >> cb, l2_ref)
                    rc.flush()
                    host.flush()
                    host.pwrite(off, bytes(cs))
                    ents[j] = off | (E.QCOW_OFLAG_COPIED if l2_ref == 1 else 0)
                    changed = True
            if changed:
                rc.flush()
                host.flush()
                host.pwrite(l2_off, pack_be_u64_array(ents))
                host.flush()
            for off, n in released:
                rc.update(off >> cb, -n)
            released.clear()
            done[l2_off] = ents
    rc.flush()
    host.flush()


def set_lazy_refcounts(host: Host, h: Header, on: bool) -> None:
    """Set or clear the lazy-refcounts compatible bit (v3 only; a v2 image has no
    compatible-feature field, so clearing there writes nothing)."""
    if on:
        if h.version < 3:
            raise UsageError(LAZY_NEEDS_V3)
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
    else:
        h.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
    if h.version >= 3:
        set_feature_bits(host, h)
