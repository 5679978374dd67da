"""qcow2 flush and close: dirty refcount blocks, then L2 tables, then L1 entries reach
the file (each step synced), then the references dropped since the last flush are freed
(and punched in the host file where a discard asked for it).  Also the corrupt bit, the
key wipe on close, and QEMU's metadata-preallocation guess made on the file as a flush
would leave it."""

from __future__ import annotations

import struct

from diskimg.errors import CorruptImageError, DiskImgError
from diskimg.qcow2 import LazyModule
from diskimg.qcow2.layout import QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DIRTY

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2 import cluster as C
    from diskimg.qcow2.image import Qcow2Image
    from diskimg.qcow2.refcount import Refcounts
else:  # the header writer: not for closing a read-only image (start-up)
    C = LazyModule("diskimg.qcow2.cluster", globals(), "C")


def metadata_preallocation(img: Qcow2Image) -> bool:
    """:meth:`Qcow2Image.metadata_preallocation` (documented there)."""
    if img._metadata_prealloc is None and img.host.allocated_size() is None:
        img._metadata_prealloc = False  # no allocated size to judge by (qemu: an error)
    if img._metadata_prealloc is None and img.read_only:
        # at most every cluster of the file has a refcount: a file with fewer clusters
        # than the threshold (any image not sparse in its host file) needs no refcount
        # read (map of a plain image loads no refcount code: start-up)
        real = (img.host.allocated_size() or 0) // img.cs
        if -(-img.host.size() // img.cs) < max(real * 10 // 9, real + 2):
            img._metadata_prealloc = False
    if img._metadata_prealloc is None:
        from diskimg.qcow2.refcount import Refcounts  # not for reading (start-up)

        try:
            rc = img._refcounts or Refcounts(img.host, img.header)
            alloc, size, freed = file_after_flush(img, rc)
            real = alloc // img.cs
            threshold = max(real * 10 // 9, real + 2)
            count = rc.count_used(-(-size // img.cs), threshold + len(freed))
            count -= sum(1 for c in freed if c * img.cs < size)
        except DiskImgError:
            real, count, threshold = 0, 0, 2  # broken refcounts: qemu ignores errors
        img._metadata_prealloc = count >= threshold
    return img._metadata_prealloc


def file_after_flush(img: Qcow2Image, rc: Refcounts) -> tuple[int, int, set[int]]:
    """(allocated bytes, size, clusters whose refcount drops to 0) of the host file as
    :meth:`flush` would leave it, computed from the cached tables without writing:
    the metadata preallocation guess of a changed image is then the one qemu makes on
    the flushed file, with no flush (fdatasync) per block status call.

    A flush writes the dirty L2 tables, refcount blocks and L1 entries (allocating
    the filesystem blocks under them that are holes now) and applies the pending
    frees, punching the clusters it frees with the punch flag."""
    host, cs = img.host, img.cs
    alloc, size = host.allocated_size() or 0, host.size()
    if img.read_only:
        return alloc, size, set()
    writes = [(off, cs) for off in img.l2_cache.dirty]
    writes += [(off, cs) for off in rc.blocks.dirty] if img._refcounts else []
    l1_off = img.header.l1_table_offset
    writes += [(l1_off + 8 * i, 8) for i in img.l1_dirty]
    dec: dict[int, int] = {}
    punch: set[int] = set()
    for off, n, p in img._pending_free:
        if n < 0:
            continue  # a data-file cluster: deallocated there, not in this file
        for c in range(off // cs, (off + n - 1) // cs + 1):
            dec[c] = dec.get(c, 0) + 1
            if p:
                punch.add(c)
    freed = {c for c, k in dec.items() if 0 < rc.get(c) <= k}
    if not writes and not freed:
        return alloc, size, freed
    blk = host.block_size()
    written: set[int] = set()  # filesystem blocks the flush writes
    for off, n in writes:
        written.update(range(off // blk, (off + n - 1) // blk + 1))
        size = max(size, off + n)
    for b in sorted(written):
        if not any(d for _, _, d in host.data_extents(b * blk, blk)):
            alloc += blk  # a hole now: the write allocates it
    if img.data_host is host:
        gone: set[int] = set()  # filesystem blocks wholly inside a punched run
        run = sorted(freed & punch)
        i = 0
        while i < len(run):
            j = i
            while j + 1 < len(run) and run[j + 1] == run[j] + 1:
                j += 1
            gone.update(range(-(-run[i] * cs // blk), (run[j] + 1) * cs // blk))
            i = j + 1
        for b in sorted(gone - written):
            if any(d for _, _, d in host.data_extents(b * blk, blk)):
                alloc -= blk
    return alloc, size, freed


def mark_corrupt(img: Qcow2Image, error: CorruptImageError) -> None:
    """Set the corrupt bit (incompatible feature bit 1) and refuse further writes, as
    qemu does when it finds inconsistent metadata while writing."""
    if img.read_only:
        return
    try:
        img.header.incompatible_features |= QCOW2_INCOMPAT_CORRUPT
        if img.header.version >= 3:
            C.write_header_features(img)
            img.host.flush()
    finally:
        img.read_only = True
        img._refcounts = None  # nothing more is written, not even on close
        img.l2_cache.clear()
        img.l1_dirty.clear()
        img._pending_free.clear()


def flush(img: Qcow2Image) -> None:
    if img._refcounts is None and not img.l1_dirty and not img._header_dirty \
            and not img.l2_cache.dirty:  # (an in-place write may dirty an L2 table only)
        img.host.flush()
        return
    if release_pending(img):
        img.flush_refcounts()
    if img._header_dirty:
        img.host.pwrite(0, img.header.pack())
        img._header_dirty = False
    img.host.flush()


def release_pending(img: Qcow2Image) -> bool:
    """Write the tables (refcount blocks, then L2 tables, then L1 entries, each step
    synced), so that none on disk points at a cluster whose reference is pending, then
    drop those references (in memory: the refcount blocks reach the file with the next
    flush) and punch the clusters a discard freed.  Returns whether any was pending.

    :func:`flush` does this; so does :func:`diskimg.qcow2.cluster.alloc_clusters`
    before it reuses a cluster freed since the last flush, as QEMU reuses it."""
    img.flush_refcounts()
    img.l2_cache.flush()
    img.host.flush()
    if img.l1_dirty:
        write_l1_entries(img)
        img.host.flush()
    if not img._pending_free:
        return False
    pending, img._pending_free = img._pending_free, []
    rc = img.refcounts
    to_punch: list[int] = []
    for host, n, punch in pending:
        if n < 0:  # external data file cluster: not refcounted, only deallocated
            img.data_host.punch_hole(host, -n)
            continue
        rc.free(host, n)
        if host in img.l2_cache.tables and rc.get(host // img.cs) == 0:
            img.l2_cache.drop(host)  # a freed L2 table must never be written back
        if punch:
            to_punch.extend(range(host // img.cs, (host + n - 1) // img.cs + 1))
    punch_free_clusters(img, to_punch)
    return True


def punch_free_clusters(img: Qcow2Image, clusters: list[int]) -> None:
    """Deallocate in the host file those of ``clusters`` now unreferenced, merged into
    runs (one punch per run, so small clusters still free whole filesystem blocks)."""
    rc = img.refcounts
    free = sorted({c for c in clusters if rc.get(c) == 0})
    i = 0
    while i < len(free):
        j = i
        while j + 1 < len(free) and free[j + 1] == free[j] + 1:
            j += 1
        img.data_host.punch_hole(free[i] * img.cs, (j - i + 1) * img.cs)
        i = j + 1


def write_l1_entries(img: Qcow2Image) -> None:
    base = img.header.l1_table_offset
    for i in sorted(img.l1_dirty):
        img.host.pwrite(base + 8 * i, struct.pack(">Q", img.l1[i]))
    img.l1_dirty.clear()


def wipe_keys(img: Qcow2Image) -> None:
    """Zero the unlocked key in place and drop the secrets (issue 8.6); a view never
    wipes the cipher it shares with its parent."""
    cipher = img._cipher
    if cipher is not None and (img._view_of is None or cipher is not img._view_of._cipher):
        cipher.wipe()
    img.secrets = {}


def close(img: Qcow2Image) -> None:
    if img._view_of is not None:
        wipe_keys(img)
        return  # a snapshot view shares its parent's files
    try:
        bitmaps = img.__dict__.get("bitmaps")  # none made: nothing tracked (and no import
        if not img.read_only and bitmaps is not None and bitmaps.tracked:  # at exit)
            bitmaps.store()
            flush(img)
        if not img.read_only and img._set_dirty_bit:
            img.header.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
            C.write_header_features(img)
            img.host.flush()
    finally:
        wipe_keys(img)
        if img._data_file_opened:
            img.data_host.close()
        img.host.close()
