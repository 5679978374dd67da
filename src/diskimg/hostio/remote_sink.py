"""ObjectSink: a new object at an fsspec URL (``s3://``, ``gs://``, ``memory://`` ...)
written front to back -- a multipart upload on an object store -- and committed only when
complete (issue 18 item 2); the write side of :mod:`diskimg.hostio.remote`, whose
:func:`~diskimg.hostio.remote.open_fsspec_sink` opens it (and which re-exports
:class:`ObjectSink` and :func:`part_size`).

- parts: S3's smallest (5 MiB) while 10,000 of them hold the expected size, larger
  above; an upload of unknown size doubles its part size every :data:`GROW_EVERY`
  parts (:func:`next_part_size`), within S3's 5 GiB part maximum;
- memory: one part gathered, handed to the store client as the ``bytes`` it sends
  (:class:`_Parts`).  The process's allocator is left alone (glibc may keep a freed
  part as heap: a few MiB of peak RSS, not a growth with the image size).
"""

from __future__ import annotations

import io
from typing import Any

from diskimg.hostio.sink import Sink, SinkError

#: the smallest part of an S3 multipart upload (all but the last part), the largest, and
#: the most parts of one upload
PART_SIZE = 5 << 20
PART_MAX = 5 << 30
MAX_PARTS = 10_000
#: an upload of unknown size doubles its part size every GROW_EVERY parts (5 MiB parts
#: up to ~4.4 GiB; 10,000 parts then hold more than S3's 5 TiB object maximum)
GROW_EVERY = 900


