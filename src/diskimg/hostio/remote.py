"""FsspecHost: a :class:`~diskimg.hostio.host.Host` over any fsspec URL (``s3://``,
``gs://``, ``az://``, ``memory://``, ``file://`` ...), and the image opener behind
``diskimg.open("s3://bucket/key")``.

fsspec (and the store's own package: s3fs, gcsfs, adlfs ...) are imported only here, and
only when such a URL is opened: the core needs neither.  Without them the error names
the ``diskimg[remote]`` extra.

- reads are ranged reads of one fsspec file object (opened once, without fsspec's own
  cache) through a bounded LRU cache of ``block_size`` blocks; the size is the store's;
- version pinning: the object's ETag (or version id) is recorded at open; s3fs sends it
  as ``If-Match`` on every ranged GET, so an object replaced between two reads is an
  error naming the URL and the offset, never a mix of two versions;
- ``writable=True`` (``memory://``, ``file://`` and other stores whose files open
  ``"r+b"``) writes through to the object; an object store (``s3://``, ``gs://`` ...)
  refuses it: objects are immutable -- write a new object with :func:`open_fsspec_sink`;
- images and their backing chains are opened by :func:`diskimg.open` (with
  ``storage_options``); a backing file named by a remote image is looked for in the same
  store by :func:`diskimg.hostio.urls.open_backing` -- the one rule for every scheme.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diskimg.errors import RemoteError, UsageError
from diskimg.hostio.objects import ObjectHost
from diskimg.hostio.sink import Sink, SinkError
from diskimg.policy import OpenPolicy

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

BLOCK_SIZE = 256 << 10
CACHE_BYTES = 8 << 20
#: the stores whose objects cannot be rewritten in place
_IMMUTABLE = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci",
                        "oss", "hf", "http", "https"})
#: fsspec schemes diskimg.open dispatches here even when fsspec is missing (to name the
#: extra); with fsspec installed every protocol it knows is dispatched
_KNOWN = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory",
                    "oci", "oss", "hf", "hdfs", "webhdfs", "sftp", "ftp", "smb"})
_EXTRA = "pip install 'diskimg[remote]'"


def _fsspec(url: str) -> Any:
    """The fsspec module, or a UsageError naming ``url`` and the extra that installs
    it."""
    from importlib import import_module  # fsspec ships no type information

    try:
        return import_module("fsspec")
    except ImportError:
        raise UsageError(f"Opening '{url}' needs fsspec: {_EXTRA}", path=url) from None


def scheme_of(url: str) -> str | None:
    """``url``'s scheme when it is written ``scheme://...``, lower case, else None."""
    head, sep, _ = url.partition("://")
    if not sep or not head or not head[0].isalpha() or \
            not all(c.isalnum() or c in "+.-" for c in head):
        return None
    return head.lower()


