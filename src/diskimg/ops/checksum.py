"""``checksum``: a digest of an image's guest content with the blkhash construction that
ovirt-imageio documents, so the value equals ovirt-imageio's ``checksum`` for the same
guest bytes whatever the format, compression, encryption or backing chain.

The construction: cut the guest bytes into ``block_size`` blocks (the last one may be
shorter), hash each block with ``H``, and hash the concatenated block digests with ``H``
again::

    checksum = H( H(block 1) + H(block 2) + ... + H(block N) )

``H`` is :mod:`hashlib`'s algorithm of that name; ``blake2b`` (the default) with a
32-byte digest.  A block that reads as zeros hashes to ``H(zeros)``, computed once: the
ranges block status reports as zeros (holes, zero clusters, unallocated ranges without a
backing file) are never read, and data blocks that turn out to be zeros are not hashed.
Data runs are read in large chunks on the calling thread and hashed on a worker pool
(:mod:`hashlib` releases the GIL while hashing large buffers).  Reads only."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from diskimg.device import BlockDevice
from diskimg.errors import UsageError
from diskimg.hostio import all_zero
from diskimg.hostio.workers import worker_pool
from diskimg.ops import ProgressFn, Source, _open
from diskimg.params import check_int

if TYPE_CHECKING:
    from diskimg.hostio.workers import Job

BLOCK_SIZE = 4 << 20  # ovirt-imageio's default block size
ALGORITHM = "blake2b"
MAX_BLOCK_SIZE = 64 << 20  # a block is hashed from one buffer
READ_CHUNK = 16 << 20  # data is read (and handed to a worker) this many bytes at a time
_MAX_ZERO_RUN = 1 << 16  # zero-block digests joined into one update at most
_BLAKE2B_DIGEST = 32  # blake2b is used with a 32-byte digest, as ovirt-imageio does

Hasher = Callable[..., Any]


def algorithms() -> list[str]:
    """The algorithm names :func:`checksum` accepts: hashlib's, but the variable-length
    ``shake_*`` ones (their digest has no fixed size)."""
    return sorted(a for a in hashlib.algorithms_available if not a.startswith("shake"))


def _hasher(algorithm: object) -> Hasher:
    """The hash constructor of ``algorithm`` (UsageError naming it when unknown)."""
    if not isinstance(algorithm, str):
        raise UsageError(f"algorithm must be a string, not {type(algorithm).__name__}",
                         field="algorithm")
    if algorithm == "blake2b":
        return partial(hashlib.blake2b, digest_size=_BLAKE2B_DIGEST)
    if algorithm.startswith("shake") or algorithm not in hashlib.algorithms_available:
        raise UsageError(f"Unsupported checksum algorithm '{algorithm}' (expecting one of "
                         f"{', '.join(algorithms())})", field="algorithm")
    return partial(hashlib.new, algorithm)


class Blkhash:
    """The block-based construction: :meth:`update` with the digests of consecutive
    blocks (:meth:`digests` of data, :meth:`zero_digests` of zero blocks), then
    :meth:`hexdigest`."""

    def __init__(self, algorithm: str = ALGORITHM, block_size: int = BLOCK_SIZE) -> None:
        self.new = _hasher(algorithm)
        self.block_size = block_size
        self.outer = self.new()
        self._zero: dict[int, bytes] = {}

    def zero_digest(self, length: int) -> bytes:
        """``H`` of ``length`` zero bytes (a whole block or the short last one), once."""
        d = self._zero.get(length)
        if d is None:
            d = self._zero[length] = self.new(bytes(length)).digest()
        return d

    def zero_digests(self, length: int) -> Iterator[bytes]:
        """The digests of the blocks of ``length`` zero bytes starting at a block
        boundary, joined into runs of at most ``_MAX_ZERO_RUN`` blocks."""
        bs = self.block_size
        whole, tail = divmod(length, bs)
        if whole:
            zd = self.zero_digest(bs)
            for k in range(0, whole, _MAX_ZERO_RUN):
                yield zd * min(_MAX_ZERO_RUN, whole - k)
        if tail:
            yield self.zero_digest(tail)

    def digests(self, buf: bytearray) -> bytes:
        """The digests of the blocks of ``buf`` (which starts at a block boundary), joined.
        Runs on a worker: hashing a large buffer releases the GIL."""
        mv = memoryview(buf)
        out = []
        for p in range(0, len(mv), self.block_size):
            block = mv[p : p + self.block_size]
            out.append(self.zero_digest(len(block)) if all_zero(block)
                       else self.new(block).digest())
        return b"".join(out)

    def update(self, digests: bytes) -> None:
        """Add the digests of the next blocks."""
        self.outer.update(digests)

    def hexdigest(self) -> str:
        return str(self.outer.hexdigest())


def _reads_zero_runs(dev: BlockDevice, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, zero)`` runs covering the guest bytes, from the public block status
    through the backing chain, neighbours of the same kind merged; ``zero``: the range
    reads as zeros (a hole, zero clusters, unallocated without a backing file)."""
    pos = 0
    cur: tuple[int, int, bool] | None = None
    while pos < size:
        st, _ = dev.block_status(pos, size - pos, coarse=True)
        if st.length <= 0:
            raise AssertionError("block status made no progress")
        end = pos + min(st.length, size - pos)
        zero = st.zero or (not st.allocated and not st.data)
        if cur is not None and cur[2] == zero:
            cur = (cur[0], end, zero)
        else:
            if cur is not None:
                yield cur
            cur = (pos, end, zero)
        pos = end
    if cur is not None:
        yield cur


