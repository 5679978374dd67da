"""Sink: an append-only byte destination (stdout, a pipe, a FIFO, a socket, a writable
binary file object) for formats written front to back (issue 18 item 2).

A sink is the write-side counterpart of a :class:`~diskimg.hostio.host.Host` for
destinations that cannot seek: bytes go out in order, once.  Invariants:

- ``offset`` is the number of bytes accepted so far (what the next ``write`` starts at);
- at most :data:`BUFFER` bytes are held before they are written (bounded memory);
- a failed write (EPIPE, a peer that closed, a full disk, a file object that raised)
  ends in :class:`SinkError` naming the destination and the offset reached -- the
  offset of the first byte that did not reach it;
- ``close`` writes what is buffered; it closes the descriptor or file object only when
  the sink opened it (``owned``);
- :class:`CountingSink` writes nothing and only counts: a dry run that measures the
  size of a stream before it is written (a tar member header needs it up front).
"""

from __future__ import annotations

import errno
import io
import os
import select

from diskimg.errors import DiskImgError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol, Self
else:  # Writable is a protocol for the type checker only (start-up, issue 20)
    Protocol = object

#: bytes gathered before one write to the destination
BUFFER = 1 << 20


class SinkError(DiskImgError):
    """Writing to a sink failed; ``offset`` is where the stream stopped."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message, path=path, operation="write")
        self.offset = offset


class Writable(Protocol):
    """A binary file object a sink can write into."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


class Sink:
    """Append-only writer over a file descriptor or a binary file object (``dest``;
    ``name`` is what errors call it).

    ``offset`` counts the bytes accepted; at most ``buffer`` bytes are held before they
    are written; a failed write raises :class:`SinkError` with the offset of the first
    byte that did not reach the destination.  ``close`` writes what is buffered and
    closes the destination only when ``owned``; ``abort`` drops the buffer."""

    def __init__(self, dest: int | Writable, name: str | None = None, *,
                 owned: bool = False, buffer: int = BUFFER) -> None:
        self._fd = dest if isinstance(dest, int) else None
        self._obj = None if isinstance(dest, int) else dest
        if name is None:
            name = f"fd {dest}" if isinstance(dest, int) else (
                str(dest.name) if isinstance(dest, io.FileIO | io.BufferedWriter)
                else type(dest).__name__)
        self.name = name
        self.owned = owned
        self.offset = 0            # bytes accepted
        self._done = 0             # bytes that reached the destination
        self._buf = bytearray()
        self._limit = buffer
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; written out once :data:`BUFFER` bytes are gathered."""
        if self.closed:
            raise SinkError(f"{self.name}: write to a closed sink", path=self.name,
                            offset=self.offset)
        n = len(data)
        if not n:
            return
        self.offset += n
        if not self._buf and n >= self._limit:
            self._out(memoryview(data).cast("B"))
            return
        self._buf += data
        if len(self._buf) >= self._limit:
            self._drain()

    def writev(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Append each of ``parts`` in order."""
        for p in parts:
            self.write(p)

    def _drain(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._out(memoryview(buf))

    def _out(self, mv: memoryview) -> None:
        pos = 0
        try:
            while pos < len(mv):
                if self._fd is not None:
                    try:
                        n: int | None = os.write(self._fd, mv[pos:])
                    except BlockingIOError:   # a non-blocking pipe that is full: wait
                        select.select([], [self._fd], [])
                        continue
                else:
                    assert self._obj is not None
                    n = self._obj.write(mv[pos:])
                    if n is None:  # a raw stream in non-blocking mode, or one that returns None
                        n = len(mv) - pos
                if not n:
                    raise OSError(errno.EPIPE, "the destination accepted no bytes")
                pos += n
        except OSError as e:
            at = self._done + pos
            self.closed = True
            why = ("the reader closed the pipe or socket" if e.errno in
                   (errno.EPIPE, errno.ECONNRESET) else (e.strerror or str(e)))
            raise SinkError(f"{self.name}: write failed at offset {at}: {why}",
                            path=self.name, offset=at) from e
        except Exception as e:   # a closed file object; a store client's own errors
            at = self._done + pos
            self.closed = True
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise SinkError(f"{self.name}: write failed at offset {at}: {why}",
                            path=self.name, offset=at) from e
        self._done += pos

    def flush(self) -> None:
        """Write what is buffered (a file object's own buffer is flushed too)."""
        self._drain()
        if isinstance(self._obj, io.IOBase) and not self._obj.closed:   # its own buffer
            try:
                self._obj.flush()
            except (OSError, ValueError) as e:
                raise SinkError(f"{self.name}: flush failed at offset {self._done}: {e}",
                                path=self.name, offset=self._done) from e

    def close(self) -> None:
        """Write what is buffered and (when ``owned``) close the destination."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            if self.owned:
                if self._fd is not None:
                    os.close(self._fd)
                elif isinstance(self._obj, io.IOBase):
                    self._obj.close()

    def abort(self) -> None:
        """Drop what is buffered and close an owned destination (after a failure)."""
        self._buf = bytearray()
        if not self.closed:
            self.closed = True
            if self.owned and self._fd is not None:
                os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Leaving the block: :meth:`close` (an object store commits the object), or
        :meth:`abort` when it raised (an object store discards the upload)."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CountingSink(Sink):
    """A sink that writes nothing: ``offset`` is the size the stream would have."""

    def __init__(self) -> None:
        super().__init__(-1, "(count)")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Count ``data``; nothing is kept."""
        self.offset += len(data)

    def flush(self) -> None:
        """Nothing to write."""

    def close(self) -> None:
        """Mark the sink closed."""
        self.closed = True


def open_sink(path: str | os.PathLike[str]) -> Sink:
    """A sink writing into the FIFO, socket or character device at ``path`` (opened for
    writing; a FIFO blocks here until a reader opens it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    return Sink(fd, os.fspath(path) if isinstance(path, str) else str(os.fspath(path)),
                owned=True)
