"""qcow2 cluster allocation and guest writes (QEMU's qcow2-cluster.c seam).

The L2 table for a write (allocated, or copied when shared), data cluster allocation,
copy-on-write of partial clusters (whole clusters, or subclusters with extended L2),
scheduling the references an entry drops, and the encrypted form of a write.  Order
(the image's invariant, see :mod:`diskimg.qcow2.image`): guest data reaches the file
before the L2 entry that points at it; the dropped references are applied by the flush
(:func:`diskimg.qcow2.flush.flush`) after the tables no longer pointing at them.

Module-level functions taking the image; :class:`~diskimg.qcow2.image.Qcow2Image`
delegates its ``_write`` and ``begin_change`` to them.
"""

from __future__ import annotations

from diskimg.qcow2 import header_io, lazy_modules
from diskimg.qcow2 import entries as E
from diskimg.qcow2.entries import L2Table, u64_copy, u64_run, u64_zeros
from diskimg.qcow2.layout import (
    QCOW2_AUTOCLEAR_MASK,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_DIRTY,
    Header,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.qcow2 import crypt
    from diskimg.qcow2.image import Qcow2Image
else:  # encryption: imported on first use (start-up, issue 20)
    lazy_modules(globals(), "diskimg.qcow2", crypt="crypt")


def clear_unknown_autoclear(host: Host, h: Header) -> None:
    """Clear the autoclear feature bits diskimg does not know (all but bit 0, bitmaps,
    which every write keeps true, and bit 1, raw external data) in the header and in
    ``h``, synced before the caller changes anything else: that is how a later reader
    tells that a writer unaware of those features touched the image (qemu clears them
    on every read-write open; diskimg on the first change, so that a refused operation
    leaves the file byte-identical).  v2 headers have no autoclear field."""
    if h.version >= 3 and h.autoclear_features & ~QCOW2_AUTOCLEAR_MASK:
        h.autoclear_features &= QCOW2_AUTOCLEAR_MASK
        header_io.set_autoclear(host, h.autoclear_features)
        host.flush()
        header_io.refresh_feature_table(host, h)  # qemu rewrites the whole header there


def begin_change(img: Qcow2Image) -> None:
    """Called before every change to the image: fails early without the secret, then
    clears unknown autoclear bits and sets the lazy-refcounts dirty bit on disk."""
    if img.header.crypt_method:
        _ = img.cipher  # fails early without the secret
    clear_unknown_autoclear(img.host, img.header)
    if not img._set_dirty_bit and img.header.compatible_features & \
            QCOW2_COMPAT_LAZY_REFCOUNTS:
        img.header.incompatible_features |= QCOW2_INCOMPAT_DIRTY
        write_header_features(img)
        img.host.flush()
        img._set_dirty_bit = True
    img._metadata_prealloc = None  # allocation changes: guess again on next use
    img._changed_since_map = True


def write_header_features(img: Qcow2Image) -> None:
    if img.header.version >= 3:
        header_io.set_incompat(img.host, img.header.incompatible_features)


def get_l2_for_write(img: Qcow2Image, cluster: int) -> tuple[int, L2Table]:
    """L2 table covering ``cluster``, allocated or copied (if shared) as needed."""
    l1i, l2_off = img._l2_location(cluster)
    ent = img.l1[l1i]
    if l2_off and ent & E.QCOW_OFLAG_COPIED:
        return l2_off, img.l2_cache.get(l2_off)
    new_off = alloc_clusters(img, 1)
    if l2_off:
        table = L2Table(u64_copy(img.l2_cache.get(l2_off).entries))
        img._pending_free.append((l2_off, img.cs, False))
    else:
        table = L2Table(u64_zeros(img.cs // 8))
    img.l2_cache.put(new_off, table)
    img.l1[l1i] = new_off | E.QCOW_OFLAG_COPIED
    img.l1_dirty.add(l1i)
    return new_off, table


def alloc_clusters(img: Qcow2Image, n: int) -> int:
    """Host offset of ``n`` newly allocated contiguous clusters, chosen as QEMU chooses
    them: QEMU drops a reference the moment an L2 entry lets go of it, so a cluster
    freed earlier in the same session (a discard, an unmapping zero-write, a replaced
    L2 table) is reused at once.  Here dropped references wait for the flush (after
    the tables no longer pointing at them are on disk); when one of them would come
    before the run found without it, the tables are written first and the references
    dropped (:func:`diskimg.qcow2.flush.release_pending`), so the choice is QEMU's and
    no data is ever written into a cluster an on-disk table still points at."""
    rc = img.refcounts
    pending = img._pending_free
    if pending:
        first = _first_pending_cluster(img, pending)
        if first is not None and rc.find_free(n, before=first) < 0:
            img.release_pending()
    return rc.alloc(n)


def _first_pending_cluster(img: Qcow2Image,
                           pending: list[tuple[int, int, bool]]) -> int | None:
    """Lowest host cluster whose reference is pending (external data-file entries,
    which carry no refcount, left out); computed incrementally, as the list only
    grows between flushes (a new list object starts again)."""
    cached = img._pending_low
    if cached is None or cached[0] is not pending or cached[1] > len(pending):
        cached = (pending, 0, None)
    _, seen, low = cached
    for host, n, _punch in pending[seen:]:
        if n > 0 and (low is None or host < low):
            low = host
    img._pending_low = (pending, len(pending), low)
    return None if low is None else low // img.cs


def alloc_data(img: Qcow2Image, clusters: list[int]) -> list[int]:
    """Host offsets for new data clusters of guest clusters ``clusters``: with an
    external data file the guest offset itself (QEMU's identity mapping, no refcounts),
    else one contiguous run of freshly allocated clusters."""
    if img._data_file_opened:
        hosts = [c << img.cb for c in clusters]
        if img._pending_free:
            # a deallocation still pending for one of these clusters (a discard or an
            # unmapping zero-write since the last flush) must not hit the data about
            # to be written there: the identity mapping hands out the same cluster
            taken = set(hosts)
            img._pending_free = [f for f in img._pending_free
                                  if not (f[1] < 0 and f[0] in taken)]
        return hosts
    base = alloc_clusters(img, len(clusters))
    return [base + k * img.cs for k in range(len(clusters))]


def _alloc_for_write(img: Qcow2Image, cluster: int, olds: list[int],
                     to_alloc: list[int]) -> list[int]:
    """Host offsets for the clusters ``cluster + j`` (j in ``to_alloc``, ascending) of
    one write whose old entries are ``olds``, placed as QEMU places them: a write is
    cut into host-contiguous runs, so clusters needing a new host cluster right after
    a cluster written in place (or just allocated) go to the host clusters that follow
    it when those are free, the rest to the first free run (:func:`alloc_clusters`)."""
    if img._data_file_opened:
        return alloc_data(img, [cluster + j for j in to_alloc])
    cs, mask, rc = img.cs, E.L2E_OFFSET_MASK, img.refcounts
    hosts: list[int] = []
    prev_end: int | None = None  # host offset following the run being built
    k = j = 0
    n = len(olds)
    while j < n:
        if k == len(to_alloc) or to_alloc[k] != j:  # written in place
            prev_end = (olds[j] & mask) + cs
            j += 1
            continue
        run = 1
        while k + run < len(to_alloc) and to_alloc[k + run] == j + run:
            run += 1
        got = 0
        if prev_end is not None:
            if img._pending_free and any(prev_end <= h < prev_end + run * cs
                                         for h, m, _ in img._pending_free if m > 0):
                img.release_pending()  # qemu has dropped those references already
            got = rc.alloc_free_at(prev_end // cs, run)
            base = prev_end
        if not got:
            got = run
            base = alloc_clusters(img, run)
        hosts.extend(base + i * cs for i in range(got))
        prev_end = base + got * cs
        k += got
        j += got
    return hosts


def forget_decoded(img: Qcow2Image, ent: int) -> None:
    """Drop the decoded copy of L2 entry ``ent``'s compressed cluster (the cache of
    decoded clusters, keyed by entry, is made when a compressed cluster is first read:
    an image that read none, a new one being written, has none to make here)."""
    decoded = img.__dict__.get("_decoded")
    if decoded is not None:
        decoded.pop(ent, None)


def free_entry(img: Qcow2Image, ent: int, punch: bool = False) -> None:
    """Schedule dropping the reference an L2 entry held (applied after the flush).

    ``punch``: a guest discard or unmapping zero-write; clusters that become free are
    then deallocated in the host file too (QEMU's default pass-discard-request).
    Pending entries are (host, length, punch); a negative length marks a cluster of an
    external data file, which is only deallocated."""
    t = img._cluster_type(ent)
    forget_decoded(img, ent)
    if img._data_file_opened:
        # data clusters of an external data file carry no refcount (identity mapped)
        if punch and t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
            img._pending_free.append((ent & E.L2E_OFFSET_MASK, -img.cs, True))
        return
    if t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
        img._pending_free.append((ent & E.L2E_OFFSET_MASK, img.cs, punch))
    elif t == E.ClusterType.COMPRESSED:
        host, clen = E.decode_compressed(ent, img.cb)
        img._pending_free.append((host & ~511, clen + (host & 511), punch))


def cow_is_zero(img: Qcow2Image, cluster: int, ent: int) -> bool:
    """True when the guest cluster reads as zeros and the image is not encrypted, so a
    partial write may zero the rest of a new cluster instead of copying it."""
    if img.header.crypt_method:
        return False
    t = img._cluster_type(ent)
    if t in (E.ClusterType.ZERO_PLAIN, E.ClusterType.ZERO_ALLOC):
        return True
    return t == E.ClusterType.UNALLOCATED and (
        img.backing is None or cluster << img.cb >= img.backing.size)


def cluster_contents(img: Qcow2Image, cluster: int, ent: int) -> bytearray:
    """Current guest contents of a whole cluster (for copy-on-write)."""
    buf = bytearray(img.cs)
    start = cluster << img.cb
    n = min(img.cs, img.size - start)
    if n > 0:
        img._readinto(start, memoryview(buf)[:n])
    return buf


def mark_bitmaps(img: Qcow2Image, offset: int, length: int) -> None:
    """Record guest bytes [offset, offset+length) as changed in the persistent bitmaps
    that track writes.  Free for an image without bitmaps: its bitmaps are made at open
    when it has the extension, or once asked for (an added bitmap), and are then the
    image's attribute; otherwise there are none to mark and their module is not loaded."""
    bitmaps = img.__dict__.get("bitmaps")
    if bitmaps is not None:
        bitmaps.mark(offset, length)


def write(img: Qcow2Image, offset: int, data: memoryview) -> None:
    begin_change(img)
    mark_bitmaps(img, offset, len(data))
    if img.extended:
        write_ext(img, offset, data)
        return
    end = offset + len(data)
    g = offset
    while g < end:
        cluster = g >> img.cb
        idx = cluster & (img.l2_entries - 1)
        stop = min(end, (cluster + img.l2_entries - idx) << img.cb)
        l2_off, table = get_l2_for_write(img, cluster)
        write_in_table(img, table.entries, l2_off, idx, cluster, g, stop, offset, data)
        g = stop


def write_in_table(img: Qcow2Image, ents: memoryview, l2_off: int, idx: int, cluster: int,
                    g: int, stop: int, offset: int, data: memoryview) -> None:
    """Write guest [g, stop), which lies in the L2 table ``ents`` (entry ``idx`` is
    guest cluster ``cluster``); ``data[0]`` is guest byte ``offset``.

    The clusters needing a new host cluster get one run, allocated at once (QEMU's
    order); the data goes out host-contiguous pieces at a time (one pwrite or pwritev
    per run), and only then are the L2 entries changed and old references dropped.
    A cluster this image alone references is written in place: a NORMAL one, and (as
    QEMU does) a zero-allocated one, whose copy-on-write areas are zeroed first."""
    cs, cb = img.cs, img.cb
    copied, mask = E.QCOW_OFLAG_COPIED, E.L2E_OFFSET_MASK
    normal, ctype = E.ClusterType.NORMAL, img._cluster_type
    df = img._data_file_opened
    n = ((stop - 1) >> cb) - cluster + 1
    olds = ents[idx : idx + n].tolist()  # (a copy: the entries change below)
    if not ((g | stop) & (cs - 1) or df or img.header.crypt_method or any(olds)):
        # whole clusters none of which is allocated (a copy into a new image): what the
        # general path below does for them, without its per-cluster steps: one run of
        # new host clusters, one pwrite, then the entries
        base = alloc_clusters(img, n)
        img.data_host.pwrite(base, data[g - offset : stop - offset])
        first = base | copied
        ents[idx : idx + n] = u64_run(first, n, cs)
        forget_decoded(img, 0)  # as free_entry does for each (empty) old entry
        img.l2_cache.mark_dirty(l2_off)
        return
    to_alloc: list[int] = []
    keep_zero: list[int] = []  # zero-allocated clusters written in place
    for j, ent in enumerate(olds):
        if ent & copied:
            t = ctype(ent)
            if t == normal:
                continue
            if t == E.ClusterType.ZERO_ALLOC:
                keep_zero.append(j)
                continue
        to_alloc.append(j)
    hosts = _alloc_for_write(img, cluster, olds, to_alloc) if to_alloc else []
    zeroed = set(keep_zero)
    # (host, guest lo, guest hi) runs of plain data, merged where host and guest are
    # both contiguous; copy-on-write clusters become their own buffers
    runs: list[list[int]] = []
    cow: list[tuple[int, bytearray, int]] = []
    k = 0
    for j in range(n):
        c_start = (cluster + j) << cb
        lo = g if g > c_start else c_start
        hi = stop if stop < c_start + cs else c_start + cs
        fresh = k < len(to_alloc) and to_alloc[k] == j
        if fresh:
            host = hosts[k]
            k += 1
        else:
            host = olds[j] & mask
            if host % cs or (df and host != c_start):
                img._check_data_offset(host, l2_off, idx + j, c_start)
            fresh = j in zeroed
        if fresh:
            if lo != c_start or hi != c_start + cs:
                old = olds[j]
                if not cow_is_zero(img, cluster + j, old):
                    buf = cluster_contents(img, cluster + j, old)
                    buf[lo - c_start : hi - c_start] = data[lo - offset : hi - offset]
                    cow.append((host, buf, c_start))
                    continue
                # like qemu: zero the copy-on-write areas instead of writing zeros
                img.data_host.zero_range(host, lo - c_start, keep_size=False)
                img.data_host.zero_range(host + hi - c_start, c_start + cs - hi,
                                          keep_size=False)
        h = host + lo - c_start
        last = runs[-1] if runs else None
        if last is not None and last[0] + last[2] - last[1] == h and last[2] == lo:
            last[2] = hi
        else:
            runs.append([h, lo, hi])
    writes: list[tuple[int, Any, int]] = [
        (h, data[lo - offset : hi - offset], lo) for h, lo, hi in runs]
    writes.extend(cow)
    # data first, then the L2 entries
    pwrite_runs(img, encrypt_writes(img, sorted(writes, key=lambda w: w[0])))
    if to_alloc:
        for k, j in enumerate(to_alloc):
            old = olds[j]
            ents[idx + j] = hosts[k] | copied
            free_entry(img, old)  # a no-op unless the old entry held a cluster
    for j in keep_zero:
        ents[idx + j] = olds[j] & (mask | copied)  # the zero flag goes: data now
    if to_alloc or keep_zero:
        img.l2_cache.mark_dirty(l2_off)


def write_ext(img: Qcow2Image, offset: int, data: memoryview) -> None:
    """Writes with extended L2 entries: only the touched subclusters become allocated
    (copy-on-write at subcluster granularity), as QEMU does."""
    end = offset + len(data)
    g = offset
    while g < end:
        cluster = g >> img.cb
        idx = cluster & (img.l2_entries - 1)
        stop = min(end, (cluster + img.l2_entries - idx) << img.cb)
        _write_ext_in_table(img, cluster, g, stop, offset, data)
        g = stop


def _write_ext_in_table(img: Qcow2Image, cluster: int, g: int, stop: int, offset: int,
                        data: memoryview) -> None:
    """:func:`write_ext` of guest [g, stop), which lies in one L2 table."""
    cs, scs = img.cs, img.sc_size
    l2_off, table = get_l2_for_write(img, cluster)
    idx = cluster & (img.l2_entries - 1)
    n = ((stop - 1) >> img.cb) - cluster + 1
    olds = table.entries[2 * idx : 2 * (idx + n) : 2].tolist()
    to_alloc = [j for j, ent in enumerate(olds)
                if not (ent & E.QCOW_OFLAG_COPIED
                        and img._cluster_type(ent) == E.ClusterType.NORMAL)]
    fresh = dict(zip(to_alloc, _alloc_for_write(img, cluster, olds, to_alloc)))
    for j in range(n):
        c_start = (cluster + j) << img.cb
        lo, hi = max(g, c_start), min(stop, c_start + cs)
        s_lo = (lo - c_start) // scs
        s_hi = -(-(hi - c_start) // scs)
        # guest bytes of the touched subclusters, merged with the new data (as qemu, a
        # subcluster past the disk's end is written whole, the bytes past it zeros)
        r_lo = c_start + s_lo * scs
        r_hi = c_start + s_hi * scs
        i = 2 * (idx + j)
        ent, bm = table.entries[i], table.entries[i + 1]
        host = ent & E.L2E_OFFSET_MASK
        t = img._cluster_type(ent)
        has_host = t == E.ClusterType.NORMAL  # (offset 0 is one in a data file)
        if has_host:
            img._check_data_offset(host, l2_off, idx + j, c_start)
        touched = E.subcluster_mask(s_lo, s_hi)
        if j not in fresh:
            new_host, new_bm = host, bm
        elif t == E.ClusterType.COMPRESSED or has_host:
            # compressed or shared cluster: copy the whole cluster to a new one
            new_host, new_bm = fresh[j], E.L2_BITMAP_ALL_ALLOC
            r_lo, r_hi = c_start, c_start + cs
        else:
            new_host, new_bm = fresh[j], bm
        buf = bytearray(r_hi - r_lo)
        if lo > r_lo or hi < r_hi:
            img._readinto(r_lo, memoryview(buf)[: min(r_hi, img.size) - r_lo])
        buf[lo - r_lo : hi - r_lo] = data[lo - offset : hi - offset]
        for h_off, piece in encrypt_writes(img, [(new_host + r_lo - c_start, buf, r_lo)]):
            img.data_host.pwrite(h_off, piece)
        new_bm = E.bitmap_with_alloc(new_bm, touched)
        table.entries[i] = new_host | E.QCOW_OFLAG_COPIED
        table.entries[i + 1] = new_bm
        if not (has_host and new_host == host):
            free_entry(img, ent)
            forget_decoded(img, ent)
    img.l2_cache.mark_dirty(l2_off)


def pwrite_runs(img: Qcow2Image, writes: list[tuple[int, Any]]) -> None:
    i = 0
    while i < len(writes):
        host, buf = writes[i]
        parts = [buf]
        end = host + len(buf)
        j = i + 1
        while j < len(writes) and writes[j][0] == end:
            parts.append(writes[j][1])
            end += len(writes[j][1])
            j += 1
        if len(parts) == 1:
            img.data_host.pwrite(host, parts[0])
        else:
            img.data_host.pwritev(host, parts)  # one syscall, no joined copy
        i = j


def encrypt_writes(img: Qcow2Image, writes: list[tuple[int, Any, int]]) -> list[tuple[int, Any]]:
    """Turn (host, data, guest) pieces into whole encrypted sectors
    (:func:`diskimg.crypto.sectors.encrypt_sectors`); partial sectors are completed with
    the current guest contents first."""
    cipher = img.cipher
    if cipher is None:
        return [(h, b) for h, b, _ in writes]
    from diskimg.crypto.sectors import encrypt_sectors  # only encrypted images pay for it

    out: list[tuple[int, Any]] = []
    for host, data, guest in writes:
        g0 = guest - (host & 511)

        def fill(buf: memoryview, g0: int = g0) -> None:
            img._readinto(g0, buf[: min(len(buf), img.size - g0)])

        out += encrypt_sectors(cipher, host, data, crypt.iv_shift(img, host, guest), fill)
    return out
