"""FileObjectHost: a :class:`~diskimg.hostio.host.Host` over any binary file object.

Any object with ``readinto`` and ``seek`` (``io.BytesIO``, an ``open(..., "rb")`` file, an
fsspec or zip member file ...) carries an image.  It is read-only unless the object says
it is writable (``writable()``, io's own declaration) or the caller says so.  Every
positional call is one ``seek`` then reads or writes under one lock, so the copier's reader
threads may share it.  Nothing is locked (no QEMU lock bytes: there is no file to lock),
no hole is known (all data) and ``flush`` calls the object's ``flush``.  An error the object
raises becomes a :class:`~diskimg.errors.DiskImgError` naming the object and the offset.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from diskimg.errors import ClosedImageError, DiskImgError, FormatError, UsageError

INT64_MAX = (1 << 63) - 1
_ZERO_CHUNK = 1 << 20


class BinaryFile(Protocol):
    """What a file object must offer to carry an image (writes need ``write``)."""

    def readinto(self, buf: memoryview, /) -> int | None: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


def label(obj: object, name: str | None = None) -> str:
    """What errors call the object: ``name``, else its own ``name`` when that is a str
    (an open file's path), else ``<TypeName>``."""
    if name is not None:
        return name
    try:
        own = obj.name  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        own = None
    return own if isinstance(own, str) else f"<{type(obj).__name__}>"


class FileObjectHost:
    """A host over a binary file object.  ``writable`` None: the object's ``writable()``
    when it is an :class:`io.IOBase`, else read-only.  ``zero_init``: whether bytes never
    written read as zeros (True for files and BytesIO, where a write past the end zero-fills
    the gap; the default)."""

    sync = True
    locked = False
    local = False

    def __init__(self, obj: BinaryFile, *, name: str | None = None,
                 writable: bool | None = None, zero_init: bool = True) -> None:
        self._obj: Any = obj
        self._name = label(obj, name)
        if isinstance(obj, io.TextIOBase):
            raise UsageError(f"'{self._name}' is a text file: open it in binary mode ('rb')")
        try:
            self._obj.readinto, self._obj.seek  # noqa: B018 - what a file object must have
        except AttributeError:
            raise UsageError(f"'{self._name}' is not a binary file object (it needs "
                             "readinto() and seek())") from None
        if isinstance(obj, io.IOBase) and not obj.seekable():
            raise UsageError(f"'{self._name}' is not seekable: an image needs random access "
                             "(read a raw image from a pipe by its path, e.g. /dev/stdin)")
        if writable is None:
            writable = isinstance(obj, io.IOBase) and obj.writable()
        self.writable = writable
        self._zero_init = zero_init
        self._lock = threading.Lock()
        self._closed = False

    @property
    def path(self) -> str:
        return self._name

    @property
    def name(self) -> str:
        """What messages name: the object's label (as ``path``)."""
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def _fail(self, op: str, offset: int, err: BaseException) -> DiskImgError:
        why = str(err) or type(err).__name__
        return DiskImgError(f"Could not {op} '{self._name}' at offset {offset:#x}: {why}",
                            path=self._name, operation=op, reason=why)

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise ClosedImageError(f"I/O operation on closed file '{self._name}'")
        if offset < 0 or offset + max(length, 0) > INT64_MAX:
            raise FormatError(f"offset {offset:#x} (+{length} bytes) in '{self._name}' is "
                              "out of range", offset=offset)

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if not self.writable:
            raise UsageError(f"'{self._name}' is opened read-only")

    # --- reads ------------------------------------------------------------------------
    def _fill(self, offset: int, buf: memoryview) -> int:
        """Read into ``buf`` from ``offset`` until it is full or the object ends (lock
        held); the bytes read."""
        try:
            self._obj.seek(offset)
            got = 0
            while got < len(buf):
                n = self._obj.readinto(buf[got:])
                if not n:
                    break
                got += n
            return got
        except (OSError, ValueError) as e:
            raise self._fail("read", offset, e) from e

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end are zeroed.  Returns len(buf)."""
        n = len(buf)
        self._check(offset, n)
        with self._lock:
            got = self._fill(offset, buf)
        if got < n:
            from diskimg.hostio.file import zero_fill

            zero_fill(buf[got:])
        return n

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short only at the end."""
        if length <= 0:
            return b""
        self._check(offset, length)
        buf = bytearray(length)
        with self._lock:
            got = self._fill(offset, memoryview(buf))
        del buf[got:]
        return bytes(buf)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        from diskimg.hostio.host import read_exact

        return read_exact(self, offset, length, what)

    # --- writes -----------------------------------------------------------------------
    def _put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Seek and write all of ``data`` (lock held)."""
        mv = memoryview(data).cast("B")
        try:
            self._obj.seek(offset)
            done = 0
            while done < len(mv):
                n = self._obj.write(mv[done:])
                if not n:
                    raise OSError("the file object wrote nothing")
                done += n
        except (OSError, ValueError, AttributeError) as e:
            raise self._fail("write", offset, e) from e

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write(offset, memoryview(data).nbytes)
        with self._lock:
            self._put(offset, data)

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        total = sum(memoryview(p).nbytes for p in parts)
        self._check_write(offset, total)
        with self._lock:
            for p in parts:
                self._put(offset, p)
                offset += memoryview(p).nbytes

    # --- size -------------------------------------------------------------------------
    def size(self) -> int:
        self._check(0, 0)
        with self._lock:
            try:
                return int(self._obj.seek(0, os.SEEK_END))
            except (OSError, ValueError) as e:
                raise self._fail("seek", 0, e) from e

    def allocated_size(self) -> int:
        return self.size()  # no holes known: every byte counts

    def truncate(self, size: int) -> None:
        """Set the size: shorter by ``truncate``, longer by one zero byte at the new end
        (a write past the end reads as zeros before it; BytesIO's truncate cannot grow)."""
        self._check_write(size, 0)
        cur = self.size()
        with self._lock:
            if size < cur:
                try:
                    self._obj.truncate(size)
                except (OSError, ValueError, AttributeError) as e:
                    raise self._fail("truncate", size, e) from e
            elif size > cur:
                self._put(size - 1, b"\0")

    def empty(self) -> None:
        self.truncate(0)

    # --- sparse helpers: no holes here ---------------------------------------------------
    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        size = self.size()
        if offset < size:
            n = min(length, size - offset)
            yield (offset, n, True)
            offset, length = offset + n, length - n
        if length > 0:
            yield (offset, length, False)

    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, data, zero) runs: holes read as zeros."""
        from diskimg.hostio.host import allocation_from_data

        return allocation_from_data(self, offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        self._check_write(offset, length)
        with self._lock:
            while offset < end:
                k = min(_ZERO_CHUNK, end - offset)
                self._put(offset, bytes(k))
                offset += k

    def punch_hole(self, offset: int, length: int) -> bool:
        self.write_zeros(offset, length)
        return False

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        if keep_size:
            length = max(0, min(offset + length, self.size()) - offset)
        self.write_zeros(offset, length)

    def preallocate(self, offset: int, length: int) -> None:
        size = self.size()
        if offset + length > size:
            start = max(offset, size)
            self.write_zeros(start, offset + length - start)

    def flush(self) -> None:
        if self._closed or not self.writable:
            return
        with self._lock:
            try:
                self._obj.flush()
            except (OSError, ValueError, AttributeError) as e:
                raise self._fail("flush", 0, e) from e

    # --- locking and lifetime: the object is the caller's -----------------------------
    def lock(self, writable: bool) -> None:
        """Nothing to lock: a file object has no QEMU lock bytes."""

    def close(self) -> None:
        """Flush what was written; the object itself stays open (the caller's)."""
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True

    # --- declared capabilities --------------------------------------------------------
    def zero_init(self) -> bool:
        return self._zero_init

    def is_device(self) -> bool:
        return False

    def block_size(self) -> int:
        return 4096

    def identity(self) -> tuple[str, int]:
        return ("fileobj", id(self._obj))
