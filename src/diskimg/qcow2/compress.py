"""Compression codecs for qcow2 clusters: zlib (raw deflate, wbits -12) and zstd.

Decompression always stops at one cluster of output (no decompression bombs) and must
produce exactly one cluster, as QEMU requires.  ``zstandard`` (and the ``platform`` module
it pulls in) is imported on first zstd use only, so opening plain images stays cheap.
"""

from __future__ import annotations

import io
import threading
import zlib

from diskimg.errors import CorruptImageError

TYPE_CHECKING = False  # (not typing's: its import cost a decoding thread ~3 ms, issue 20)
if TYPE_CHECKING:
    import zstandard

# zstd contexts cost ~40 us to create (as much as compressing a 64 KiB cluster): keep one
# compressor per level and decompressor per thread (they are not thread-safe)
# Frames carry the content size, as qemu's (ZSTD_compressStream2 with ZSTD_e_end in one
# call pledges the input size); their compressed blocks still differ from qemu 7.2's on
# Debian because the zstandard wheel bundles another libzstd (compatibility.md)
_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zc", {})
    z = cache.get(level)
    if z is None:
        import zstandard

        z = cache[level] = zstandard.ZstdCompressor(level=level)
    return z


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        import zstandard

        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    """At most ``cluster_size`` bytes of the first zstd frame in ``data`` (frames without
    a content size included)."""
    import zstandard

    d = _zstd_decompressor()
    try:
        # the usual frame (qemu's and ours pledge the size): one call that allocates
        # exactly a cluster, no reader object; whatever it refuses (or a frame of another
        # size) takes the streaming path below, which decides the result or the error
        if zstandard.frame_content_size(data) == cluster_size:
            whole: bytes = d.decompress(data)
            return whole
    except zstandard.ZstdError:
        pass
    try:
        reader = d.stream_reader(io.BytesIO(data), read_across_frames=False)
        out: bytes = reader.read(cluster_size)
    except zstandard.ZstdError as e:
        raise ValueError(str(e)) from None
    return out


def decompress(ctype: int, data: bytes, cluster_size: int, host_offset: int) -> bytes:
    """Decode one compressed cluster (``ctype`` 0 zlib, 1 zstd) found at ``host_offset``."""
    try:
        if ctype == 0:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        else:
            out = _zstd_decompress(data, cluster_size)
    except (zlib.error, ValueError) as e:
        raise CorruptImageError(f"Compressed cluster at host offset {host_offset:#x} does not "
                                f"decompress: {e}", offset=host_offset) from None
    if len(out) != cluster_size:
        raise CorruptImageError(f"Compressed cluster at host offset {host_offset:#x} "
                                f"decompresses to {len(out)} bytes, not {cluster_size}",
                                offset=host_offset)
    return out


def compress(ctype: int, data: bytes | bytearray | memoryview,
             level: int | None = None) -> bytes:
    """Encode one cluster; the caller stores it only if it is smaller than a cluster."""
    if ctype == 0:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION if level is None else level,
                             zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    return _zstd_compressor(3 if level is None else level).compress(data)
