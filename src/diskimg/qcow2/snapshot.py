"""qcow2 internal snapshots: the snapshot table record and create/apply/delete.

Each snapshot owns a copy of the L1 table; L2 tables and data clusters are shared with
the active image by reference counting.  Invariants kept by every operation:
- refcount increments reach the disk before any table that relies on them, decrements
  only after the table that dropped the reference is on disk (crash: leaks only);
- QCOW_OFLAG_COPIED is set in active L1/L2 entries exactly when the refcount is 1.
"""

from __future__ import annotations

import builtins
import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from diskimg.errors import CorruptImageError, FormatError, UsageError
from diskimg.qcow2 import entries as E
from diskimg.qcow2.cache import be_u64_array, pack_be_u64_array
from diskimg.qcow2.layout import QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS

if TYPE_CHECKING:
    from diskimg.qcow2.image import Qcow2Image

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024


@dataclass(slots=True)
class Snapshot:
    """One snapshot table entry.  ``extra`` keeps extra-data bytes beyond the 24 QEMU
    defines, unchanged, so foreign tools' data survives a rewrite."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra_data_size: int = 24
    extra: bytes = field(default=b"", repr=False)

    @classmethod
    def parse(cls, buf: bytes, offset: int, table_offset: int) -> tuple[Self, int]:
        """Parse the entry at ``offset`` of the table bytes; returns it and its length."""
        where = table_offset + offset
        if offset + _ENTRY.size > len(buf):
            raise FormatError(f"Snapshot table entry at {where:#x} is truncated", offset=where)
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32,
         extra_len) = _ENTRY.unpack_from(buf, offset)
        if extra_len > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"Too much extra metadata in snapshot table entry at {where:#x} "
                              f"({extra_len} bytes)", offset=where)
        pos = offset + _ENTRY.size
        end = pos + extra_len + id_len + name_len
        if end > len(buf):
            raise FormatError(f"Snapshot table entry at {where:#x} runs past the end of the "
                              "table", offset=where)
        extra = buf[pos : pos + extra_len]
        vm_state = vm32
        disk_size = icount = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            ic = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if ic == (1 << 64) - 1 else ic
        pos += extra_len
        sid = buf[pos : pos + id_len].decode("utf-8", "replace")
        name = buf[pos + id_len : end].decode("utf-8", "replace")
        if l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise FormatError(f"Snapshot L1 table too large ({l1_size} entries) in entry at "
                              f"{where:#x}", offset=where)
        length = end - offset
        length += (-length) % 8
        return cls(sid, name, l1_off, l1_size, dsec, dnsec, clock, vm_state, disk_size,
                   icount, extra_len, bytes(extra[24:])), length

    def pack(self) -> bytes:
        sid, name = self.id.encode(), self.name.encode()
        extra = struct.pack(">QQQ", self.vm_state_size,
                            self.disk_size if self.disk_size is not None else 0,
                            (1 << 64) - 1 if self.icount is None else self.icount)
        extra = (extra + self.extra)[: max(self.extra_data_size, 24)] \
            if self.extra_data_size >= 24 else extra[: self.extra_data_size]
        vm32 = self.vm_state_size if self.vm_state_size < (1 << 32) else 0
        out = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(sid), len(name),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                          len(extra)) + extra + sid + name
        return out + b"\0" * ((-len(out)) % 8)

    def to_json(self) -> dict[str, Any]:
        """qemu-img info's keys for one snapshot."""
        d: dict[str, Any] = {}
        if self.icount is not None:
            d["icount"] = self.icount
        d.update({
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        })
        return d


def parse_table(buf: bytes, count: int, table_offset: int) -> list[Snapshot]:
    if count > QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots: {count} (field 'nb_snapshots' at 0x3c)",
                          offset=60)
    out = []
    pos = 0
    for _ in range(count):
        sn, n = Snapshot.parse(buf, pos, table_offset)
        out.append(sn)
        pos += n
    return out


