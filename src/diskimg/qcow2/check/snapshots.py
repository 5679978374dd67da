"""The snapshot table as the check sees it (``qcow2_check_read_snapshot_table``) and its
repair (``qcow2_check_fix_snapshot_table``); entries are read through
:class:`diskimg.qcow2.snapshot.EntryHeader` / :class:`~diskimg.qcow2.snapshot.Snapshot`."""

from __future__ import annotations

from diskimg import progname
from diskimg.errors import CorruptImageError, FormatError
from diskimg.qcow2 import header_io
from diskimg.qcow2.check.state import CheckResult, _Abort
from diskimg.qcow2.check.state import _Snap
from diskimg.qcow2.layout import (
    HDR_NB_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS,
    Header,
)
from diskimg.qcow2.snapshot_table import (
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    EntryHeader,
    TableWalk,
    c_string,
    check_table_pointer,
    repair_hint,
)


class _Window:
    """Reads of the snapshot table, relative to its start, served from 1 MiB pieces of
    the file read once each (a table may have 65536 entries)."""

    PIECE = 1 << 20

    def __init__(self, pread: Callable[[int, int], bytes], base: int) -> None:
        self.pread, self.base = pread, base
        self.pieces: dict[int, bytes] = {}

    def read(self, pos: int, n: int) -> bytes:
        k, at = divmod(pos, self.PIECE)
        piece = self.pieces.get(k)
        if piece is not None and at + n <= self.PIECE:
            return piece[at : at + n]
        out = bytearray()
        while n > 0:
            k, at = divmod(pos, self.PIECE)
            piece = self.pieces.get(k)
            if piece is None:
                piece = self.pieces[k] = self.pread(self.base + k * self.PIECE, self.PIECE)
            got = piece[at : at + n]
            out += got
            pos, n = pos + len(got), n - len(got)
        return bytes(out)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from diskimg.qcow2.check.state import _State


def read_snapshots(st: _State, nb_u: int, off_u: int) -> None:
    """qemu's qcow2_check_read_snapshot_table, for the header's count ``nb_u`` and offset
    ``off_u`` as on disk (a pass without snapshots and with a valid offset skips it:
    diskimg.qcow2.check._Pass.run)."""
    fix_errors = bool(st.fix & 2)
    reduced = 0  # snapshots dropped: the header's count is cut in place (as qemu)
    nb_orig = nb_u
    if nb_u > QCOW_MAX_SNAPSHOTS and fix_errors:
        st.msg(f"Discarding {nb_u - QCOW_MAX_SNAPSHOTS} overhanging snapshots")
        st.find("too-many-snapshots", True, table="snapshot-table", count=nb_u)
        reduced = nb_u - QCOW_MAX_SNAPSHOTS
        nb_u = QCOW_MAX_SNAPSHOTS
    off = off_u - (1 << 64) if off_u >> 63 else off_u  # qemu reads it as signed
    bad = check_table_pointer(nb_u, off_u, st.cs)
    if bad is not None:
        st.res.check_errors += 1
        st.msg(f"{progname.name()}: ERROR snapshot table {bad}")
        if nb_u > QCOW_MAX_SNAPSHOTS:
            st.msg(f"You can force-remove all {nb_u - QCOW_MAX_SNAPSHOTS} overhanging "
                     f"snapshots with {repair_hint()}")
            st.find("too-many-snapshots", table="snapshot-table", count=nb_u)
        else:
            st.find("snapshot-table-invalid", table="snapshot-table", host_offset=off)
        raise _Abort("EFBIG" if bad == "too large" else "EINVAL")
    nb = nb_u
    table = _Window(st.pread, off)
    try:
        walk = TableWalk(lambda pos: table.read(pos, EntryHeader.SIZE), nb, off,
                         fix_errors)
    except FormatError as exc:  # only without a repair
        st.res.check_errors += 1
        first, *hint = str(exc).split("\n")
        st.msg(f"{progname.name()}: ERROR failed to read the snapshot table: {first}")
        for line in hint:
            st.msg(line)
        if exc.field == "extra_data_size":
            st.find("snapshot-extra-data", table="snapshot-table",
                      host_offset=exc.offset)
        else:
            st.find("snapshot-table-too-big", table="snapshot-table", host_offset=off)
        raise _Abort("EFBIG") from None
    for p in walk.cut:
        st.msg(f"Discarding too much extra metadata in snapshot table entry {p.index} "
                 f"({p.header.extra_data_size} > {QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
        st.find("snapshot-extra-data", True, table="snapshot-table", index=p.index)
    dropped = len(walk.cut)
    if walk.discarded:
        st.msg(f"Discarding {walk.discarded} overhanging snapshots (snapshot table is "
                 "too big)")
        st.find("snapshot-table-too-big", True, table="snapshot-table",
                  host_offset=off, count=walk.discarded)
        reduced += walk.discarded
    snaps = []
    for p in walk.places:
        eh = p.header
        id_at = p.start + EntryHeader.SIZE + eh.extra_data_size
        id_str = c_string(table.read(id_at, eh.id_len))
        name = c_string(table.read(id_at + eh.id_len, eh.name_len))
        snaps.append(_Snap(eh.l1_table_offset, eh.l1_size, id_str, name, p.extra_len,
                           off + p.start))
    pos = off + walk.size
    if nb_u < nb_orig and pos - st.file_len >= st.cs:
        # qemu goes on with a table that is not there: it reads zeros, cannot count
        # the table's clusters, then finds its rewrite overlapping the old table and
        # marks the image corrupt.  Refused here before anything is written.
        raise CorruptImageError(f"Too many snapshots ({nb_orig}) in a snapshot table "
                                "that runs past the end of the file; repairing it is "
                                "not supported", offset=HDR_NB_SNAPSHOTS.offset)
    if reduced:
        # qemu writes the new count at once (the refcount pass then finds the clusters
        # of the dropped entries leaked) and counts the drop as fixed
        header_io.set_snapshots_count(st.host, len(snaps))
        st.host.flush()
        st.res.corruptions_fixed += reduced
    st.res.snapshots_kept = len(snaps)
    st.snapshots = snaps
    st.snapshots_offset = off
    st.snapshots_size = pos - off if snaps else 0
    st.snap_corruptions += dropped
    st.res.snapshot_repairs += dropped
    st.res.snapshots_size = st.snapshots_size
    if st.h.version >= 3:
        # v3 entries must carry the 64-bit VM state size and the disk size
        for i, sn in enumerate(snaps):
            if sn.extra_data_size < 16:
                st.msg(f"{'Repairing' if fix_errors else 'ERROR'} snapshot table entry "
                         f"{i} is incomplete")
                st.snap_corruptions += 1
                st.res.snapshot_repairs += 1
                st.res.incomplete_snapshots.append(i)
                st.find("snapshot-incomplete", table="snapshot-table", index=i,
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
        snaps = read_entries(host, old_off, keep, old_size,
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
