"""qcow2 internal snapshots: create/apply/delete (the table records are in
:mod:`diskimg.qcow2.snapshot_table`, re-exported here).

Each snapshot owns a copy of the L1 table; L2 tables and data clusters are shared with
the active image by reference counting.  Invariants kept by every operation:
- refcount increments reach the disk before any table that relies on them, decrements
  only after the table that dropped the reference is on disk (crash: leaks only);
- QCOW_OFLAG_COPIED is set in active L1/L2 entries exactly when the refcount is 1.

qemu-img check counts a COPIED/refcount mismatch as a corruption in *both* directions,
and a snapshot create or delete moves shared clusters across refcount 1, so no order of
in-place writes of L2 tables and refcount blocks is crash safe (qemu 7.2 has that window).
Create and delete therefore write every table they change to fresh clusters (the active
L1 table, the active L2 tables whose COPIED bits change, the refcount blocks whose counts
change, the refcount table and the snapshot table) and switch to all of them with one
32-byte header write (:meth:`SnapshotTable._switch`): a crash before it leaves the old
image plus leaked clusters, after it the new image, without leaks.
"""

from __future__ import annotations

import builtins
from array import array
from collections import defaultdict

from diskimg import progname
from diskimg.errors import CorruptImageError, UsageError
from diskimg.hostio.names import raw_name
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import L2Table, be_u64_array, pack_be_u64_array, u64_copy
from diskimg.qcow2.layout import QCOW_MAX_SNAPSHOTS
from diskimg.qcow2.refcount import RefBlock
from diskimg.qcow2.snapshot_table import (
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS_SIZE,
    EntryHeader,
    Snapshot,
    c_bytes,
    pack_table,
    pack_table_exact,
    parse_table,
    read_entries,
    read_table,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.metadata import MetadataImage

__all__ = ["QCOW_MAX_SNAPSHOTS_SIZE", "QCOW_MAX_SNAPSHOT_EXTRA_DATA", "EntryHeader", "Snapshot",
           "SnapshotNotFoundError", "SnapshotTable", "c_bytes", "pack_table", "pack_table_exact",
           "parse_table", "raw_name", "read_entries", "read_table"]

class SnapshotTable:
    """``img.snapshots``: list, create, apply and delete internal snapshots."""

    def __init__(self, img: MetadataImage) -> None:
        self.img = img

    def list(self) -> list[Snapshot]:
        """A copy of the snapshot table in on-disk order (what ``snapshot -l`` lists)."""
        self.img.check_open()
        return list(self.img.snapshot_list)

    def find(self, name_or_id: str) -> Snapshot:
        """By id first, then by name (qemu's find_snapshot_by_id_or_name)."""
        self.img.check_open()
        for s in self.img.snapshot_list:
            if s.id == name_or_id:
                return s
        for s in self.img.snapshot_list:
            if s.name == name_or_id:
                return s
        raise SnapshotNotFoundError(name_or_id)

    # --- helpers ---------------------------------------------------------------------
    def _check_table_read(self) -> None:
        """Refuse to change snapshots when the table could not be read (an image opened
        for check): a rewrite would drop the entries that were not understood."""
        err = self.img.snapshot_table_error
        if err is not None:
            raise type(err)(f"The snapshot table is damaged ({err}); run "
                            f"'{progname.name()} check -r all' first", offset=err.offset)

    def _read_l1(self, offset: int, size: int) -> array[int]:
        img = self.img
        if offset % img.cs:
            raise CorruptImageError(f"Snapshot L1 table offset {offset:#x} invalid",
                                    offset=offset)
        return be_u64_array(img.host.pread_exact(offset, size * 8, "snapshot L1 table"))

    def update_refcounts(self, l1: array[int] | memoryview, addend: int, active: bool) -> bool:
        """QEMU's update_snapshot_refcount: add ``addend`` to every L2 table and data
        cluster ``l1`` reaches and recompute OFLAG_COPIED in the L2 entries and in ``l1``.
        Returns True if ``l1`` changed.  L2 tables go through the image's cache."""
        img = self.img
        rc = img.refcounts
        changed = False
        step = 2 if img.extended else 1
        for i in range(len(l1)):
            l2_off = l1[i] & E.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % img.cs:
                raise CorruptImageError(f"L2 table offset {l2_off:#x} in L1 entry {i} is "
                                        "not cluster aligned")
            table = img.l2_cache.get(l2_off)
            ents = table.entries
            dirty = False
            for j in range(0, len(ents), step):
                ent = ents[j]
                t = E.cluster_type(ent, extended=img.extended,
                                   has_data_file=img.has_data_file)
                if t == E.ClusterType.COMPRESSED:
                    if addend:
                        for c in E.compressed_host_clusters(ent, img.cb):
                            rc.update(c, addend)
                    continue
                host = ent & E.L2E_OFFSET_MASK
                if not host:
                    continue
                cnt = rc.update(host // img.cs, addend) if addend else rc.get(host // img.cs)
                if cnt == 0 and addend < 0:
                    img.data_host.punch_hole(host, img.cs)  # qemu's pass-discard-snapshot
                new = (ent | E.QCOW_OFLAG_COPIED) if cnt == 1 else (ent & ~E.QCOW_OFLAG_COPIED)
                if new != ent:
                    ents[j] = new
                    dirty = True
            if dirty:
                img.l2_cache.mark_dirty(l2_off)
            cnt = rc.update(l2_off // img.cs, addend) if addend else rc.get(l2_off // img.cs)
            if cnt == 0:
                img.l2_cache.drop(l2_off)  # freed: its cached copy must never be written
            new = (l1[i] | E.QCOW_OFLAG_COPIED) if cnt == 1 else (l1[i] & ~E.QCOW_OFLAG_COPIED)
            if new != l1[i]:
                l1[i] = new
                changed = True
                if active:
                    img.l1_dirty.add(i)
        return changed

    def _count_refs(self, l1: array[int] | memoryview, deltas: defaultdict[int, int],
                    addend: int) -> None:
        """Add ``addend`` to ``deltas`` (host cluster -> refcount change) for every L2
        table and data cluster ``l1`` reaches, as QEMU's update_snapshot_refcount would."""
        img = self.img
        cs = img.cs
        step = 2 if img.extended else 1
        for i in range(len(l1)):
            l2_off = l1[i] & E.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs:
                raise CorruptImageError(f"L2 table offset {l2_off:#x} in L1 entry {i} is "
                                        "not cluster aligned")
            deltas[l2_off // cs] += addend
            ents = img.l2_cache.get(l2_off).entries
            for j in range(0, len(ents), step):
                ent = ents[j]
                if ent & E.QCOW_OFLAG_COMPRESSED:
                    for c in E.compressed_host_clusters(ent, img.cb):
                        deltas[c] += addend
                elif ent & E.L2E_OFFSET_MASK:
                    deltas[(ent & E.L2E_OFFSET_MASK) // cs] += addend

    def _switch(self, deltas: defaultdict[int, int], snaps: builtins.list[Snapshot]) -> None:
        """Commit a snapshot operation atomically (see the module docstring).

        ``deltas`` are the refcount changes of the snapshot references the operation adds
        or drops; ``snaps`` is the new snapshot table (its L1 copies already on disk and
        allocated).  On return the header names a new active L1 table, refcount table
        and snapshot table in which OFLAG_COPIED is set exactly where the refcount is 1.
        Everything is flushed on entry and on return."""
        for _ in range(4):
            try:
                self._try_switch(defaultdict(int, deltas), snaps)
                return
            except _TableMoved:
                continue  # the refcount table grew while allocating: start again
        raise CorruptImageError("Snapshot update: the refcount table keeps moving")

    def _try_switch(self, d: defaultdict[int, int], snaps: builtins.list[Snapshot]) -> None:
        img = self.img
        rc = img.refcounts
        cs = img.cs
        h = img.header
        step = 2 if img.extended else 1
        rt_off, rt_clusters = h.refcount_table_offset, h.refcount_table_clusters
        allocated: builtins.list[tuple[int, int]] = []

        def alloc(n: int) -> int:
            off = rc.alloc(n)
            allocated.append((off, n))
            if (h.refcount_table_offset, h.refcount_table_clusters) != (rt_off, rt_clusters):
                for a_off, a_n in allocated:
                    rc.free(a_off, a_n * cs)
                img.flush_refcounts()
                raise _TableMoved
            return off

        def newref(c: int) -> int:
            return rc.get(c) + d.get(c, 0)

        # 1. the active L2 tables whose COPIED bits change get new copies
        new_l1 = array("Q", img.l1)
        shadows: dict[int, tuple[int, L2Table]] = {}
        for i in range(len(new_l1)):
            l2_off = new_l1[i] & E.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off in shadows:
                new_l1[i] = shadows[l2_off][0]
                d[shadows[l2_off][0] // cs] += 1
                d[l2_off // cs] -= 1
                continue
            ents = img.l2_cache.get(l2_off).entries
            changed: memoryview | None = None
            for j in range(0, len(ents), step):
                ent = ents[j]
                if ent & E.QCOW_OFLAG_COMPRESSED or not ent & E.L2E_OFFSET_MASK:
                    continue
                want = (ent | E.QCOW_OFLAG_COPIED) \
                    if newref((ent & E.L2E_OFFSET_MASK) // cs) == 1 \
                    else (ent & ~E.QCOW_OFLAG_COPIED)
                if want != ent:
                    if changed is None:
                        changed = u64_copy(ents)
                    changed[j] = want
            if changed is not None:
                t2 = alloc(1)
                shadows[l2_off] = (t2, L2Table(changed))
                d[l2_off // cs] -= 1
                new_l1[i] = t2
        for i in range(len(new_l1)):
            l2_off = new_l1[i] & E.L1E_OFFSET_MASK
            if l2_off:
                new_l1[i] = (l2_off | E.QCOW_OFLAG_COPIED) if newref(l2_off // cs) == 1 \
                    else l2_off
        # 2. new active L1 table, snapshot table and refcount table
        l1_off = h.l1_table_offset
        if new_l1 != img.l1:
            l1_clusters = -(-len(new_l1) * 8 // cs)
            l1_off = alloc(l1_clusters)
            for c in range(h.l1_table_offset // cs, h.l1_table_offset // cs + l1_clusters):
                d[c] -= 1
        table = pack_table(snaps)
        if len(table) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise UsageError("Snapshot table too large")
        snap_off = alloc(-(-len(table) // cs)) if snaps else 0
        old_table = len(pack_table(img.snapshot_list)) if img.snapshot_list else 0
        if old_table:
            for c in range(h.snapshots_offset // cs,
                           (h.snapshots_offset + old_table - 1) // cs + 1):
                d[c] -= 1
        new_rt = alloc(rt_clusters)
        for c in range(rt_off // cs, rt_off // cs + rt_clusters):
            d[c] -= 1
        # 3. every refcount block with a changed count gets a new copy
        blocks: dict[int, int] = {}
        while True:
            need = sorted({c >> rc.block_bits for c, v in d.items() if v} - blocks.keys())
            if not need:
                break
            for ri in need:
                old_b = rc._block_offset(ri)
                if not old_b:
                    raise CorruptImageError(f"Snapshot update: no refcount block for "
                                            f"refcount table entry {ri}",
                                            offset=rt_off + 8 * ri)
                blocks[ri] = alloc(1)
                d[old_b // cs] -= 1
        img.flush_refcounts()  # the allocations above, in place: leaks until the switch
        per_block = 1 << rc.block_bits
        new_blocks: dict[int, RefBlock] = {}
        for ri in blocks:
            new_blocks[ri] = RefBlock(rc.order, rc.blocks.get(rc._block_offset(ri)).pack())
        for c, v in d.items():
            if not v:
                continue
            blk = new_blocks[c >> rc.block_bits]
            val = blk[c & (per_block - 1)] + v
            if not 0 <= val <= rc.max_refcount:
                raise CorruptImageError(f"Refcount of cluster {c} would become {val}",
                                        offset=c * cs)
            blk[c & (per_block - 1)] = val
        rt = array("Q", rc.table)
        rt.extend([0] * (rt_clusters * cs // 8 - len(rt)))
        for ri, off in blocks.items():
            rt[ri] = off
        # 4. write the new tables, then switch the header to them in one write
        for t2, tbl in shadows.values():
            img.host.pwrite(t2, tbl.pack())
        if l1_off != h.l1_table_offset:
            img.host.pwrite(l1_off, pack_be_u64_array(new_l1))
        if snaps:
            img.host.pwrite(snap_off, table)
        for ri, off in blocks.items():
            img.host.pwrite(off, new_blocks[ri].pack())
        img.host.pwrite(new_rt, pack_be_u64_array(rt))
        img.host.flush()
        header_io.set_tables(img.host, l1_offset=l1_off, reftable_offset=new_rt,
                             reftable_clusters=rt_clusters, snapshots=(len(snaps), snap_off))
        img.host.flush()
        # 5. the in-memory image follows
        h.l1_table_offset, h.refcount_table_offset = l1_off, new_rt
        h.nb_snapshots, h.snapshots_offset = len(snaps), snap_off
        img.install_tables(new_l1, snaps, list(shadows.values()))
        img.punch_free_clusters([c for c, v in d.items() if v < 0])

    def _check_headroom(self, deltas: defaultdict[int, int]) -> None:
        """Refuse, before changing anything, when the references an operation adds
        (``deltas``, from :meth:`_count_refs`) would overflow the refcount width: qemu
        fails half-way there and leaks.  The count is exact: a host cluster that packs
        several compressed clusters gains one reference per L2 entry.  Every other
        cluster a snapshot update raises is freshly allocated (refcount 1)."""
        rc = self.img.refcounts
        for c, v in sorted(deltas.items()):
            if v > 0 and rc.get(c) + v > rc.max_refcount:
                raise UsageError(f"Refcount of cluster {c} would exceed the maximum "
                                 f"of {rc.max_refcount} ({rc.get(c)} + {v} references; "
                                 f"refcount_bits={self.img.header.refcount_bits})")

    # --- operations ------------------------------------------------------------------
    def create(self, name: str, *, date: float | None = None) -> Snapshot:
        """Snapshot the current disk state under ``name`` (id: highest numeric id + 1)."""
        img = self.img
        self._check_table_read()
        img.check_writable()
        size = len(raw_name(name, "Snapshot name"))
        if "\0" in name or size > 0xFFFF:
            raise UsageError("Snapshot names end at the first NUL byte and hold at most "
                             "65535 bytes (the snapshot table's name_size field)")
        # reason: qemu-img's words, the errno its driver returns (-EFBIG, -ENOTSUP)
        if len(img.snapshot_list) >= QCOW_MAX_SNAPSHOTS:
            raise UsageError(f"Too many snapshots (at most {QCOW_MAX_SNAPSHOTS})",
                             reason="-27 (File too large)")
        if img.has_data_file:
            raise UsageError("internal snapshots are not supported with an external data file",
                             reason="-95 (Operation not supported)")
        ids = [int(s.id) for s in img.snapshot_list if s.id.isdigit()]
        sid = str(max(ids, default=0) + 1)
        img.flush()
        deltas: defaultdict[int, int] = defaultdict(int)
        self._count_refs(img.l1, deltas, 1)
        self._check_headroom(deltas)
        img.begin_change()  # the first change: after every refusal
        # 1. copy of the active L1 table in new clusters (a leak until the switch)
        l1_bytes = len(img.l1) * 8
        l1_off = 0
        if l1_bytes:
            l1_off = img.refcounts.alloc(-(-l1_bytes // img.cs))
            img.flush_refcounts()
            img.host.pwrite(l1_off, pack_be_u64_array(img.l1))
        # 2. the snapshot's references and the table entry, switched to atomically; the
        # snapshot keeps the old L2 tables, the active image gets copies without COPIED
        from diskimg.reproducible import now as clock

        now = clock() if date is None else date
        sn = Snapshot(sid, name, l1_off, len(img.l1), int(now),
                      int(now % 1 * 1e9) // 1000 * 1000, 0, 0, img.size, 0)
        self._switch(deltas, [*img.snapshot_list, sn])
        return sn

    def upgrade_for_v3(self) -> bool:
        """Make the table valid for version 3 before ``amend -o compat=1.1`` switches the
        header (qemu's qcow2_upgrade): v3 requires every entry's extra data to hold the
        64-bit VM state size and the disk size.  If an entry has fewer than those 16
        bytes, the whole table is rewritten as QEMU writes it -- every entry with (at
        least) the 24 bytes QEMU defines, an unknown disk size as the current one, an
        unknown icount as -1 -- into new clusters; one header write switches to it, then
        the old table's clusters are freed (a crash leaks at most).  Returns True if the
        table was rewritten.  The new entries are valid in a v2 image too."""
        img = self.img
        old = img.snapshot_list
        if not any(s.extra_data_size < 16 for s in old):
            return False
        self._check_table_read()
        img.check_writable()
        img.flush()
        new = [s.replace(extra_data_size=max(24, s.extra_data_size),
                         disk_size=img.size if s.disk_size is None else s.disk_size)
               for s in old]
        table = pack_table_exact(new)
        if len(table) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise UsageError("Snapshot table too large")
        h = img.header
        rc = img.refcounts
        off = rc.alloc(-(-len(table) // img.cs))
        img.flush_refcounts()
        img.host.pwrite(off, table)
        img.host.flush()
        header_io.set_snapshots(img.host, len(new), off)
        img.host.flush()
        old_off, old_len = h.snapshots_offset, len(pack_table_exact(old))
        h.snapshots_offset = off
        img.install_snapshots(new)
        rc.free(old_off, old_len)
        img.flush_refcounts()
        img.punch_free_clusters(list(range(old_off // img.cs,
                                            (old_off + old_len - 1) // img.cs + 1)))
        return True

    def check_revertible(self) -> None:
        """Refuse any revert of this image before looking the snapshot up (qemu's
        order: an image with a persistent bitmap says so even for a missing snapshot)."""
        self._check_table_read()
        self.img.check_writable()
        if self.img.bitmaps.entries:
            # qemu refuses too (any persistent bitmap, enabled or not): reverting the
            # data would leave the bitmaps claiming to know what changed
            raise UsageError("Device has active dirty bitmaps")
        if self.img.has_data_file:  # qemu: -ENOTSUP from the driver's goto
            raise UsageError("internal snapshots are not supported with an external data "
                             "file", reason="Failed to load snapshot: Operation not supported")

    def apply(self, name_or_id: str) -> None:
        """Revert the disk to snapshot ``name_or_id`` (qemu-img snapshot -a)."""
        self.check_revertible()
        img = self.img
        sn = self.find(name_or_id)
        img.flush()
        snap_l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        # the snapshot's references are taken before the active image's are dropped
        adds: defaultdict[int, int] = defaultdict(int)
        self._count_refs(snap_l1, adds, 1)
        self._check_headroom(adds)
        img.begin_change()  # the first change: after every refusal
        if sn.disk_size is not None and sn.disk_size != img.size:
            # the disk was resized since (qemu 7.2 allows that): first back to the
            # snapshot's size, as qemu's snapshot goto truncates the image
            img.resize(sn.disk_size, shrink=True)
        if sn.l1_size > len(img.l1):
            img.grow_l1(sn.l1_size)
        # take the snapshot's references first, then switch the active L1, then drop the
        # old active references
        self.update_refcounts(array("Q", snap_l1), 1, active=False)
        img.flush_refcounts()
        img.l2_cache.flush()
        img.host.flush()
        old_l1 = array("Q", img.l1)
        new_l1 = array("Q", snap_l1)
        new_l1.extend([0] * (len(img.l1) - len(new_l1)))
        img.host.pwrite(img.header.l1_table_offset, pack_be_u64_array(new_l1))
        img.host.flush()
        img.install_l1(new_l1)
        self.update_refcounts(old_l1, -1, active=False)
        self.update_refcounts(img.l1, 0, active=True)
        img.flush()

    def delete(self, name_or_id: str) -> None:
        """Delete snapshot ``name_or_id`` and free what only it referenced."""
        self._check_table_read()
        img = self.img
        img.check_writable()
        sn = self.find(name_or_id)
        img.flush()
        snap_l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        deltas: defaultdict[int, int] = defaultdict(int)
        self._count_refs(snap_l1, deltas, -1)
        if sn.l1_size:
            first = sn.l1_table_offset // img.cs
            for c in range(first, (sn.l1_table_offset + sn.l1_size * 8 - 1) // img.cs + 1):
                deltas[c] -= 1
        # dropped references and OFLAG_COPIED bits switch together (known bug B8)
        img.begin_change()
        self._switch(deltas, [s for s in img.snapshot_list if s is not sn])


class _TableMoved(Exception):
    """The refcount table moved (grew) while a snapshot update allocated clusters."""


class SnapshotNotFoundError(UsageError):
    """No snapshot has this id or name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Could not find snapshot '{name}'")
        self.name = name