class _Runs:
    """A forward cursor over :func:`_reads_zero_runs`."""

    def __init__(self, dev: BlockDevice, size: int) -> None:
        self.it = _reads_zero_runs(dev, size)
        self.runs: deque[tuple[int, int, bool]] = deque()
        self.size = size

    def _upto(self, end: int) -> None:
        while not self.runs or self.runs[-1][1] < end:
            nxt = next(self.it, None)
            if nxt is None:
                return
            self.runs.append(nxt)

    def zero_end(self, pos: int) -> int:
        """The end of the zero run at ``pos`` (``pos`` when ``pos`` holds data)."""
        while self.runs and self.runs[0][1] <= pos:
            self.runs.popleft()
        self._upto(pos + 1)
        _, end, zero = self.runs[0]
        return end if zero else pos

    def data(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the data ranges within ``[start, end)``."""
        self._upto(end)
        for s, e, zero in self.runs:
            if s >= end:
                break
            if not zero and e > start:
                lo = max(s, start)
                yield lo, min(e, end) - lo


def _checksum(dev: BlockDevice, blk: Blkhash, progress: ProgressFn | None,
              workers: int) -> str:
    size, bs = dev.size, blk.block_size
    chunk = max(bs, READ_CHUNK // bs * bs)
    runs = _Runs(dev, size)
    pool = worker_pool(workers, "checksum") if workers else None
    pending: deque[tuple[Job[bytes] | bytes, int]] = deque()  # in block order

    def drain(keep: int) -> None:
        while pending:
            item, end = pending[0]
            if not isinstance(item, bytes):
                if len(pending) <= keep:
                    return
                item = item.result()
            pending.popleft()
            blk.update(item)
            if progress is not None and end < size:
                progress(end * 100.0 / size)

    if progress is not None:
        progress(0.0)
    try:
        pos = 0
        while pos < size:
            zend = runs.zero_end(pos)
            # a zero run: its whole blocks (and the short last block) without reading
            zlen = zend - pos if zend == size else (zend - pos) // bs * bs
            if zlen:
                drain(0)  # the data before it, then the zero digests straight in (a PiB
                for d in blk.zero_digests(zlen):  # of 4 KiB blocks is 8 TiB of digests)
                    pending.append((d, pos + zlen))
                    drain(0)
                pos += zlen
                continue
            n = min(chunk, size - pos)
            buf = bytearray(n)  # zero ranges inside stay zeros: only data is read
            for off, k in runs.data(pos, pos + n):
                dev.readinto(off, memoryview(buf)[off - pos : off - pos + k])
            if pool is None:
                pending.append((blk.digests(buf), pos + n))
            else:
                pending.append((pool.submit(blk.digests, buf), pos + n))
            pos += n
            drain(2 * workers)
        drain(0)
        if progress is not None:
            progress(100.0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return blk.hexdigest()


def checksum(
    image: Source,
    *,
    algorithm: str = ALGORITHM,
    block_size: int = BLOCK_SIZE,
    format: str | None = None,  # noqa: A002
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The blkhash checksum of the guest content of ``image`` (a path, opened read-only,
    or an open :class:`~diskimg.BlockDevice`, borrowed), as ovirt-imageio's
    ``client.checksum`` computes it: ``{"algorithm": ..., "block_size": ...,
    "checksum": hex digest}``.

    ``algorithm`` is a :mod:`hashlib` name (``blake2b`` uses a 32-byte digest, as
    ovirt-imageio; :func:`diskimg.ops.checksum.algorithms` lists them); ``block_size``
    (bytes, 1 to 64 MiB) must be the same to compare two checksums.  ``progress`` is
    called with the percentage of the guest bytes done; ``workers`` threads hash the data
    (default: the CPU count, at most 4; 0 hashes on the calling thread).  Ranges that
    read as zeros are not read.
    """
    _hasher(algorithm)
    block_size = check_int("block_size", block_size, minimum=1)
    if block_size > MAX_BLOCK_SIZE:
        raise UsageError(f"block_size must be at most {MAX_BLOCK_SIZE}, not {block_size}",
                         field="block_size")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = check_int("workers", workers)
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {}), "options": dict(options or {})}
    dev, owned = _open(image, format, kw)
    try:
        digest = _checksum(dev, Blkhash(algorithm, block_size), progress, workers)
    finally:
        if owned:
            dev.close()
    return {"algorithm": algorithm, "block_size": block_size, "checksum": digest}
