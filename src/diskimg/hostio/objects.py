"""What every host over one remote object (an HTTP URL, an fsspec URL) answers the same
way, written once: reads through the block cache (:mod:`diskimg.hostio.blockcache`),
fetched in parallel where the host can; the read errors' wording, an object that changed
since it was opened among them; the size recorded at open, no allocation or holes to
show, and the closed check naming the URL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

from diskimg.errors import ClosedImageError, FormatError, RemoteError
from diskimg.hostio.blockcache import BlockCache
from diskimg.hostio.workers import worker_pool

if TYPE_CHECKING:  # imported where used: opening an image starts no threads
    from diskimg.hostio.workers import WorkerPool

#: the one wording of an object replaced under a reader (every remote host)
CHANGED = "the object changed since it was opened"


def read_error(url: str, what: str, offset: int | None,
               status: int | None = None) -> RemoteError:
    """``Could not read 'URL' at offset X: what`` (no offset: not a read): the one wording
    of a failed read of a remote object."""
    at = "" if offset is None else f" at offset {offset:#x}"
    return RemoteError(f"Could not read '{url}'{at}: {what}", url=url, offset=offset,
                       status=status)


class ObjectHost:
    """Mixin for a host over one object of fixed size ``_size`` named by ``url``.  The
    subclass calls :meth:`_init_reads`, provides :meth:`_fetch_into` and sets
    ``_closed``."""

    url: str
    name: str
    local = False
    _size: int
    _closed: bool
    _block: int  # the size of the ranges fetched and cached
    _cache: BlockCache
    _changed: str | None  # why the object is known to have changed (every read fails)

    def _init_reads(self, block_size: int, cache_bytes: int, workers: int = 1,
                    min_part: int = 0) -> None:
        """Set up the block cache and the fetchers: ``workers`` ranges fetched at once
        (1: one after the other, in the reading thread), each at least ``min_part``
        bytes."""
        self._block = block_size
        self._cache = BlockCache(block_size, cache_bytes)
        self._workers = workers
        self._min_part = min_part
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self._changed = None

    def _fetch_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes at ``offset`` (all inside the object), or
        raise :class:`RemoteError`."""
        raise NotImplementedError

    # --- errors -----------------------------------------------------------------------
    def _read_error(self, what: str, offset: int | None,
                    status: int | None = None) -> RemoteError:
        """:func:`read_error` naming this host's URL."""
        return read_error(self.url, what, offset, status)

    def _changed_error(self, detail: str, offset: int | None,
                       status: int | None = None) -> RemoteError:
        """The object changed (``detail`` says how): this read fails and so does every
        later one, cached blocks included -- never a mix of two versions."""
        self._changed = f"{CHANGED} ({detail})"
        return self._read_error(self._changed, offset, status)

    # --- reads ------------------------------------------------------------------------
    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of the object are zeroed."""
        self._check_open()
        if self._changed is not None:
            raise self._read_error(self._changed, offset)
        n = len(buf)
        end = self._clip(offset, buf)
        if offset >= end:
            return n
        jobs: list[Callable[[], None]] = []
        for f in self._cache.plan(offset, end, self._size, buf, parts=self._workers,
                                  min_part=self._min_part):
            if f.direct:
                jobs.append(partial(self._fetch_into, f.lo, buf[f.lo - offset:f.hi - offset]))
            else:
                jobs.append(partial(self._fill, f.lo, f.hi, offset, buf))
        self._run(jobs)
        return n

    def _fill(self, lo: int, hi: int, offset: int, buf: memoryview) -> None:
        """Fetch ``[lo, hi)`` into cache blocks; copy what overlaps ``buf``."""
        data = memoryview(bytearray(hi - lo))
        self._fetch_into(lo, data)
        self._cache.store(lo, data, offset, buf)

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs``: the first in this thread, the others on the pool; every job
        ends before the first error is raised (no fetch writes into a buffer its
        caller has let go)."""
        if len(jobs) == 1 or self._workers == 1:
            for job in jobs:
                job()
            return
        if not jobs:
            return
        pool = self._executor()
        futs = [pool.submit(j) for j in jobs[1:]]
        first_error: BaseException | None = None
        try:
            jobs[0]()
        except BaseException as e:
            first_error = e
        errors = [first_error, *(f.exception() for f in futs)]
        for err in errors:
            if err is not None:
                raise err

    def _executor(self) -> WorkerPool:
        with self._pool_lock:
            if self._pool is None:      # the reading thread fetches too: one less
                self._pool = worker_pool(self._workers - 1, "fetch")
            return self._pool

    def _close_reads(self) -> None:
        """Drop the cache and stop the fetch threads (idempotent)."""
        self._cache.clear()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _clip(self, offset: int, buf: memoryview) -> int:
        """Where the object's bytes of a read of ``buf`` at ``offset`` end (``<= offset``:
        none); the part of ``buf`` past the object's end is zeroed.  A negative offset
        is refused naming the URL."""
        if offset < 0:
            raise FormatError(f"offset {offset:#x} in '{self.url}' is out of range",
                              offset=offset)
        n = len(buf)
        end = min(offset + n, self._size)
        if end < offset + n:
            tail = buf[max(0, end - offset):]
            tail[:] = bytes(len(tail))
        return end

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``; short only at the end."""
        self._check_open()
        length = max(0, min(length, self._size - offset))
        if length <= 0:
            return b""
        buf = bytearray(length)
        self.preadinto(offset, memoryview(buf))
        return bytes(buf)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly ``length`` bytes or raise naming ``what`` and the offset."""
        data = self.pread(offset, length)
        if len(data) != length:
            raise FormatError(f"{what} at offset {offset:#x} (length {length}) lies past "
                              f"the end of '{self.url}'", offset=offset)
        return data

    def zero_init(self) -> bool:
        """Never: a remote object is never a fresh, zeroed file."""
        return False

    def is_device(self) -> bool:
        return False

    def block_size(self) -> int:
        """The size of the ranges fetched and cached."""
        return self._block

    def identity(self) -> tuple[str, str]:
        """Equal for two opens of the same URL (backing-chain loop detection)."""
        return ("url", self.name)

    def size(self) -> int:
        self._check_open()
        return self._size

    def allocated_size(self) -> int | None:
        """None: a remote object has no allocation to ask about (qemu's curl driver
        neither: ``qemu-img info`` says "disk size: unavailable")."""
        self._check_open()
        return None

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """All data (a remote object has no holes we can see)."""
        end = min(offset + length, self._size)
        if end > offset:
            yield offset, end - offset, True

    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, data, zero) runs: holes read as zeros."""
        from diskimg.hostio.host import allocation_from_data

        return allocation_from_data(self, offset, length)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedImageError(f"I/O operation on closed URL '{self.url}'")
