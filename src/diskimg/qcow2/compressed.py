"""Reading compressed qcow2 clusters (QEMU's qcow2_co_preadv_compressed): the stored
bytes a COMPRESSED run's L2 entry names, decompressed with the codec of
:mod:`diskimg.qcow2.compress`.

The descriptor is decoded by :func:`entries.decode_compressed` only.  Invariants: no
descriptor makes a read go past the end of the file or past two clusters; the image's
small cache of decoded clusters (``img._decoded``, keyed by L2 entry) is used by the
image's own (single-threaded) reads only: :func:`decode` and :func:`read_compressed`
touch no shared state, so they may run on several threads at once.
"""

from __future__ import annotations

import os

from diskimg.errors import CorruptImageError
from diskimg.plan import Run
from diskimg.qcow2 import entries as E

TYPE_CHECKING = False
if TYPE_CHECKING:  # the threads are started when first used
    from diskimg.hostio.workers import WorkerPool
    from diskimg.qcow2.image import Qcow2Image

__all__ = ["decode", "decode_cached", "decode_many", "read_compressed"]

_DECODED_CACHE = 8
_POOL: WorkerPool | None = None


def _pool() -> WorkerPool:
    """A process-wide pool for decompression (threads: the codecs release the GIL)."""
    global _POOL
    if _POOL is None:
        from diskimg.hostio.workers import worker_pool

        _POOL = worker_pool(min(8, os.cpu_count() or 1), "decompress")
    return _POOL


def _stored(img: Qcow2Image, ent: int) -> tuple[int, bytes]:
    """(host offset, stored bytes) of a compressed cluster, bounded by two clusters (no
    descriptor can make us read more) and by the file end: the pread stops there (no
    fstat per cluster), and nothing read means the cluster lies past it."""
    host, clen = E.decode_compressed(ent, img.cb)
    raw = img.data_host.pread(host, min(clen, 2 * img.cs))
    if not raw:
        raise CorruptImageError(f"Compressed cluster at host offset {host:#x} lies past "
                                "the end of the file", offset=host)
    return host, raw


def decode(img: Qcow2Image, ent: int) -> bytes:
    """The cluster the compressed L2 entry ``ent`` holds (no cache; thread-safe)."""
    from diskimg.qcow2.compress import decompress  # threading & co: on first use

    host, raw = _stored(img, ent)
    return decompress(img.header.compression_type, raw, img.cs, host)


def decode_cached(img: Qcow2Image, ent: int) -> bytes:
    """:func:`decode` through the image's cache of the last few decoded clusters."""
    cache = img._decoded
    hit = cache.get(ent)
    if hit is not None:
        cache.move_to_end(ent)
        return hit
    data = cache[ent] = decode(img, ent)
    if len(cache) > _DECODED_CACHE:
        cache.popitem(last=False)
    return data


def decode_many(img: Qcow2Image, ents: list[int]) -> dict[int, bytes]:
    """Decompress several clusters at once in a thread pool (zlib and zstandard
    release the GIL), for large sequential reads of compressed images."""
    from diskimg.qcow2.compress import decompress

    inputs = [_stored(img, e) for e in ents]
    ctype, cs = img.header.compression_type, img.cs
    outs = _pool().map(lambda hi: decompress(ctype, hi[1], cs, hi[0]), inputs)
    return dict(zip(ents, outs, strict=True))


def read_compressed(img: Qcow2Image, run: Run, dst: memoryview) -> None:
    """Fill ``dst`` with the guest bytes from ``run.offset`` of the COMPRESSED run
    ``run`` (``len(dst) <= run.length``); thread-safe."""
    data = decode(img, run.entry)
    c_off = run.offset & (img.cs - 1)
    if c_off or len(dst) != len(data):
        dst[:] = memoryview(data)[c_off : c_off + len(dst)]
    else:
        dst[:] = data          # a whole cluster (what convert asks for)