def is_fsspec_url(path: object) -> bool:
    """Whether ``diskimg.open(path)`` goes to fsspec: a ``scheme://`` URL of a protocol
    fsspec knows (http, https and file are not: diskimg opens those itself)."""
    if not isinstance(path, str):
        return False
    scheme = scheme_of(path)
    if scheme is None or scheme in ("http", "https", "file"):
        return False
    if scheme in _KNOWN:
        return True
    from importlib import import_module

    try:
        reg = import_module("fsspec.registry")
    except ImportError:
        return False
    return scheme in reg.known_implementations or scheme in reg.registry


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it."""
    fsspec = _fsspec(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:
        raise UsageError(f"Opening '{url}' needs a package fsspec could not import "
                         f"({e}): {_EXTRA}") from None
    except ValueError as e:
        raise UsageError(f"Cannot open '{url}': {e}") from None
    return fs, path


def remote_error(url: str, e: BaseException, offset: int | None) -> RemoteError:
    """``e`` (raised by fsspec or its store) as a RemoteError naming ``url`` and
    ``offset``; a missing object is a 404, a refused one a 403."""
    from diskimg.hostio.objects import read_error  # the one wording (objects is loaded)

    status: int | None = None
    if isinstance(e, FileNotFoundError):
        what, status = "No such object (404)", 404
    elif isinstance(e, PermissionError):
        what, status = f"Access denied (403): {e}", 403
    else:
        what = f"{type(e).__name__}: {e}"
    return read_error(url, what, offset, status)


class FsspecHost(ObjectHost):
    """A host over one object of an fsspec filesystem.  Offsets and lengths are bytes."""

    sync = False
    locked = False

    def __init__(self, fs: Any, key: str, url: str, *, writable: bool = False,
                 block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES) -> None:
        if block_size <= 0 or cache_bytes < block_size:
            raise UsageError("block_size and cache_bytes must be positive (cache_bytes at "
                             "least one block)")
        #: the URL as given: what error messages name
        self.path: str = url
        self.url = url
        self.name = url
        self.fs = fs
        self.key = key
        self.writable = writable
        self._init_reads(block_size, cache_bytes)   # one fetch at a time: one file object
        self._lock = threading.RLock()
        self._closed = False
        self._f: Any = None
        self.protocol = protocol = fs.protocol if isinstance(fs.protocol, str) \
            else fs.protocol[0]
        if writable and protocol in _IMMUTABLE:
            raise UsageError(f"'{url}' cannot be written in place: objects in {protocol}:// "
                             "are immutable (write a new object: convert to the URL)")
        try:
            fs.invalidate_cache(key)
            info = fs.info(key)
            if info.get("type", "file") != "file":
                raise UsageError(f"'{url}' is not an object (it is a {info.get('type')})")
            self.etag: str | None = info.get("ETag") or info.get("etag")
            self.version: str | None = info.get("VersionId") or info.get("version_id")
            self._size = int(info["size"] if info.get("size") is not None
                             else fs.size(key))
            self._f = fs.open(key, "r+b" if writable else "rb", cache_type="none",
                                   block_size=block_size) \
                if protocol != "memory" else fs.open(key, "r+b" if writable else "rb")
        except (UsageError, RemoteError):
            raise
        except Exception as e:  # fsspec stores raise what their client raises
            raise remote_error(url, e, None) from None

    # --- reads (through ObjectHost's block cache) --------------------------------------
    def _fetch_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes at ``offset`` (all inside it)."""
        n = len(buf)
        try:
            with self._lock:
                self._f.seek(offset)
                data = self._f.read(n)
        except Exception as e:
            if isinstance(e, OSError) and e.errno == errno.EBUSY and "Etag" in str(e):
                raise self._changed_error("the ETag no longer matches", offset) from None
            raise remote_error(self.url, e, offset) from None
        if len(data) != n:
            raise self._read_error(f"short read ({len(data)} of {n} bytes): the object "
                                   "may have changed", offset)
        buf[:] = data

    # --- writes (write-through) -------------------------------------------------------
    def _read_only(self) -> UsageError:
        return UsageError(f"'{self.url}' is open read-only")

    def _write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise self._read_only()
        self._check_open()
        with self._lock:
            if offset > self._size:  # a gap: zeros, as a file's hole reads
                self._write_at(self._size, bytes(offset - self._size))
            try:
                self._f.seek(offset)
                self._f.write(bytes(data))
            except Exception as e:
                raise RemoteError(f"Could not write '{self.url}' at offset {offset:#x}: "
                                  f"{type(e).__name__}: {e}", url=self.url,
                                  offset=offset) from None
            self._cache.discard(offset, len(data))
            self._size = max(self._size, offset + len(data))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self._write_at(offset, data)

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        self.pwrite(offset, b"".join(bytes(p) for p in parts))

    def truncate(self, size: int) -> None:
        if not self.writable:
            raise self._read_only()
        with self._lock:
            if size > self._size:
                self.write_zeros(self._size, size - self._size)
                return
            try:
                self._f.truncate(size)
            except Exception as e:
                raise RemoteError(f"Could not truncate '{self.url}' to {size}: {e}",
                                  url=self.url) from None
            self._cache.clear()
            self._size = size

    def empty(self) -> None:
        self.truncate(0)

    def write_zeros(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        while length > 0:
            k = min(chunk, length)
            self.pwrite(offset, bytes(k))
            offset += k
            length -= k

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        if keep_size:
            length = max(0, min(length, self._size - offset))
        self.write_zeros(offset, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """No holes in an object: nothing punched (the caller writes zeros)."""
        if not self.writable:
            raise self._read_only()
        return False

    def preallocate(self, offset: int, length: int) -> None:
        if offset + length > self._size:
            self.truncate(offset + length)

    # --- size and the rest of the Host protocol ---------------------------------------
    def flush(self) -> None:
        if self.writable and not self._closed:
            with self._lock:
                self._f.flush()

    def lock(self, writable: bool) -> None:
        """No lock bytes in an object store; a writable lock needs a writable host."""
        if writable and not self.writable:
            raise self._read_only()

    def close(self) -> None:
        """Close the file object (idempotent); a memory:// object stays in its store."""
        if self._closed:
            return
        self._closed = True
        self._close_reads()
        with self._lock:
            f, self._f = self._f, None
            if f is not None and self.protocol != "memory":  # memory's file IS the object
                f.close()
            elif f is not None and self.writable:
                f.flush()

    def __enter__(self) -> FsspecHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_fsspec(url: str, policy: OpenPolicy | None = None, writable: bool = False,
                storage_options: Mapping[str, Any] | None = None, *,
                block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES
                ) -> FsspecHost:
    """Open the object at fsspec ``url`` as a host.

    ``storage_options`` go to the filesystem (s3: ``endpoint_url``, ``key``, ``secret``,
    ``anon`` ...; fsspec's configuration and environment ``FSSPEC_S3_ENDPOINT_URL``
    etc. apply too).  ``writable`` writes through (memory://, file://); an object store
    refuses it.  A fault raises :class:`~diskimg.errors.RemoteError` naming the URL.
    ``policy`` is accepted for symmetry with the other openers (backing files:
    :func:`diskimg.hostio.urls.open_backing`).
    """
    del policy
    fs, key = _filesystem(url, storage_options)
    return FsspecHost(fs, key, url, writable=writable, block_size=block_size,
                      cache_bytes=cache_bytes)


#: the smallest part of an S3 multipart upload (all but the last part), and the most parts
PART_SIZE = 5 << 20
MAX_PARTS = 10_000


def part_size(size_hint: int | None) -> int:
    """The part size of an upload of about ``size_hint`` bytes: S3's smallest (5 MiB,
    the least memory) until 10,000 parts would not hold it, then larger (whole MiB).
    A part may exceed it by one :data:`~diskimg.hostio.sink.BUFFER`."""
    if not size_hint or size_hint <= PART_SIZE * (MAX_PARTS - 1):
        return PART_SIZE
    mib = 1 << 20
    return -(-size_hint // (MAX_PARTS - 1) // mib) * mib + mib


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


class ObjectSink(Sink):
    """A new object at an fsspec URL written front to back (a multipart upload on an
    object store), visible only once it is complete.

    - ``close()`` uploads the last part and commits the object: only then does ``url``
      name the new bytes (an existing object is replaced at that moment, as qemu-img
      replaces a file; until then readers see the old one);
    - ``abort()`` (and leaving a ``with`` block by an exception) discards the upload: an
      interrupted or failed stream leaves no object, and an existing object unchanged;
    - at most about three parts are in memory (the store client's buffer, the part in
      flight and its copy): :func:`part_size` bytes each;
    - a failure ends in :class:`~diskimg.hostio.sink.SinkError` naming the URL and the
      offset of the first byte not stored (the start of the part that failed; the size
      when completing the upload failed), after which the upload is discarded;
    - retries are the store client's (botocore: HTTP 5xx, throttling, a dropped
      connection; s3fs: timeouts), and safe: a part sent again replaces the part of the
      same number, and nothing is visible before the completing request.
      Timeouts and attempts are ``storage_options`` (s3fs: ``config_kwargs=
      {"connect_timeout": s, "read_timeout": s, "retries": {"max_attempts": n}}``).
    """

    def __init__(self, f: Any, url: str, fs: Any = None, key: str | None = None) -> None:
        super().__init__(f, url, owned=True)
        self.url = url
        self._f = f
        self._fs, self._key = fs, key

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
        self._drain()

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

    def __enter__(self) -> ObjectSink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_fsspec_sink(url: str, storage_options: Mapping[str, Any] | None = None, *,
                     size_hint: int | None = None) -> ObjectSink:
    """A new object at fsspec ``url`` as an :class:`ObjectSink`: write it in order, then
    ``close()`` it (or leave the ``with`` block) to commit; nothing is visible under
    ``url`` before that, and ``abort()`` (or an exception in the block) leaves nothing.

    ``storage_options`` are the filesystem's (as for :func:`open_fsspec`); the upload
    runs on a filesystem instance of its own (its transaction defers the commit).
    ``size_hint`` (the expected size) picks the part size (:func:`part_size`)."""
    if not is_fsspec_url(url):
        raise UsageError(f"'{url}' is not an object store URL that diskimg writes "
                         "(s3://, gs://, az://, memory:// ... through fsspec)", path=url)
    fs, key = _filesystem(url, {**dict(storage_options or {}), "skip_instance_cache": True})
    try:
        if fs.isdir(key):
            raise UsageError(f"'{url}' is a directory (a prefix), not an object name",
                             path=url)
        fs.start_transaction()        # this instance only: commit() publishes the object
        f = fs.open(key, "wb", block_size=part_size(size_hint))
    except UsageError:
        raise
    except Exception as e:
        raise write_error(url, e, 0) from e
    return ObjectSink(f, url, fs, key)


if TYPE_CHECKING:  # the type checker proves FsspecHost is a Host (the formats' byte source)
    def _is_a_host(h: FsspecHost) -> Host:
        return h
