"""What every host over one remote object (an HTTP URL, an fsspec URL) answers the same
way, written once: reads derived from ``preadinto``, the size recorded at open, no
allocation or holes to show, and the closed check naming the URL."""

from __future__ import annotations

from collections.abc import Iterator

from diskimg.errors import ClosedImageError, FormatError


class ObjectHost:
    """Mixin for a host over one object of fixed size ``_size`` named by ``url``; the
    subclass provides ``preadinto`` and sets ``_closed``."""

    url: str
    name: str
    _size: int
    _closed: bool
    _block: int  # the size of the ranges fetched and cached

    def preadinto(self, offset: int, buf: memoryview) -> int:
        raise NotImplementedError

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
        """A remote object has no allocation to ask about: its size."""
        return self.size()

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
