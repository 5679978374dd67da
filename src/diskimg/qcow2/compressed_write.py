"""qcow2 compressed writes (qemu-io ``write -c``, ``convert -c``): one cluster
compressed into a run of bytes allocated by :meth:`Refcounts.alloc_bytes`, the L2 entry
encoded by :func:`diskimg.qcow2.entries.encode_compressed`."""

from __future__ import annotations

from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.qcow2 import cluster as C
from diskimg.qcow2 import entries as E

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.qcow2.image import Qcow2Image


def compress_cluster(img: Qcow2Image, data: bytes | bytearray | memoryview) -> bytes | None:
    """:meth:`Qcow2Image.compress_cluster` (documented there)."""
    from diskimg.qcow2.compress import compress

    if len(data) != img.cs:  # the last cluster of the disk: padded with zeros
        data = bytes(data).ljust(img.cs, b"\0")
    out = compress(img.header.compression_type, data)
    return out if len(out) < img.cs else None


def align_compressed_end(img: Qcow2Image) -> None:
    """:meth:`Qcow2Image.align_compressed_end` (documented there)."""
    end = img.host.size()
    if end % 512:
        img.host.truncate(end + (-end % 512))


def write_compressed(img: Qcow2Image, offset: int, data: bytes | bytearray | memoryview,
                     *, compressed: bytes | None = None) -> None:
    """:meth:`Qcow2Image.write_compressed` (documented there)."""
    img._check_writable()
    mv = memoryview(data).cast("B")
    img._check_range(offset, len(mv))
    cs = img.cs
    if offset % cs or (len(mv) != cs and offset + len(mv) != img.size):
        raise UsageError("Compressed writes must cover exactly one cluster")
    with img._corruption_guard():
        store_compressed(img, offset, mv, compressed)


def store_compressed(img: Qcow2Image, offset: int, mv: memoryview,
                     compressed: bytes | None) -> None:
    """One cluster compressed (or, when ``compressed`` is None and it does not compress,
    as a normal cluster), without the checks of :func:`write_compressed`."""
    # refused before begin_change: a refusal must not set the dirty bit
    if img.header.crypt_method:
        raise UnsupportedFeatureError("Compression of encrypted images is not supported")
    if img._data_file_opened:
        raise UnsupportedFeatureError("Compression is not supported with an external "
                                      "data file")
    C.begin_change(img)
    C.mark_bitmaps(img, offset, len(mv))
    out = compressed if compressed is not None else compress_cluster(img, mv)
    if out is None:
        C.write(img, offset, mv)
        return
    cluster = offset >> img.cb
    l2_off, table = C.get_l2_for_write(img, cluster)
    host = img.refcounts.alloc_bytes(len(out))
    img.data_host.pwrite(host, out)
    idx = cluster & (img.l2_entries - 1)
    new = E.encode_compressed(host, len(out), img.cb)
    C.forget_decoded(img, new)  # same host bytes may have held a freed cluster
    if img.extended:
        old = table.entries[2 * idx]
        table.entries[2 * idx] = new
        table.entries[2 * idx + 1] = 0
    else:
        old = table.entries[idx]
        table.entries[idx] = new
    C.free_entry(img, old)
    C.forget_decoded(img, old)
    img.l2_cache.mark_dirty(l2_off)


def write_compressed_clusters(
        img: Qcow2Image, offset: int,
        clusters: list[tuple[bytes | bytearray | memoryview, bytes | None]]) -> None:
    """:meth:`Qcow2Image.write_compressed_clusters` (documented there)."""
    img._check_writable()
    cs = img.cs
    total = sum(len(d) for d, _ in clusters)
    img._check_range(offset, total)
    if offset % cs or any(len(d) != cs for d, _ in clusters[:-1]) or (
            clusters and len(clusters[-1][0]) != cs and offset + total != img.size):
        raise UsageError("Compressed writes must cover exactly one cluster")
    if not clusters:
        return
    with img._corruption_guard():
        C.begin_change(img)
        if img.header.crypt_method or img._data_file_opened or img.extended:
            for k, (d, packed) in enumerate(clusters):  # the one-by-one path
                mv = memoryview(d).cast("B")
                if packed is None:
                    C.write(img, offset + k * cs, mv)
                else:
                    store_compressed(img, offset + k * cs, mv, packed)
            return
        C.mark_bitmaps(img, offset, total)
        copied, mask = E.QCOW_OFLAG_COPIED, E.L2E_OFFSET_MASK
        writes: list[tuple[int, Any]] = []
        updates: list[tuple[int, int, int]] = []  # (L2 table offset, index, new entry)
        for k, (d, packed) in enumerate(clusters):
            cluster = (offset >> img.cb) + k
            l2_off, table = C.get_l2_for_write(img, cluster)
            idx = cluster & (img.l2_entries - 1)
            old = table.entries[idx]
            if packed is not None:
                host = img.refcounts.alloc_bytes(len(packed))
                new = E.encode_compressed(host, len(packed), img.cb)
                writes.append((host, packed))
            elif len(d) != cs:  # the disk's partial last cluster: copy-on-write rules
                C.pwrite_runs(img, writes)
                writes = []
                C.write_in_table(img, table.entries, l2_off, idx, cluster,
                                     cluster << img.cb, (cluster << img.cb) + len(d),
                                     cluster << img.cb, memoryview(d).cast("B"))
                continue
            elif old & copied and img._cluster_type(old) == E.ClusterType.NORMAL:
                img._check_data_offset(old & mask, l2_off, idx, cluster << img.cb)
                writes.append((old & mask, d))  # written in place, entry unchanged
                continue
            else:
                new = C.alloc_data(img, [cluster])[0] | copied
                writes.append((new & mask, d))
            updates.append((l2_off, idx, new))
        C.pwrite_runs(img, writes)  # data first, then the L2 entries
        for l2_off, idx, new in updates:
            ents = img.l2_cache.get(l2_off).entries
            old = ents[idx]
            ents[idx] = new
            C.forget_decoded(img, new)  # same host bytes may have held a freed cluster
            C.free_entry(img, old)
            img.l2_cache.mark_dirty(l2_off)
