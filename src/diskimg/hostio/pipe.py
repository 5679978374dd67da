"""Images from a pipe (``/dev/stdin`` after ``|``, a FIFO, a socket).

qemu-img refuses every source that is not a regular file or block device.  diskimg reads
a pipe once, front to back:

- the first bytes are probed; an image that needs random access -- qcow2, vmdk, luks,
  whose tables point anywhere in the file -- is refused up front, before more is read,
  with a message saying why (save it to a file first);
- a raw image whose size is given (the ``size`` image option, e.g.
  ``--image-opts driver=raw,file.filename=/dev/stdin,size=1G``) is streamed: a
  :class:`PipeHost` serves reads at rising offsets in constant memory, and a read behind
  what was already consumed fails with a clear error rather than returning wrong data;
- a raw image of unknown size is first copied into an unlinked temporary file
  (``$TMPDIR``: constant memory, as much disk as the image holds) and then read as a
  regular file.

A regular file behind ``/dev/stdin`` (``< file``) is not a pipe: it opens as any file.
Opening never blocks: a named FIFO that nobody writes to reads as an empty stream and is
refused.
A character device (a terminal, ``/dev/zero``) is not taken for a pipe: it is refused as
before (an endless device would fill the spool).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from diskimg.errors import DiskImgError, FormatError, UnsupportedFeatureError, UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from diskimg.hostio.host import Host

#: bytes kept from the start of the stream: the probe, sector 0, a header
HEAD = 64 << 10
_CHUNK = 1 << 20


def is_pipe(path: str) -> bool:
    """Whether ``path`` names a FIFO or a socket (False if it cannot be looked at: the
    ordinary open then reports why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def open_pipe(path: str, fmt: str | None, options: Mapping[str, str]) -> Host:
    """The host to read the raw image streamed through ``path``; refuses a format that
    needs random access (see the module's notes)."""
    from diskimg.probe import PROBE_SIZE, probe_bytes

    try:  # never blocks waiting for a writer (a named FIFO nobody writes to)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise DiskImgError(f"Could not open '{path}': {e.strerror}", path=path,
                           operation="open", reason=e.strerror) from None
    try:
        os.set_blocking(fd, True)  # reads wait for a writer's data; none: end of file
        head = _read_full(fd, HEAD, path)
        if not head:
            why = "a pipe with nothing to read (no writer, or an empty stream)"
            raise DiskImgError(f"Could not open '{path}': {why}", path=path,
                               operation="open", reason=why)
        got = fmt or probe_bytes(head[:PROBE_SIZE])
        if got != "raw":
            raise UnsupportedFeatureError(
                f"'{path}' is a pipe and holds a {got} image, which needs random access "
                "(its tables point anywhere in the file): save it to a file first; only "
                "a raw image is read from a pipe", path=path, field="format")
        if "size" in options:
            from diskimg.options import parse_param_size  # raw checks them again

            off = parse_param_size("offset", options.get("offset", "0"))
            return PipeHost(fd, path, head, off + parse_param_size("size", options["size"]))
        host = _spool(fd, path, head)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return host