def part_size(size_hint: int | None) -> int:
    """The part size of an upload of about ``size_hint`` bytes: S3's smallest (5 MiB,
    the least memory) until :data:`MAX_PARTS` - 1 parts would not hold it, then larger
    (whole MiB, at most :data:`PART_MAX`).  A part may exceed it by one
    :data:`~diskimg.hostio.sink.BUFFER`."""
    if not size_hint or size_hint <= PART_SIZE * (MAX_PARTS - 1):
        return PART_SIZE
    mib = 1 << 20
    return min(PART_MAX - mib, -(-size_hint // (MAX_PARTS - 1) // mib) * mib + mib)


def next_part_size(parts_sent: int, base: int) -> int:
    """The size of the next part once ``parts_sent`` parts are sent, when the upload's
    size is not known: ``base`` doubled every :data:`GROW_EVERY` parts, at most
    :data:`PART_MAX` less one :data:`~diskimg.hostio.sink.BUFFER` (a part may exceed
    its size by that much).  S3 allows parts of different sizes: all but the last at
    least 5 MiB."""
    from diskimg.hostio.sink import BUFFER

    return min(PART_MAX - BUFFER, base << min(parts_sent // GROW_EVERY, 20))


def _http_status(e: BaseException) -> tuple[int, str] | None:
    """The HTTP status and error code of the store's answer behind ``e`` (botocore's
    ClientError keeps them in ``response``; s3fs raises an OSError from it), if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        resp = cur.__dict__.get("response")
        if isinstance(resp, dict):
            meta, err = resp.get("ResponseMetadata") or {}, resp.get("Error") or {}
            code = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
            if isinstance(code, int):
                name = err.get("Code", "") if isinstance(err, dict) else ""
                return code, str(name)
        cur = cur.__cause__ or cur.__context__
    return None


def write_error(url: str, e: BaseException, offset: int) -> SinkError:
    """``e`` (raised by fsspec or the store's client while writing ``url``) as a
    SinkError naming the URL, the offset and the store's HTTP status and code."""
    status = _http_status(e)
    code = f" {status[1]}" if status is not None and status[1] else ""
    said = e.strerror if isinstance(e, OSError) and e.strerror else e
    if isinstance(e, FileNotFoundError):
        what = f"Not found (404{code}): no such bucket, or the upload is gone"
    elif isinstance(e, PermissionError):
        what = f"Access denied (403{code}): {said}"
    elif status is not None:
        what = f"HTTP {status[0]}{code}: {said}"
    else:
        what = f"{type(e).__name__}: {e}"
    return SinkError(f"Could not write '{url}' at offset {offset}: {what}", path=url,
                     offset=offset)


def _buffered_file() -> type:
    """fsspec's buffered file class (s3fs, gcsfs, adlfs files derive from it)."""
    from importlib import import_module  # fsspec ships no type information

    cls: type = import_module("fsspec.spec").AbstractBufferedFile
    return cls


class _Parts:
    """What an :class:`ObjectSink` writes into: the store client's file object, handed
    one whole part at a time.

    An fsspec buffered file (s3fs, gcsfs, adlfs ...) copies what it is given into its
    own buffer and copies that again to send it.  A part handed to :meth:`send` while
    that buffer is empty becomes the buffer itself: a ``BytesIO`` over the part's
    ``bytes``, which it shares while it holds the only reference (so :meth:`send` takes
    the part out of the caller's list), and which reading it whole returns.  The client
    still decides what to send and when (its ``flush``); a file of any other kind, or
    one that holds bytes already, is given the part by its ``write``.

    ``grow``: after each part sent the file's part size becomes
    :func:`next_part_size` (an upload of unknown size stays within S3's part count)."""

    def __init__(self, f: Any, part: int, grow: bool) -> None:
        self.f = f
        self.part = part
        self.grow = grow
        self.parts = 0          # parts sent (as the client counts them, when it does)
        base: Any = _buffered_file()
        self.buffered = issubclass(type(f), base) and type(f).write is base.write

    def send(self, box: list[bytes]) -> None:
        """Hand over the part in ``box`` (emptied: the client holds the part alone)."""
        f = self.f
        if self.buffered and f.buffer.tell() == 0 and f.writable() and \
                not f.closed and not f.forced:
            n = len(box[0])
            f.buffer = io.BytesIO(box.pop())  # the part's bytes, not a copy of them
            f.buffer.seek(0, 2)
            f.loc += n
            if n >= f.blocksize:
                f.flush()
        else:
            f.write(box.pop())
        self._sent()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hand over ``data`` by the file's ``write`` (a copy: a large write at once)."""
        self.f.write(data)
        self._sent()
        return len(data)

    def _sent(self) -> None:
        if self.buffered:
            f = self.f
            sent = f.__dict__.get("parts")
            self.parts = len(sent) if isinstance(sent, list) else self.parts + 1
            if self.grow:
                f.blocksize = max(f.blocksize, next_part_size(self.parts, self.part))


class ObjectSink(Sink):
    """A new object at an fsspec URL written front to back (a multipart upload on an
    object store), visible only once it is complete.

    - ``close()`` uploads the last part and commits the object: only then does ``url``
      name the new bytes (an existing object is replaced at that moment, as qemu-img
      replaces a file; until then readers see the old one);
    - ``abort()`` (and leaving a ``with`` block by an exception) discards the upload: an
      interrupted or failed stream leaves no object, and an existing object unchanged;
    - memory: the sink gathers one part (``part`` bytes, see :func:`part_size`) and
      hands it to the store client as one ``bytes`` object without a copy into the
      client's own buffer (:class:`_Parts`); s3fs and aiohttp still copy it once each
      while it is sent (measured with tracemalloc): about three parts at the peak, one
      part at a time; ``grow`` (an upload of unknown size) doubles the part size every
      :data:`GROW_EVERY` parts;
    - a failure ends in :class:`~diskimg.hostio.sink.SinkError` naming the URL and the
      offset of the first byte not stored (the start of the part that failed; the size
      when completing the upload failed), after which the upload is discarded;
    - retries are the store client's (botocore: HTTP 5xx, throttling, a dropped
      connection; s3fs: timeouts), and safe: a part sent again replaces the part of the
      same number, and nothing is visible before the completing request.
      Timeouts and attempts are ``storage_options`` (s3fs: ``config_kwargs=
      {"connect_timeout": s, "read_timeout": s, "retries": {"max_attempts": n}}``).
    """

    def __init__(self, f: Any, url: str, fs: Any = None, key: str | None = None, *,
                 part: int = PART_SIZE, grow: bool = False) -> None:
        self._parts = _Parts(f, part, grow)
        self._flushing = False
        super().__init__(self._parts, url, owned=True, buffer=part)
        self.url = url
        self._f = f
        self._fs, self._key = fs, key

    def _drain(self) -> None:
        """Hand the gathered bytes over as ``bytes`` of whole parts (the rest stays
        gathered, unless the sink is being flushed), the ``bytearray`` freed first;
        a failure is a SinkError at the first byte the store has not accepted."""
        if not self._buf:
            return
        keep = 0 if self._flushing else len(self._buf) % self._limit
        n = len(self._buf) - keep
        box = [bytes(memoryview(self._buf)[:n])]
        self._buf = self._buf[n:] if keep else bytearray()
        try:
            self._parts.send(box)
        except Exception as e:    # a store client's errors, whatever their type
            raise self._error(e) from e
        self._done += n
        self._grown()

    def _grown(self) -> None:
        if self._parts.grow and self._parts.buffered:  # gather parts of the size it sends
            self._limit = max(self._limit, int(self._f.blocksize))

    def _stored(self) -> int:
        """Bytes the store has accepted (parts uploaded), as far as the client says."""
        if issubclass(type(self._f), _buffered_file()):
            return int(self._f.offset or 0)
        return self._done

    def _out(self, mv: memoryview) -> None:
        try:
            super()._out(mv)
        except SinkError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            raise self._error(cause) from cause
        self._grown()

    def _error(self, e: BaseException) -> SinkError:
        self.closed = True
        return write_error(self.url, e, min(self._stored(), self._done))

    def close(self) -> None:
        """Upload what is left and commit the object (once); on failure the upload is
        discarded and :class:`SinkError` raised."""
        if self.closed:
            return
        try:
            self.flush()
            self.closed = True
            self._f.close()
            self._f.commit()
        except BaseException as e:
            self.closed = True
            self._discard()
            if isinstance(e, SinkError) or not isinstance(e, Exception):
                raise
            raise self._error(e) from e
        self._verify()

    def _verify(self) -> None:
        """The store holds an object of the size written (a store whose files ignore
        the deferred commit would otherwise lose the image silently)."""
        if self._fs is None or self._key is None:
            return
        try:
            self._fs.invalidate_cache(self._key)
            size = int(self._fs.size(self._key))
        except FileNotFoundError:
            raise SinkError(f"Could not write '{self.url}': the store has no object there "
                            f"after the upload of {self.offset} bytes", path=self.url,
                            offset=0) from None
        except Exception as e:
            raise self._error(e) from e
        if size != self.offset:
            raise SinkError(f"Could not write '{self.url}': the store holds {size} bytes "
                            f"after the upload of {self.offset}", path=self.url,
                            offset=min(size, self.offset))

    def flush(self) -> None:
        """Hand the buffered bytes to the store client (it uploads whole parts)."""
        self._flushing = True
        try:
            self._drain()
        finally:
            self._flushing = False

    def abort(self) -> None:
        """Discard the upload: nothing becomes visible under the URL."""
        self._buf = bytearray()
        self.closed = True
        self._discard()

    def _discard(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.discard()       # aborts the multipart upload, removes a temporary file
        except Exception:     # noqa: S110 - best effort: the upload is never completed
            pass
        if issubclass(type(f), _buffered_file()):
            f.closed = True   # its finalizer must not upload (or commit) anything
