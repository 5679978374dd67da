"""qcow2 resize (grow, shrink), preallocation (metadata/falloc/full) and growing the
active L1 table."""

from __future__ import annotations


from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.hostio import all_zero
from diskimg.qcow2 import cluster as C
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import header_io
from diskimg.qcow2 import zero as Z
from diskimg.qcow2.entries import pack_be_u64_array, u64_zeros
from diskimg.qcow2.layout import implied_preallocation, l1_entries_for, l1_fits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.image import Qcow2Image


def zero_tail(img: Qcow2Image, start: int, end: int) -> None:
    """Make guest [start, end) read as zeros over a backing file after a grow, as
    qemu's truncate does: zero flags from the next subcluster boundary on, data zeros
    for the unaligned head."""
    C.begin_change(img)
    C.mark_bitmaps(img, start, end - start)
    zero_start = min(end, -(-start // img.sc_size) * img.sc_size)
    if end > zero_start and not Z.zeroize(img, zero_start, end, False):
        C.write(img, zero_start, memoryview(bytes(end - zero_start)))
    if zero_start > start:
        C.write(img, start, memoryview(bytes(zero_start - start)))
    img.flush()


def preallocate(img: Qcow2Image, start: int, end: int, mode: str) -> None:
    """:meth:`Qcow2Image.preallocate` (documented there)."""
    if mode == "off":
        return
    c, last = start >> img.cb, -(-end >> img.cb)
    while c < last:
        idx = c & (img.l2_entries - 1)
        n = min(img.l2_entries - idx, last - c)
        l2_off, table = C.get_l2_for_write(img, c)
        step = 2 if img.extended else 1  # extended L2: (entry, bitmap) pairs
        todo = [c + j for j in range(n) if not table.entries[step * (idx + j)]]
        if c << img.cb < start and not img.extended and table.entries[idx] == \
                E.QCOW_OFLAG_ZERO:
            todo.insert(0, c)  # a partly preallocated zero cluster gets one too (qemu)
        hosts = C.alloc_data(img, todo)
        for h in hosts:  # the data clusters only: never over metadata
            if mode == "falloc":
                img.data_host.preallocate(h, img.cs)
            elif mode == "full":
                img.data_host.write_zeros(h, img.cs)
        if todo and todo[0] << img.cb < start and not img.extended:
            cow_head(img, todo[0], hosts[0], start)
        for j, h in zip(todo, hosts, strict=True):
            # extended L2: the bitmap stays 0 (allocated, unused), as qemu leaves it
            table.entries[step * (j & (img.l2_entries - 1))] = h | E.QCOW_OFLAG_COPIED
        img.l2_cache.mark_dirty(l2_off)
        c += n
    img.flush()
    new_end = img.refcounts.find_free(1) * img.cs
    if img.host.size() < new_end:
        img.host.truncate(new_end)


def cow_head(img: Qcow2Image, cluster: int, host: int, start: int) -> None:
    """A new host cluster for guest ``cluster``, of which only [``start``, end) is being
    preallocated: its head keeps the guest's contents, written as data (qemu's
    copy-on-write of a preallocation), and the rest reads as zeros -- left unwritten
    in a cluster at or past the end of the file (as qemu leaves it), zeroed in one
    reused inside it, and encrypted zeros when the image is encrypted.  (Extended L2
    tables need no copy: the head's subclusters stay as they were.)"""
    c_start = cluster << img.cb
    buf = bytearray(img.cs if img.header.crypt_method else start - c_start)
    img._readinto(c_start, memoryview(buf)[: start - c_start])
    C.pwrite_runs(img, C.encrypt_writes(img, [(host, buf, c_start)]))
    if not img.header.crypt_method and host + len(buf) < img.data_host.size():
        img.data_host.zero_range(host + len(buf), img.cs - len(buf))


def check_size(new_size: int) -> None:
    """qcow2 sizes are whole 512-byte sectors (qemu's words when not)."""
    if new_size % 512:
        raise UsageError("The new size must be a multiple of 512")


def check_header(new_size: int, version: int, nb_snapshots: int) -> None:
    """The refusals of a resize to ``new_size`` that the header decides, in qemu's words:
    :func:`check_size`, and a version 2 image with snapshots (``version``: the image's
    version when the resize runs).  Snapshots keep their own L1 tables and sizes: qemu
    7.2 resizes the active layer of such a v3 image (a shrink drops only the active
    references); a v2 snapshot entry has no disk size of its own, so qemu refuses."""
    check_size(new_size)
    if nb_snapshots and version < 3:
        raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")


def resize(img: Qcow2Image, new_size: int, *, shrink: bool = False,
           preallocation: str = "off") -> None:
    """:meth:`Qcow2Image.resize` (documented there)."""
    img._check_writable()
    check_size(new_size)
    if new_size < img.size and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation.")
    check_header(new_size, img.header.version, img.header.nb_snapshots)
    b = img.backing
    # qemu: a grown area the (longer) backing file would show must read as zeros; v2
    # has no zero flag, so qemu-img 7.2 fails (nothing changed here, before any write)
    over_backing = new_size > img.size and b is not None and b.size > img.size
    if over_backing and img.header.version < 3 and new_size > -(-img.size // img.cs) * img.cs:
        raise UnsupportedFeatureError("Failed to zero out new clusters: Operation not "
                                      "supported")
    preallocation = implied_preallocation(img.header, preallocation)
    bitmaps = img.bitmaps if img.bitmaps.entries else None
    if bitmaps is not None:
        bitmaps.check_resize()  # qemu: an inconsistent bitmap refuses the resize
    C.begin_change(img)
    # persistent bitmaps take the new size too: stored now in new clusters, switched to
    # by the same header write that sets the size (qemu-img 7.2 resizes them likewise)
    resized = bitmaps.prepare_resize(new_size) if bitmaps is not None else None
    need = l1_entries_for(new_size, img.cs, img.cs // img.l2_entries)
    if new_size > img.size:
        unmap_past_end(img, -(-img.size >> img.cb), -(-new_size >> img.cb))
    if new_size < img.size:
        first = -(-new_size >> img.cb)
        last = -(-img.size >> img.cb)
        c = first
        while c < last:
            idx = c & (img.l2_entries - 1)
            n = min(img.l2_entries - idx, last - c)
            _, l2_off = img._l2_location(c)
            if l2_off:
                l2_off, table = C.get_l2_for_write(img, c)
                for j in range(idx, idx + n):
                    k = 2 * j if img.extended else j  # (entry, bitmap) pairs
                    if table.entries[k]:
                        # like qemu's: the freed clusters are deallocated in the file
                        C.free_entry(img, table.entries[k], punch=True)
                        table.entries[k] = 0
                    if img.extended:
                        table.entries[k + 1] = 0
                img.l2_cache.mark_dirty(l2_off)
            c += n
        drop_l1_entries(img, need)
    if need > len(img.l1):
        grow_l1(img, need)
    shrinking = new_size < img.size
    old_size = img.size
    img.size = img.header.size = new_size
    if new_size > old_size:
        # the grown area reads as zeros: never stale bytes of the old last cluster
        # (left there by an earlier shrink) nor the backing file; preallocated, then
        # zeroed (qemu's order: preallocated clusters become zero-allocated), before
        # the header's size makes the area visible.  Over a longer backing file qemu
        # zeroes all the new area (zero flags); falloc/full give the old last cluster
        # a fresh, zeroed cluster anyway (copying only its head) and zero-fill the
        # new clusters, so qemu writes no zero flags there
        head_end = min(new_size, -(-old_size // img.cs) * img.cs)
        grown = preallocation in ("falloc", "full") and not img._data_file_opened
        if grown:
            preallocate_grown(img, old_size, new_size, preallocation)
        else:
            # the rest of the old last cluster, where it may hold bytes: zeroed first
            # (a write keeps, copies, its head); an unallocated one is left to the
            # preallocation, which copies its head as qemu's does
            tail = head_end > old_size and not last_cluster_reads_zero(img, old_size)
            lazy = (head_end > old_size and not tail and preallocation == "metadata"
                    and not (img.extended and old_size % img.sc_size))
            if head_end > old_size and (tail or (over_backing and not lazy)):
                zero_tail(img, old_size, head_end)
            img.preallocate(old_size, new_size, preallocation)
            if over_backing:
                zero_tail(img, old_size if lazy else head_end, new_size)
    img.flush()
    if bitmaps is not None and resized is not None:
        bitmaps.finish_resize(resized, new_size)  # synced
    else:
        header_io.set_size(img.host, new_size)
        img.host.flush()
    if img._data_file_opened and img.data_host.size() != new_size:
        # like qemu: the data file takes the new size too; a shrink must not leave
        # the cut-off data in it (a raw data file would no longer be the disk)
        img.data_host.truncate(new_size)
        img.data_host.flush()
    if shrinking:  # like qemu: cut the host file after the last cluster in use
        rc = img.refcounts
        last = -(-img.host.size() // img.cs) - 1
        while last > 0 and rc.get(last) == 0:
            last -= 1
        if (last + 1) * img.cs < img.host.size():
            img.host.truncate((last + 1) * img.cs)


def _holds_data(img: Qcow2Image, ents: memoryview, k: int) -> bool:
    """L2 entry ``k`` of ``ents`` (extended L2: the entry at ``k``, its bitmap after it)
    maps host bytes a guest read would return: a data or compressed cluster (extended
    L2: with a subcluster allocated).  Zero and unallocated entries do not."""
    t = img._cluster_type(ents[k])
    if t == E.ClusterType.COMPRESSED:
        return True
    return t == E.ClusterType.NORMAL and (
        not img.extended or bool(ents[k + 1] & E.L2_BITMAP_ALL_ALLOC))


def unmap_past_end(img: Qcow2Image, first: int, last: int) -> None:
    """Before a grow makes guest clusters [``first``, ``last``) part of the disk, drop
    the active image's mappings there that hold data: past the end of the disk the
    active L1 table may map a snapshot's VM state (``snapshot -a`` copies the snapshot's
    whole L1 table, VM state included, as qemu does; qemu's ``savevm`` writes it there),
    which must never become guest data (qemu-img 7.2 shows it in the grown area).  Zero
    clusters stay as they are (they read as zeros; qemu leaves them too).  Only the L1
    entries that exist are visited: ``last`` may lie far past them."""
    per = img.l2_entries
    step = 2 if img.extended else 1
    for i in range(first // per, min(len(img.l1), -(-last // per))):
        _, l2_off = img._l2_location(i * per)
        if not l2_off:
            continue
        lo, hi = max(first, i * per) - i * per, min(last, (i + 1) * per) - i * per
        ents = img.l2_cache.get(l2_off).entries
        stale = [j for j in range(lo, hi) if _holds_data(img, ents, step * j)]
        if not stale:
            continue
        l2_off, table = C.get_l2_for_write(img, i * per)  # copied if shared
        for j in stale:
            k = step * j
            C.free_entry(img, table.entries[k], punch=True)
            table.entries[k] = 0
            if img.extended:
                table.entries[k + 1] = 0
        img.l2_cache.mark_dirty(l2_off)


def drop_l1_entries(img: Qcow2Image, keep: int) -> None:
    """A shrink's end: the active L1 entries from ``keep`` on map nothing of the disk
    any more (qemu's qcow2_shrink_l1_table clears them and frees their L2 tables).
    What those L2 tables still map past the old end (VM state a ``snapshot -a`` copied
    into the active table) loses the active reference too: qemu-img 7.2 frees only the
    tables and leaks those clusters (``Leaked cluster N refcount=2 reference=1``).
    The entries reach the file before any reference is dropped (a crash leaks)."""
    step = 2 if img.extended else 1
    for i in range(keep, len(img.l1)):
        _, l2_off = img._l2_location(i * img.l2_entries)
        if not l2_off:
            continue
        ents = img.l2_cache.get(l2_off).entries
        for k in range(0, len(ents), step):
            if ents[k]:
                C.free_entry(img, ents[k], punch=True)
        img._pending_free.append((l2_off, img.cs, True))
        img.l1[i] = 0
        img.l1_dirty.add(i)


def last_cluster_reads_zero(img: Qcow2Image, old_size: int) -> bool:
    """The guest cluster holding ``old_size`` has no host bytes past it: a zero or
    unallocated cluster (whose backing file, if any, ends before ``old_size``: the
    caller zeroes the area over a longer one).  A data cluster may hold stale bytes
    there (an earlier shrink keeps the last cluster whole)."""
    c = old_size >> img.cb
    _, l2_off = img._l2_location(c)
    if not l2_off:
        return True
    step = 2 if img.extended else 1
    ent = img.l2_cache.get(l2_off).entries[step * (c & (img.l2_entries - 1))]
    return ent == 0 or (not img.extended and img._cluster_type(ent) in (
        E.ClusterType.ZERO_PLAIN, E.ClusterType.ZERO_ALLOC, E.ClusterType.UNALLOCATED))


def preallocate_grown(img: Qcow2Image, old_size: int, new_size: int, mode: str) -> None:
    """``resize --preallocation=falloc|full`` laid out as qemu-img 7.2 lays it out.

    QEMU first builds refcount structures (new blocks, then a new refcount table)
    right after the last cluster in use, sized exactly for the new data clusters plus
    their L2 tables, then takes the data clusters in one run after them (reserved or
    written as zeros), and only then allocates the L2 tables (at the first free
    clusters) and fills in their entries.  A partly used last cluster of the old size
    gets a new cluster too; its old contents are copied into it (QEMU's COW head),
    so no guest data is lost.  Invariant: every cluster used has refcount 1."""
    cs = img.cs
    img.flush()
    rc = img.refcounts
    last = -(-img.host.size() // cs) - 1
    while last >= 0 and rc.get(last) == 0:
        last -= 1
    first_guest = old_size >> img.cb
    n_data = -(-new_size // cs) - first_guest
    n_l2 = -(-n_data // img.l2_entries) + 1
    start = rc.refcount_area(last + 1, n_data + n_l2, exact=True)
    rc.alloc_at(start, n_data)
    img.flush_refcounts()
    lo, hi = start * cs, (start + n_data) * cs
    cur = max(lo, min(hi, img.host.size()))
    if mode == "full":
        img.host.write_zeros(cur, hi - cur)
    elif hi > cur:
        img.host.preallocate(cur, hi - cur)
    if img.host.size() < hi:
        img.host.truncate(hi)
    head = old_size & (cs - 1)
    # the partly used old last cluster moves to a new cluster: keep what it holds
    head_data = img.read(first_guest * cs, head) if head else b""
    step = 2 if img.extended else 1  # extended L2: (entry, bitmap) pairs
    c, end, host = first_guest, first_guest + n_data, start
    while c < end:
        idx = c & (img.l2_entries - 1)
        n = min(img.l2_entries - idx, end - c)
        l2_off, table = C.get_l2_for_write(img, c)
        for j in range(n):
            k = step * (idx + j)
            if table.entries[k]:
                C.free_entry(img, table.entries[k])
            table.entries[k] = (host + j) * cs | E.QCOW_OFLAG_COPIED
        img.l2_cache.mark_dirty(l2_off)
        c += n
        host += n
    img.flush()
    if not all_zero(head_data):
        l2_off, table = C.get_l2_for_write(img, first_guest)
        k = 2 * (first_guest & (img.l2_entries - 1)) + 1
        bitmap = table.entries[k] if img.extended else 0
        img.write(first_guest * cs, head_data)
        if img.extended:  # qemu keeps the old subcluster bitmap as it was
            l2_off, table = C.get_l2_for_write(img, first_guest)
            table.entries[k] = bitmap
            img.l2_cache.mark_dirty(l2_off)
        img.flush()


def grow_l1(img: Qcow2Image, need: int) -> None:
    if not l1_fits(need):  # qemu: -EFBIG from qcow2_grow_l1_table
        raise UsageError("Failed to grow the L1 table: File too large")
    img.flush()
    new_clusters = -(-need * 8 // img.cs)
    new_off = img.refcounts.alloc(new_clusters)
    img.flush_refcounts()
    table = u64_zeros(need)
    table[: len(img.l1)] = img.l1
    img.host.pwrite(new_off, pack_be_u64_array(table))
    img.host.flush()
    old_off, old_size = img.header.l1_table_offset, img.header.l1_size
    header_io.set_l1_table(img.host, need, new_off)
    img.host.flush()
    img.header.l1_size, img.header.l1_table_offset = need, new_off
    img.l1 = table
    if old_size:
        img.refcounts.free(old_off, old_size * 8)
    img.flush_refcounts()