def _read_full(fd: int, n: int, path: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            b = os.read(fd, n - got)
        except OSError as e:
            raise DiskImgError(f"Could not read '{path}' at offset {got:#x}: {e.strerror}",
                               path=path, operation="read", reason=e.strerror) from None
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _spool(fd: int, path: str, head: bytes) -> Host:
    """Copy the stream into an unlinked temporary file and open that as ``path``."""
    import tempfile

    from diskimg.hostio.file import HostFile

    tmp = tempfile.TemporaryFile()
    pos = 0
    try:
        tmp.write(head)
        pos = len(head)
        while True:
            b = _read_full(fd, _CHUNK, path) if len(head) == HEAD else b""
            if not b:
                break
            tmp.write(b)
            pos += len(b)
            if len(b) < _CHUNK:
                break
        tmp.flush()
        return HostFile(os.dup(tmp.fileno()), Path(path), False)
    except OSError as e:  # the temporary directory is full, ...
        why = e.strerror or str(e)
        raise DiskImgError(f"Could not copy '{path}' to a temporary file at offset "
                           f"{pos:#x}: {why} (give the raw image's size= to stream it)",
                           path=path, operation="read", reason=why) from None
    finally:
        tmp.close()


class PipeHost:
    """A raw image of known ``size`` read once from the pipe ``fd``, front to back.
    ``head`` (the first bytes, already read) stays readable; so does the last chunk read.
    Reads behind that fail; so does a stream that ends before ``size``."""

    writable = False
    sync = False
    locked = False
    local = False

    def __init__(self, fd: int, path: str, head: bytes, size: int) -> None:
        self._fd = os.dup(fd)
        self._path = path
        self._size = size
        self._head = head[:size]
        self._pos = len(head)              # bytes of the stream consumed
        self._last = b""                   # the last bytes read, ending at _pos
        self._lock = threading.Lock()
        if len(head) < HEAD and len(head) < size:
            self._ended(len(head))

    @property
    def path(self) -> str:
        return self._path

    @property
    def name(self) -> str:
        """What messages name: the pipe's path (as ``path``)."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ended(self, at: int) -> None:
        raise FormatError(f"'{self._path}' ended at offset {at:#x}, before the {self._size} "
                          "bytes its size says", offset=at, path=self._path)

    def _copy_known(self, offset: int, buf: memoryview) -> int:
        """Copy what the head or the last chunk hold at ``offset``; bytes copied."""
        n = 0
        if offset < len(self._head):
            n = min(len(buf), len(self._head) - offset)
            buf[:n] = self._head[offset:offset + n]
            return n
        start = self._pos - len(self._last)
        if start <= offset < self._pos:
            n = min(len(buf), self._pos - offset)
            buf[:n] = self._last[offset - start:offset - start + n]
        return n

    def preadinto(self, offset: int, buf: memoryview) -> int:
        if self._fd < 0:
            from diskimg.errors import ClosedImageError

            raise ClosedImageError(f"I/O operation on closed file '{self._path}'")
        want = min(len(buf), max(0, self._size - offset))
        with self._lock:
            done = 0
            while done < want:
                k = self._copy_known(offset + done, buf[done:want])
                if k:
                    done += k
                    continue
                at = offset + done
                if at < self._pos:
                    raise DiskImgError(
                        f"'{self._path}' is a pipe, read once front to back: offset "
                        f"{at:#x} was already passed (at {self._pos:#x})", path=self._path,
                        operation="read", reason="a pipe cannot seek back")
                n = min(_CHUNK, self._size - self._pos)
                if at > self._pos:  # skip forward: read and drop
                    n = min(n, at - self._pos)
                b = _read_full(self._fd, n, self._path)
                if not b:
                    self._ended(self._pos)
                self._pos += len(b)
                self._last = b
        if want < len(buf):
            from diskimg.hostio.file import zero_fill

            zero_fill(buf[want:])
        return len(buf)

    def pread(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self._size - offset))
        buf = bytearray(n)
        self.preadinto(offset, memoryview(buf))
        return bytes(buf)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        from diskimg.hostio.host import read_exact

        return read_exact(self, offset, length, what)

    def _read_only(self, *args: object) -> None:
        raise UsageError(f"'{self._path}' is opened read-only")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._read_only()

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        self._read_only()

    def truncate(self, size: int) -> None:
        self._read_only()

    def empty(self) -> None:
        self._read_only()

    def punch_hole(self, offset: int, length: int) -> bool:
        self._read_only()
        return False

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        self._read_only()

    def preallocate(self, offset: int, length: int) -> None:
        self._read_only()

    def write_zeros(self, offset: int, length: int) -> None:
        self._read_only()

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int:
        return self._size

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        n = max(0, min(length, self._size - offset))
        if n:
            yield (offset, n, True)
        if length > n:
            yield (offset + n, length - n, False)

    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, data, zero) runs: holes read as zeros."""
        from diskimg.hostio.host import allocation_from_data

        return allocation_from_data(self, offset, length)

    def flush(self) -> None:
        """Nothing written, nothing to flush."""

    def lock(self, writable: bool) -> None:
        """A pipe has no QEMU lock bytes."""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def zero_init(self) -> bool:
        return False

    def is_device(self) -> bool:
        return False

    def block_size(self) -> int:
        return 4096

    def identity(self) -> tuple[str, str]:
        return ("pipe", self._path)
