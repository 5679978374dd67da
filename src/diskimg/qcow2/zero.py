"""qcow2 write-zeroes and discard, as QEMU lays them out: zero flags for whole clusters
(or lose their host cluster), zero bits for whole subclusters with extended L2, data
zeros through :mod:`diskimg.qcow2.cluster` for what cannot be flagged.
"""

from __future__ import annotations


from diskimg.plan import RunKind
from diskimg.qcow2 import cluster as C
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import mapper as M
from diskimg.qcow2.layout import QCOW2_AUTOCLEAR_DATA_FILE_RAW

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.image import Qcow2Image


def full_clusters(img: Qcow2Image, offset: int, length: int) -> tuple[int, int]:
    """(first, end) guest cluster indices fully inside the range (end exclusive);
    the last partial cluster of the disk counts as full."""
    first = -(-offset >> img.cb)
    end_b = offset + length
    end = (end_b >> img.cb) if end_b < img.size else -(-img.size >> img.cb)
    return first, max(first, end)


def write_zeroes(img: Qcow2Image, offset: int, length: int, may_unmap: bool) -> None:
    """QEMU's write-zeroes: the request is split at the zeroing granularity (a
    subcluster with extended L2, else a cluster; the block layer's split); aligned
    pieces get the zero flag, an unaligned piece gets it for its whole subcluster when
    the rest of that subcluster already reads as zeros and holds no data, and is
    written as data zeros otherwise (qcow2_co_pwrite_zeroes)."""
    C.begin_change(img)
    C.mark_bitmaps(img, offset, length)
    align = img.sc_size
    head, tail = offset % align, (offset + length) % align
    while length > 0:
        num = length
        if head:
            num = min(length, align - head)
            head = (head + num) % align
        elif tail and num > align:
            num -= tail
        _zeroes_piece(img, offset, num, may_unmap)
        offset += num
        length -= num


def _zeroes_piece(img: Qcow2Image, offset: int, length: int, may_unmap: bool) -> None:
    scs, end = img.sc_size, offset + length
    head = offset % scs
    tail = 0 if end >= img.size else -end % scs
    if head or tail:  # inside one subcluster
        start = offset - head
        if not (_reads_zero(img, start, head) and _reads_zero(img, end, tail)
                and _subcluster_unallocated_or_zero(img, start)):
            C.write(img, offset, memoryview(bytes(length)))
            return
        offset, end = start, min(img.size, start + scs)
    if not zeroize(img, offset, end, may_unmap):
        C.write(img, offset, memoryview(bytes(end - offset)))


