"""One NBD export over a :class:`~diskimg.BlockDevice`: its transmission flags and block
sizes as qemu-nbd advertises them, and the commands' effects on the device.

Every device call goes through :attr:`Export.lock` (the devices are not thread-safe and
every connection runs on its own thread).  Failures become :class:`CommandError` with the
NBD error value the spec asks for; nothing here touches a socket.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..device import BlockDevice
from ..errors import DiskImgError, UnsupportedFeatureError, UsageError
from .meta import MetaContexts
from .wire import QEMU_DIRTY_BITMAP_PREFIX, encode_string
from .protocol import (NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF,
                       NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
                       NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
                       NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO,
                       NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_FLAG_CAN_MULTI_CONN,
                       NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE,
                       NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH,
                       NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
                       NBD_MAX_BUFFER_SIZE, Request, to_nbd_error)

#: the block sizes qemu-nbd advertises for an image without alignment needs
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096


class CommandError(Exception):
    """A command failed: ``error`` is the NBD error value to reply with."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


#: the command flags each command accepts (FUA is valid on every command)
_VALID_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_REQ_ONE,
}
_KNOWN = (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_CACHE,
          NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS)
_WRITES = (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM)


class Export:
    """What a server serves: ``dev`` under ``name``.

    ``shared``: how many clients may connect at once (``-e``; 0: any number); any value
    but 1 sets NBD_FLAG_CAN_MULTI_CONN, as qemu-nbd does (one process, one cache: a flush on one
    connection covers the writes of all).  ``discard``: ``"ignore"`` (TRIM succeeds and
    changes nothing, qemu-nbd's default) or ``"unmap"`` (TRIM discards)."""

    def __init__(self, dev: BlockDevice, name: str = "", *, description: str = "",
                 read_only: bool | None = None, shared: int = 1, discard: str = "ignore",
                 allocation_depth: bool = False, bitmaps: Sequence[str] = ()) -> None:
        if discard not in ("ignore", "unmap"):
            raise UsageError(f"Invalid discard mode '{discard}'", field="discard")
        self.dev = dev
        self.name = name
        self.description = description
        self.read_only = dev.read_only if read_only is None else (read_only or dev.read_only)
        self.shared = shared
        self.discard = discard
        self.size = dev.size
        self.lock = threading.Lock()
        for b in bitmaps:
            names = [r.name for r in dev.bitmaps.list()]
            if b not in names:
                raise UsageError(f"Bitmap '{b}' is not found", field="bitmap")
            try:  # a name whose bytes are not UTF-8 (qemu-img stores any) has no context
                encode_string(QEMU_DIRTY_BITMAP_PREFIX + b, "context name")
            except ValueError:  # (UnicodeEncodeError is one)
                raise UsageError(f"Bitmap '{b}' cannot be exported: its name is not UTF-8, "
                                 "and NBD context names must be", field="bitmap") from None
        self._dirty_cache: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        #: bumped by every change, so cached dirty extents are read again
        self.generation = 0
        self.meta = MetaContexts(dev, allocation_depth=allocation_depth, bitmaps=bitmaps,
                                 dirty_list=self._dirty_list)
        self.encrypted = self._encrypted()
        # zeroing is cheap (FAST_ZERO) only by fallocate (raw) or whole qcow2 clusters
        self._fast_zero_align = (1 if dev.format == "raw" else dev.cluster_size
                                 if dev.format == "qcow2" and not self.encrypted else None)
        # encrypted data is read and written in 512-byte sectors (qemu-nbd's minimum)
        self.min_block = 512 if self.encrypted else MIN_BLOCK
        self.preferred_block = PREFERRED_BLOCK
        self.max_block = NBD_MAX_BUFFER_SIZE

    def _encrypted(self) -> bool:
        if self.dev.format == "luks":
            return True
        if self.dev.format != "qcow2":
            return False
        try:
            return self.dev.info().encrypted
        except DiskImgError:
            return False

    def _dirty_list(self, bitmap: str) -> list[tuple[int, int]]:
        hit = self._dirty_cache.get(bitmap)
        if hit is None or hit[0] != self.generation:
            hit = (self.generation, list(self.dev.dirty_extents(bitmap)))
            self._dirty_cache[bitmap] = hit
        return hit[1]

    def flags(self, structured: bool) -> int:
        """The transmission flags (qemu-nbd's set for the same export)."""
        f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE
        if structured:
            f |= NBD_FLAG_SEND_DF
        if self.read_only:
            f |= NBD_FLAG_READ_ONLY
        else:
            f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        if self.shared != 1:  # 0: no limit, as qemu-nbd -e 0
            f |= NBD_FLAG_CAN_MULTI_CONN
        return f

    # --- request checks ---------------------------------------------------------------
    def check(self, req: Request, structured: bool, n_contexts: int) -> None:
        """Raise :class:`CommandError` for a request the export refuses (before any
        effect): unknown command or flag, a range past the end, a write to a read-only
        export, a block status without a context."""
        t = req.type
        if t not in _KNOWN:
            raise CommandError(NBD_EINVAL, f"unknown command {t}")
        valid = NBD_CMD_FLAG_FUA | _VALID_FLAGS.get(t, 0)
        if t == NBD_CMD_READ and not structured:
            valid &= ~NBD_CMD_FLAG_DF
        if req.flags & ~valid:
            raise CommandError(NBD_EINVAL, f"unsupported flags {req.flags & ~valid:#x} "
                               f"for command {t}")
        if t == NBD_CMD_FLUSH:
            return
        if t == NBD_CMD_READ and req.length > NBD_MAX_BUFFER_SIZE:
            raise CommandError(NBD_EINVAL, f"read of {req.length} bytes is more than "
                               f"{NBD_MAX_BUFFER_SIZE}")
        if req.offset > self.size or req.length > self.size - req.offset:
            err = NBD_ENOSPC if t in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
            raise CommandError(err, f"operation past the end of the export: offset "
                               f"{req.offset}, length {req.length}, size {self.size}")
        if self.read_only and t in _WRITES:
            raise CommandError(NBD_EPERM, "the export is read-only")
        if t == NBD_CMD_BLOCK_STATUS:
            if not n_contexts:
                raise CommandError(NBD_EINVAL, "no metadata context was negotiated")
            if not req.length:
                raise CommandError(NBD_EINVAL, "block status of 0 bytes")

    # --- effects (the caller holds the lock) -------------------------------------------
    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """NBD_CMD_WRITE (``fua``: flushed before returning)."""
        with _errors("write"):
            self.dev.write(offset, data)
            self.generation += 1
            if fua:
                self.dev.flush()

    def write_zeroes(self, offset: int, length: int, flags: int) -> None:
        """NBD_CMD_WRITE_ZEROES with its command ``flags`` (NO_HOLE: keep the range
        allocated; FAST_ZERO: refuse with ENOTSUP unless the zeroing is cheap; FUA)."""
        if flags & NBD_CMD_FLAG_FAST_ZERO:
            a = self._fast_zero_align
            if a is None or offset % a or (length % a and offset + length != self.size):
                raise CommandError(NBD_ENOTSUP, "zeroing this range is not fast")
        with _errors("write zeroes"):
            self.dev.write_zeroes(offset, length,
                                  may_unmap=not flags & NBD_CMD_FLAG_NO_HOLE)
            self.generation += 1
            if flags & NBD_CMD_FLAG_FUA:
                self.dev.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """NBD_CMD_TRIM: a discard with ``discard="unmap"``, nothing otherwise."""
        if self.discard != "unmap":
            return
        with _errors("trim"):
            self.dev.discard(offset, length)
            self.generation += 1
            if fua:
                self.dev.flush()

    def flush(self) -> None:
        """NBD_CMD_FLUSH: everything written so far is made durable."""
        with _errors("flush"):
            self.dev.flush()


class _errors:
    """Turn a device failure into :class:`CommandError` (the NBD error of its errno;
    EIO for a failure without one)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: object) -> None:
        if e is None or not isinstance(e, Exception) or isinstance(e, CommandError):
            return
        if isinstance(e, OSError) and e.errno:
            raise CommandError(to_nbd_error(e.errno), f"{self.what} failed: {e}") from e
        if isinstance(e, UnsupportedFeatureError):
            raise CommandError(NBD_ENOTSUP, f"{self.what} failed: {e}") from e
        if isinstance(e, UsageError) and "read-only" in str(e):
            raise CommandError(NBD_EPERM, f"{self.what} failed: {e}") from e
        raise CommandError(NBD_EIO, f"{self.what} failed: {e}") from e


def device_errors(what: str) -> _errors:
    """``with device_errors("read"): ...``: device failures as :class:`CommandError`."""
    return _errors(what)
