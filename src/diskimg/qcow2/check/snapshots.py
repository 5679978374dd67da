"""The snapshot table as the check sees it (``qcow2_check_read_snapshot_table``) and its
repair (``qcow2_check_fix_snapshot_table``); entries are read through
:class:`diskimg.qcow2.snapshot.EntryHeader` / :class:`~diskimg.qcow2.snapshot.Snapshot`."""

from __future__ import annotations

from diskimg.errors import CorruptImageError
from diskimg.qcow2 import header_io
from diskimg.qcow2.check.report import CheckResult, _Abort
from diskimg.qcow2.check.state import (
    INT64_MAX,
    _Snap,
)
from diskimg.qcow2.check.stored import _Stored
from diskimg.qcow2.layout import (
    HDR_NB_SNAPSHOTS,
    HDR_SNAPSHOTS_OFFSET,
    QCOW_MAX_SNAPSHOTS,
    Header,
)
from diskimg.qcow2.snapshot import (
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS_SIZE,
    EntryHeader,
    c_bytes,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Snapshots(_Stored):
    def read_snapshots(self) -> None:
        nb_u, off_u = header_io.read_fields(self.host, HDR_NB_SNAPSHOTS, HDR_SNAPSHOTS_OFFSET)
        nb = nb_u - (1 << 32) if nb_u >> 31 else nb_u  # qemu reads both as signed
        off = off_u - (1 << 64) if off_u >> 63 else off_u
        fix_errors = bool(self.fix & 2)
        dropped = 0
        if nb_u > QCOW_MAX_SNAPSHOTS:
            if fix_errors:
                raise CorruptImageError(f"Too many snapshots ({nb_u}); repairing the snapshot "
                                        "table is not supported", offset=60)
            self.res.check_errors += 1
            self.msg("diskimg: ERROR snapshot table too large")
            self.msg(f"You can force-remove all {nb_u - QCOW_MAX_SNAPSHOTS} overhanging "
                     "snapshots with diskimg check -r all")
            self.find("too-many-snapshots", table="snapshot-table", count=nb_u)
            raise _Abort("EFBIG")
        nb = max(nb, 0)
        if off & (self.cs - 1) or off < 0 or INT64_MAX - nb * 40 < off:
            self.res.check_errors += 1
            self.msg("diskimg: ERROR snapshot table is invalid: Invalid argument")
            self.find("snapshot-table-invalid", table="snapshot-table", host_offset=off)
            raise _Abort("EINVAL")
        pos = entry_end = off
        snaps = []
        for i in range(nb):
            pos = (pos + 7) & ~7
            entry_offset = pos
            eh = EntryHeader.parse(self.pread(pos, EntryHeader.SIZE))
            l1_off, l1_size, extra = eh.l1_table_offset, eh.l1_size, eh.extra_data_size
            pos += EntryHeader.SIZE
            truncate = False
            if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                if not fix_errors:
                    self.res.check_errors += 1
                    self.msg("diskimg: ERROR failed to read the snapshot table: Too much extra "
                             f"metadata in snapshot table entry {i}")
                    self.msg("You can force-remove this extra metadata with diskimg check "
                             "-r all")
                    self.find("snapshot-extra-data", table="snapshot-table", index=i)
                    raise _Abort("EFBIG")
                self.msg(f"Discarding too much extra metadata in snapshot table entry {i} "
                         f"({extra} > {QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
                self.find("snapshot-extra-data", True, table="snapshot-table", index=i)
                dropped += 1
                truncate = True
            pos += min(24, extra)
            if extra > 24:
                end = pos + extra - 24
                if truncate:
                    extra = QCOW_MAX_SNAPSHOT_EXTRA_DATA
                pos = end
            id_str = c_bytes(self.pread(pos, eh.id_len)).decode("utf-8", "replace")
            pos += eh.id_len
            name = c_bytes(self.pread(pos, eh.name_len)).decode("utf-8", "replace")
            pos += eh.name_len
            if pos - off > QCOW_MAX_SNAPSHOTS_SIZE and fix_errors:
                self.msg(f"Discarding {nb - i} overhanging snapshots (snapshot table is too "
                         "big)")
                self.find("snapshot-table-too-big", True, table="snapshot-table",
                          host_offset=off, count=nb - i)
                dropped += nb - i
                pos = entry_end  # the table ends with the last entry kept
                break
            if pos - off > QCOW_MAX_SNAPSHOTS_SIZE:
                self.res.check_errors += 1
                self.msg("diskimg: ERROR failed to read the snapshot table: Snapshot table is "
                         "too big")
                self.find("snapshot-table-too-big", table="snapshot-table", host_offset=off)
                raise _Abort("EFBIG")
            snaps.append(_Snap(l1_off, l1_size, id_str, name, extra, entry_offset))
            entry_end = pos
        self.res.snapshots_kept = len(snaps)
        self.snapshots = snaps
        self.snapshots_offset = off
        self.snapshots_size = pos - off if snaps else 0
        self.snap_corruptions += dropped
        self.res.snapshot_repairs += dropped
        self.res.snapshots_size = self.snapshots_size
        if self.h.version >= 3:
            # v3 entries must carry the 64-bit VM state size and the disk size
            for i, sn in enumerate(snaps):
                if sn.extra_data_size < 16:
                    self.msg(f"{'Repairing' if fix_errors else 'ERROR'} snapshot table entry "
                             f"{i} is incomplete")
                    self.snap_corruptions += 1
                    self.res.snapshot_repairs += 1
                    self.res.incomplete_snapshots.append(i)
                    self.find("snapshot-incomplete", table="snapshot-table", index=i,
                              host_offset=sn.entry_offset, repaired=fix_errors,
                              extra_data_size=sn.extra_data_size)


def _rewrite_snapshot_table(host: Any, header: Header, res: CheckResult) -> None:
    """qemu's qcow2_check_fix_snapshot_table: write the entries the check kept to new
    clusters (oversized extra data cut to 1024 bytes; incomplete v3 entries given full
    extra data, a missing disk size becoming the image size as QEMU reads it), switch the
    header to them with one write, then free (and punch) the old table.  Runs after the
    refcount repair, so the stored refcounts are trusted for allocation."""
    from diskimg.qcow2.refcount import Refcounts
    from diskimg.qcow2.snapshot import pack_table_exact, read_entries

    old_off, keep, old_size = header.snapshots_offset, res.snapshots_kept, res.snapshots_size
    cs = header.cluster_size
    rc = Refcounts(host, header)
    new_off = 0
    if keep:
        snaps = read_entries(host, old_off, keep, min(QCOW_MAX_SNAPSHOTS_SIZE, old_size),
                             cut_extra=True)
        for i in res.incomplete_snapshots:
            if snaps[i].disk_size is None:
                snaps[i].disk_size = header.size
            snaps[i].extra_data_size = 24
        data = pack_table_exact(snaps)
        new_off = rc.alloc(-(-len(data) // cs))
        rc.flush()
        host.flush()
        host.pwrite(new_off, data)
        host.flush()
    header_io.set_snapshots(host, keep, new_off)
    host.flush()
    if old_size:
        first, last_c = old_off // cs, (old_off + old_size - 1) // cs
        if any(rc.get(c) == 0 for c in range(first, last_c + 1)):
            res.messages.append("qcow2_free_clusters failed: Invalid argument")
        else:
            rc.free(old_off, old_size)
            rc.flush()
            host.flush()
            for c in range(first, last_c + 1):
                if rc.get(c) == 0:
                    host.punch_hole(c * cs, cs)  # qemu discards freed snapshot clusters
    res.corruptions -= res.snapshot_repairs
    res.corruptions_fixed += res.snapshot_repairs