def _reads_zero(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether guest [offset, offset+length) reads as zeros by block status through
    the backing chain (not by reading the data)."""
    length = min(length, img.size - offset)
    while length > 0:
        st, _ = img.block_status(offset, length)
        if not st.zero:
            return False
        offset += st.length
        length -= st.length
    return True


def _subcluster_unallocated_or_zero(img: Qcow2Image, offset: int) -> bool:
    run = M.lookup(img, offset, 1)
    return run.kind in (RunKind.UNALLOCATED, RunKind.ZERO)


def zeroize(img: Qcow2Image, start: int, end: int, may_unmap: bool) -> bool:
    """Make guest [start, end) read as zeros with zero flags (QEMU's
    qcow2_subcluster_zeroize): ``start`` is subcluster-aligned, ``end`` too or the end of
    the disk.  False, with nothing changed, where that cannot be done (a partial
    compressed cluster): the caller writes data zeros instead."""
    cs = img.cs
    head_end = min(end, -(-start // cs) * cs)
    tail_start = end if end >= img.size else max(head_end, end - end % cs)
    partial = [(s, e) for s, e in ((start, head_end), (tail_start, end)) if e > s]
    if partial and any(_is_compressed(img, s) for s, _ in partial):
        return False
    if (img.header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW
            and not img.header.crypt_method):
        # data_file_raw: the data file must keep reading as the disk (as qemu does).
        # Not when encrypted: there it holds ciphertext, never the disk, and zeros
        # written ahead of the L2 zero flag would decrypt to garbage after a crash
        img.data_host.zero_range(start, min(img.size, end) - start)
    for s, e in partial:
        _zero_subclusters(img, s, e)
    if tail_start > head_end:  # whole clusters (the disk's last one may be partial)
        first = head_end >> img.cb
        zero_clusters(img, first, first - (-(tail_start - head_end) >> img.cb), may_unmap,
                      discard=False)
    return True


def _is_compressed(img: Qcow2Image, offset: int) -> bool:
    return M.lookup(img, offset, 1).kind is RunKind.COMPRESSED


def _zero_subclusters(img: Qcow2Image, start: int, end: int) -> None:
    """Extended L2, part of one cluster: the subclusters of [start, end) read as zeros
    (zero bits set, allocation bits cleared; the host cluster stays)."""
    c_start = start & ~(img.cs - 1)
    lo = (start - c_start) // img.sc_size
    hi = -(-(end - c_start) // img.sc_size)
    l2_off, table = C.get_l2_for_write(img, start >> img.cb)
    i = 2 * ((start >> img.cb) & (img.l2_entries - 1))
    old = table.entries[i + 1]
    new = E.bitmap_with_zero(old, E.subcluster_mask(lo, hi))
    if new != old:
        table.entries[i + 1] = new
        img.l2_cache.mark_dirty(l2_off)


def discard(img: Qcow2Image, offset: int, length: int) -> None:
    C.begin_change(img)
    C.mark_bitmaps(img, offset, length)
    if img.header.version < 3 and (img.backing is not None
                                    or img.header.backing_file is not None):
        # As QEMU: without the zero flag, a discarded cluster would show the backing
        # file's data in place of what was written, so v2 ignores the request.
        return
    first, end = full_clusters(img, offset, length)
    if end > first:
        zero_clusters(img, first, end, True, discard=True)


def zero_clusters(img: Qcow2Image, first: int, end: int, unmap: bool, discard: bool) -> None:
    """Set full clusters [first, end) to read as zeros (v3) or deallocate them (the
    raw data file of a zero-write is zeroed by :func:`zeroize`, its one caller for
    zero-writes)."""
    v3 = img.header.version >= 3
    c = first
    while c < end:
        idx = c & (img.l2_entries - 1)
        n = min(img.l2_entries - idx, end - c)
        if not v3:
            if img.backing is not None and not discard:
                # v2 has no zero flag: write real zeros over the backing file
                start = c << img.cb
                stop = min(img.size, (c + n) << img.cb)
                for s in range(start, stop, 1 << 20):
                    C.write(img, s, memoryview(bytes(min(1 << 20, stop - s))))
                c += n
                continue
        # (as qemu, a table is allocated even where there was none: v2 gets one of
        # unallocated entries)
        l2_off, table = C.get_l2_for_write(img, c)
        ents = table.entries
        if img.extended:
            zero_ext(img, ents, idx, n, unmap, discard)
            img.l2_cache.mark_dirty(l2_off)
            c += n
            continue
        for j in range(idx, idx + n):
            old = ents[j]
            t = img._cluster_type(old)
            if not v3:
                new = 0
            elif unmap or not (old & E.QCOW_OFLAG_COPIED) or t not in (
                    E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
                new = E.QCOW_OFLAG_ZERO
            else:
                new = (old & (E.L2E_OFFSET_MASK | E.QCOW_OFLAG_COPIED)) | E.QCOW_OFLAG_ZERO
            if discard and v3 and t == E.ClusterType.UNALLOCATED and img.backing is None:
                new = 0
            if new != old:
                ents[j] = new
                if not new & E.L2E_OFFSET_MASK:
                    # the entry lost its cluster; v2 has no zero flag, so a zero-write
                    # there is qemu's discard request, which punches the freed cluster
                    C.free_entry(img, old, punch=unmap or not v3)
                C.forget_decoded(img, old)
        img.l2_cache.mark_dirty(l2_off)
        c += n


def zero_ext(img: Qcow2Image, ents: memoryview, idx: int, n: int, unmap: bool,
             discard: bool = False) -> None:
    """Extended L2: every subcluster of clusters idx..idx+n-1 reads as zeros; the host
    cluster is kept (zero-allocated) unless ``unmap`` or it is compressed/shared.  A
    ``discard`` always drops the host cluster and leaves an unallocated cluster without
    a backing file as it is (as qemu)."""
    for j in range(idx, idx + n):
        ent = ents[2 * j]
        t = img._cluster_type(ent)
        if discard and t == E.ClusterType.UNALLOCATED and img.backing is None:
            continue
        keep = (not unmap and not discard and ent & E.QCOW_OFLAG_COPIED
                and t == E.ClusterType.NORMAL)
        new = (ent & (E.L2E_OFFSET_MASK | E.QCOW_OFLAG_COPIED)) if keep else 0
        if not keep:
            C.free_entry(img, ent, punch=unmap)  # a no-op for an entry without cluster
            C.forget_decoded(img, ent)
        ents[2 * j], ents[2 * j + 1] = new, E.L2_BITMAP_ALL_ZERO
