"""``DeviceIO``: an ``io.RawIOBase`` with a cursor over a block device, what
:meth:`BlockDevice.as_file` wraps in a buffered file object."""

from __future__ import annotations

import io
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.device import BlockDevice


class DeviceIO(io.RawIOBase):
    """``io.RawIOBase`` adapter with a cursor over a :class:`BlockDevice`.

    Reads past the end return ``b""``; writes past the end raise (the disk has a fixed size).
    """

    def __init__(self, dev: BlockDevice) -> None:
        super().__init__()
        self._dev = dev
        self._pos = 0
        self._closing_after_dev = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._dev.read_only

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            new = pos
        elif whence == os.SEEK_CUR:
            new = self._pos + pos
        elif whence == os.SEEK_END:
            new = self._dev.size + pos
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError("negative seek position")
        self._pos = new
        return new

    def readinto(self, b: Any) -> int:
        """Fill ``b`` from the cursor and advance it; return the number of bytes read.

        Returns 0 at or past the end of the disk (never raises for that).
        """
        self._dev._check_open()
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self._dev.size - self._pos))
        if n:
            self._dev.readinto(self._pos, mv[:n])
            self._pos += n
        return n

    def write(self, b: Any) -> int:
        """Write all of ``b`` at the cursor and advance it; return ``len(b)`` in bytes.

        All or nothing: a write that would extend past the fixed disk size raises
        ``OSError(ENOSPC)`` before writing; a read-only device raises ``UsageError``.
        """
        self._dev._check_open()
        mv = memoryview(b).cast("B")
        if self._pos + len(mv) > self._dev.size:
            raise OSError(28, "write past the end of the virtual disk")
        self._dev.write(self._pos, mv)
        self._pos += len(mv)
        return len(mv)

    def flush(self) -> None:
        if not self.closed and not self._dev.read_only and not self._closing_after_dev:
            self._dev.flush()
        super().flush()

    def close(self) -> None:
        """Close this file object; the device stays open.  When the device was closed
        first there is nothing to flush into it (buffered writes still fail loudly, in
        ``write``)."""
        self._closing_after_dev = self._dev.closed
        super().close()
