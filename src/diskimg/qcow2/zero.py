"""qcow2 write-zeroes and discard (whole clusters get the zero flag, or lose their
host cluster; partial clusters are written as data through :mod:`diskimg.qcow2.cluster`).
"""

from __future__ import annotations

from array import array

from diskimg.qcow2 import cluster as C
from diskimg.qcow2 import entries as E
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
    C.begin_change(img)
    img.bitmaps.mark(offset, length)
    first, end = full_clusters(img, offset, length)
    head_end = min(offset + length, first << img.cb)
    if head_end > offset:
        C.write(img, offset, memoryview(bytes(head_end - offset)))
    tail_start = max(offset, end << img.cb)
    if end > first and tail_start < offset + length:
        C.write(img, tail_start, memoryview(bytes(offset + length - tail_start)))
    elif end <= first and head_end < offset + length:
        C.write(img, head_end, memoryview(bytes(offset + length - head_end)))
        return
    if end > first:
        zero_clusters(img, first, end, may_unmap, discard=False)


def discard(img: Qcow2Image, offset: int, length: int) -> None:
    C.begin_change(img)
    img.bitmaps.mark(offset, length)
    if img.header.version < 3 and (img.backing is not None
                                    or img.header.backing_file is not None):
        # As QEMU: without the zero flag, a discarded cluster would show the backing
        # file's data in place of what was written, so v2 ignores the request.
        return
    first, end = full_clusters(img, offset, length)
    if end > first:
        zero_clusters(img, first, end, True, discard=True)


def zero_clusters(img: Qcow2Image, first: int, end: int, unmap: bool, discard: bool) -> None:
    """Set full clusters [first, end) to read as zeros (v3) or deallocate them."""
    v3 = img.header.version >= 3
    if (not discard and img.header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW
            and not img.header.crypt_method):
        # data_file_raw: the data file must keep reading as the disk (as qemu does).
        # Not when encrypted: there it holds ciphertext, never the disk, and zeros
        # written ahead of the L2 zero flag would decrypt to garbage after a crash
        start = first << img.cb
        img.data_host.zero_range(start, min(img.size, end << img.cb) - start)
    c = first
    while c < end:
        idx = c & (img.l2_entries - 1)
        n = min(img.l2_entries - idx, end - c)
        _, l2_off = img._l2_location(c)
        if not v3:
            if img.backing is not None and not discard:
                # v2 has no zero flag: write real zeros over the backing file
                start = c << img.cb
                stop = min(img.size, (c + n) << img.cb)
                for s in range(start, stop, 1 << 20):
                    C.write(img, s, memoryview(bytes(min(1 << 20, stop - s))))
                c += n
                continue
            if not l2_off:
                c += n
                continue
        l2_off, table = C.get_l2_for_write(img, c)
        ents = table.entries
        if img.extended:
            zero_ext(img, ents, idx, n, unmap)
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
                    C.free_entry(img, old, punch=unmap)  # the entry lost its cluster
                img._decoded.pop(old, None)
        img.l2_cache.mark_dirty(l2_off)
        c += n


def zero_ext(img: Qcow2Image, ents: array[int], idx: int, n: int, unmap: bool) -> None:
    """Extended L2: every subcluster of clusters idx..idx+n-1 reads as zeros; the host
    cluster is kept (zero-allocated) unless ``unmap`` or it is compressed/shared."""
    zero_bits = ((1 << E.SUBCLUSTERS_PER_CLUSTER) - 1) << 32
    for j in range(idx, idx + n):
        ent = ents[2 * j]
        keep = (not unmap and ent & E.QCOW_OFLAG_COPIED
                and img._cluster_type(ent) == E.ClusterType.NORMAL)
        new = (ent & (E.L2E_OFFSET_MASK | E.QCOW_OFLAG_COPIED)) if keep else 0
        if not keep:
            C.free_entry(img, ent, punch=unmap)  # a no-op for an entry without cluster
            img._decoded.pop(ent, None)
        ents[2 * j], ents[2 * j + 1] = new, zero_bits
