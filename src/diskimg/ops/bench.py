"""``bench``: qemu-img bench's simple sequential I/O benchmark over a
:class:`~diskimg.BlockDevice`.

``count`` requests of ``buffer_size`` bytes: the first at ``offset``, each next one
``step`` bytes further (``step`` 0: the buffer size), wrapping modulo the image size as
qemu-img does (the offset after a request is reduced modulo the size, the first offset
is taken as given).  A request that does not fit inside the image fails the run with
qemu's ``Failed request: Input/output error``; every request is checked before the first
one is made, so a failing write bench writes nothing.  Write requests write a buffer of
``pattern`` bytes (qemu's default: zeros).

``depth`` is qemu's queue depth: how many requests may be in flight.  A BlockDevice is
not shared between threads, so here the requests are made one at a time in submission
order, and the depth decides when the flushes of ``flush_interval`` happen: as in qemu,
a flush is due when the number of requests not yet submitted is a multiple of
``flush_interval`` (the last request included); with ``drain`` (qemu's default) the
queue of up to ``depth`` submitted requests is completed first and nothing new is
submitted until the flush is done; without it (``--no-drain``) the flush is issued at
once, for every completion at which it is due."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError
from diskimg.ops import Source, _open
from diskimg.params import check_int

COUNT = 75000  # qemu-img bench's defaults
DEPTH = 64
BUFFER_SIZE = 4096
FAILED_REQUEST = "Failed request: Input/output error"  # qemu's words (EIO)


@dataclass(frozen=True, slots=True)
class BenchResult:
    """What :func:`bench` did: the parameters as used (``step`` resolved) and the time
    the requests took."""

    requests: int
    write: bool
    buffer_size: int
    depth: int
    offset: int
    step: int
    flush_interval: int
    #: how many flushes were made (0 without ``flush_interval``)
    flushes: int
    #: wall-clock seconds from the first request to the last completion
    seconds: float


def check_params(*, count: int, depth: int, write: bool, flush_interval: int) -> None:
    """The checks qemu-img bench makes before it opens the image, in its words."""
    if not write and flush_interval:
        raise UsageError("--flush-interval is only available in write tests",
                         field="flush_interval")
    if flush_interval and flush_interval < depth:
        raise UsageError("Flush interval can't be smaller than depth", field="flush_interval")
    if count and not depth:  # qemu waits forever for requests it never submits
        raise UsageError("Invalid queue depth specified", field="depth")


def offsets(offset: int, step: int, size: int) -> Iterator[int]:
    """The request offsets: ``offset``, then each previous one plus ``step`` modulo
    ``size`` (an empty image has no modulus: the offsets only grow)."""
    pos = offset
    while True:
        yield pos
        pos = (pos + step) % size if size else pos + step


def first_failing(count: int, offset: int, step: int, size: int, length: int) -> int | None:
    """The offset of the first of the ``count`` requests of ``length`` bytes that does
    not fit inside ``size`` bytes, or None.

    After the first request the offsets are ``(offset + i * step) mod size``: multiples of
    ``g = gcd(step, size)`` plus ``offset mod g``, repeating with period ``size / g``.  When
    even the largest of those leaves room for ``length`` bytes none can fail (the usual
    case, answered without a loop); otherwise no more than one period is looked at."""
    if not count:
        return None
    if offset + length > size:
        return offset
    if count == 1:
        return None
    if not size:  # no modulus: the offsets only grow, the second is the one to check
        return offset + step if offset + step + length > size else None
    g = math.gcd(step, size)
    if offset % g + size - g + length <= size:
        return None
    it = offsets(offset, step, size)
    next(it)
    for _ in range(min(count - 1, size // g)):
        pos = next(it)
        if pos + length > size:
            return pos
    return None


def run(dev: BlockDevice, *, count: int, buffer_size: int, depth: int, offset: int,
        step: int, write: bool, pattern: int, flush_interval: int,
        drain: bool) -> BenchResult:
    """The requests on an open device (parameters already checked, ``step`` resolved)."""
    size = dev.size
    bad = first_failing(count, offset, step, size, buffer_size)
    if bad is not None:
        raise DiskImgError(FAILED_REQUEST, path=dev.filename, operation="bench",
                           field="offset",
                           reason=f"request of {buffer_size} bytes at offset {bad} ends "
                                  f"past the image end ({size})")
    buf = memoryview(bytes([pattern]) * buffer_size if write else bytearray(buffer_size))
    where = offsets(offset, step, size)
    queued, unsubmitted, flushes = 0, count, 0
    start = time.monotonic()

    def submit() -> None:
        nonlocal queued, unsubmitted
        k = min(depth - queued, unsubmitted)
        queued += k
        unsubmitted -= k

    submit()
    while queued:  # complete the oldest request in flight
        pos = next(where)
        if write:
            dev.write(pos, buf)
        else:
            dev.readinto(pos, buf)
        queued -= 1
        if flush_interval and unsubmitted % flush_interval == 0:
            if drain and queued:
                continue  # draining: nothing new until the queue is empty and flushed
            dev.flush()
            flushes += 1
        submit()
    seconds = time.monotonic() - start
    return BenchResult(count, write, buffer_size, depth, offset, step, flush_interval,
                       flushes, seconds)


def bench(
    image: Source,
    *,
    count: int = COUNT,
    buffer_size: int = BUFFER_SIZE,
    depth: int = DEPTH,
    offset: int = 0,
    step: int = 0,
    write: bool = False,
    pattern: int = 0,
    flush_interval: int = 0,
    drain: bool = True,
    format: str | None = None,  # noqa: A002
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, str] | None = None,
) -> BenchResult:
    """``qemu-img bench``: ``count`` sequential read requests (``write``: write requests
    of ``pattern`` bytes) of ``buffer_size`` bytes on ``image`` (a path, opened read-only,
    or read-write with QEMU's write lock for a write bench; or an open
    :class:`~diskimg.BlockDevice`, borrowed), starting at ``offset`` and advancing by
    ``step`` (0: ``buffer_size``) modulo the image size.  ``depth`` and
    ``flush_interval``/``drain`` are qemu's queue depth and flush schedule (module
    docstring); the requests themselves are made one at a time, in order.

    A request that would not fit inside the image refuses the whole run before any I/O
    (``DiskImgError`` "Failed request: Input/output error", ``field="offset"``).
    """
    count = check_int("count", count)
    buffer_size = check_int("buffer_size", buffer_size)
    depth = check_int("depth", depth)
    offset = check_int("offset", offset)
    step = check_int("step", step) or buffer_size
    flush_interval = check_int("flush_interval", flush_interval)
    pattern = check_int("pattern", pattern)
    if pattern > 0xFF:
        raise UsageError(f"pattern must be a byte (0 to 255), not {pattern}", field="pattern")
    check_params(count=count, depth=depth, write=write, flush_interval=flush_interval)
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {}), "options": dict(options or {})}
    if write and isinstance(image, BlockDevice) and image.read_only:
        raise UsageError("a write bench needs an image opened read-write", field="write")
    if write and force_share:
        raise UsageError("force-share=on can only be used with read-only images",
                         field="force_share")
    dev, owned = _open(image, format, kw, "r+" if write else "r")
    try:
        return run(dev, count=count, buffer_size=buffer_size, depth=depth, offset=offset,
                   step=step, write=write, pattern=pattern, flush_interval=flush_interval,
                   drain=drain)
    finally:
        if owned:
            dev.close()