def pack_table(snaps: list[Snapshot]) -> bytes:
    return b"".join(s.pack() for s in snaps)


def read_table(img: Qcow2Image) -> list[Snapshot]:
    """Read the snapshot table named by the header, bounded by QEMU's limits."""
    h = img.header
    if not h.nb_snapshots:
        return []
    # each entry is at least 40 bytes; read what the count can need, capped at 64 MiB
    fsize = img.host.size()
    avail = max(0, fsize - h.snapshots_offset)
    want = min(QCOW_MAX_SNAPSHOTS_SIZE, avail, h.nb_snapshots * (40 + 1024 + 2 * 65535 + 8))
    buf = img.host.pread(h.snapshots_offset, want)
    return parse_table(buf, h.nb_snapshots, h.snapshots_offset)


class SnapshotTable:
    """``img.snapshots``: list, create, apply and delete internal snapshots."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img

    def list(self) -> list[Snapshot]:
        return list(self.img.snapshot_list)

    def find(self, name_or_id: str) -> Snapshot:
        """By id first, then by name (qemu's find_snapshot_by_id_or_name)."""
        for s in self.img.snapshot_list:
            if s.id == name_or_id:
                return s
        for s in self.img.snapshot_list:
            if s.name == name_or_id:
                return s
        raise SnapshotNotFoundError(name_or_id)

    # --- helpers ---------------------------------------------------------------------
    def _write_table(self, snaps: builtins.list[Snapshot]) -> None:
        """Write a new snapshot table, switch the header to it, free the old one."""
        img = self.img
        h = img.header
        data = pack_table(snaps)
        if len(data) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise UsageError("Snapshot table too large")
        old_off, old_len = h.snapshots_offset, len(pack_table(img.snapshot_list))
        new_off = 0
        if snaps:
            new_off = img.refcounts.alloc(-(-len(data) // img.cs))
            img._flush_refcounts()
            img.host.pwrite(new_off, data)
        img.host.flush()
        img.host.pwrite(60, struct.pack(">IQ", len(snaps), new_off))
        img.host.flush()
        h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
        if img.snapshot_list and old_len:
            img.refcounts.free(old_off, old_len)
            img._flush_refcounts()
        img.snapshot_list = snaps

    def _read_l1(self, offset: int, size: int) -> array[int]:
        img = self.img
        if offset % img.cs:
            raise CorruptImageError(f"Snapshot L1 table offset {offset:#x} invalid",
                                    offset=offset)
        return be_u64_array(img.host.pread_exact(offset, size * 8, "snapshot L1 table"))

    def update_refcounts(self, l1: array[int], addend: int, active: bool) -> bool:
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
                t = E.cluster_type(ent, img.extended)
                if t == E.ClusterType.COMPRESSED:
                    if addend:
                        host, n = E.decode_compressed(ent, img.cb)
                        first, last = (host & ~511) // img.cs, (host + n - 1) // img.cs
                        for c in range(first, last + 1):
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

    def _check_headroom(self, l1: array[int], what: str) -> None:
        """Refuse, before changing anything, when one more reference to a cluster ``l1``
        reaches would overflow the refcount width (qemu fails half-way and leaks)."""
        img = self.img
        rc = img.refcounts
        step = 2 if img.extended else 1
        clusters: set[int] = set()
        for i in range(len(l1)):
            l2_off = l1[i] & E.L1E_OFFSET_MASK
            if not l2_off:
                continue
            clusters.add(l2_off // img.cs)
            ents = img.l2_cache.get(l2_off).entries
            for j in range(0, len(ents), step):
                ent = ents[j]
                if ent & E.QCOW_OFLAG_COMPRESSED:
                    host, n = E.decode_compressed(ent, img.cb)
                    clusters.update(range((host & ~511) // img.cs, (host + n - 1) // img.cs + 1))
                elif ent & E.L2E_OFFSET_MASK:
                    clusters.add((ent & E.L2E_OFFSET_MASK) // img.cs)
        for c in clusters:
            if rc.get(c) >= rc.max_refcount:
                raise UsageError(f"{what}: refcount of cluster {c} is already at the maximum "
                                 f"of {rc.max_refcount} (refcount_bits="
                                 f"{img.header.refcount_bits})")

    # --- operations ------------------------------------------------------------------
    def create(self, name: str, *, date: float | None = None) -> Snapshot:
        """Snapshot the current disk state under ``name`` (id: highest numeric id + 1)."""
        img = self.img
        img._check_writable()
        img._check_write_support()
        if len(img.snapshot_list) >= QCOW_MAX_SNAPSHOTS:
            raise UsageError("Too many snapshots")
        if img._data_file_opened:
            raise UsageError(f"Could not create snapshot '{name}': internal snapshots are "
                             "not supported with an external data file")
        ids = [int(s.id) for s in img.snapshot_list if s.id.isdigit()]
        sid = str(max(ids, default=0) + 1)
        img.flush()
        self._check_headroom(img.l1, f"Could not create snapshot '{name}'")
        # 1. copy of the active L1 table in new clusters
        l1_bytes = len(img.l1) * 8
        l1_off = 0
        if l1_bytes:
            l1_off = img.refcounts.alloc(-(-l1_bytes // img.cs))
            img._flush_refcounts()
            img.host.pwrite(l1_off, pack_be_u64_array(img.l1))
        # 2. references from the snapshot: refcounts up, COPIED flags cleared
        self.update_refcounts(img.l1, 1, active=True)
        img.flush()
        # 3. the table entry
        from diskimg.reproducible import now as clock

        now = clock() if date is None else date
        sn = Snapshot(sid, name, l1_off, len(img.l1), int(now),
                      int(now % 1 * 1e9) // 1000 * 1000, 0, 0, img.size, 0)
        self._write_table([*img.snapshot_list, sn])
        img.flush()
        return sn

    def apply(self, name_or_id: str) -> None:
        """Revert the disk to snapshot ``name_or_id`` (qemu-img snapshot -a)."""
        img = self.img
        img._check_writable()
        img._check_write_support()
        sn = self.find(name_or_id)
        if sn.disk_size is not None and sn.disk_size != img.size:
            raise UsageError("qcow2: Loading snapshots with different disk size is not "
                             "supported")
        img.flush()
        if sn.l1_size > len(img.l1):
            img._grow_l1(sn.l1_size)
        snap_l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        self._check_headroom(snap_l1, f"Could not apply snapshot '{name_or_id}'")
        # take the snapshot's references first, then switch the active L1, then drop the
        # old active references
        self.update_refcounts(array("Q", snap_l1), 1, active=False)
        img._flush_refcounts()
        img.l2_cache.flush()
        img.host.flush()
        old_l1 = array("Q", img.l1)
        new_l1 = array("Q", snap_l1)
        new_l1.extend([0] * (len(img.l1) - len(new_l1)))
        img.host.pwrite(img.header.l1_table_offset, pack_be_u64_array(new_l1))
        img.host.flush()
        img.l1 = new_l1
        img.l1_dirty.clear()
        img._decoded.clear()
        self.update_refcounts(old_l1, -1, active=False)
        self.update_refcounts(img.l1, 0, active=True)
        img.flush()

    def delete(self, name_or_id: str) -> None:
        """Delete snapshot ``name_or_id`` and free what only it referenced."""
        img = self.img
        img._check_writable()
        img._check_write_support()
        sn = self.find(name_or_id)
        img.flush()
        self._write_table([s for s in img.snapshot_list if s is not sn])
        snap_l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        self.update_refcounts(snap_l1, -1, active=False)
        if sn.l1_size:
            img.refcounts.free(sn.l1_table_offset, sn.l1_size * 8)
        self.update_refcounts(img.l1, 0, active=True)
        img.flush()


class SnapshotNotFoundError(UsageError):
    """No snapshot has this id or name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Could not find snapshot '{name}'")
        self.name = name
