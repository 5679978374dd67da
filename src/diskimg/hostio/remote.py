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
from diskimg.hostio.storeopts import TIMEOUT_KEY, split_timeout  # noqa: F401 (re-exported)
from diskimg.policy import OpenPolicy

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

BLOCK_SIZE = 256 << 10
CACHE_BYTES = 8 << 20
#: seconds a read (and the open) of an fsspec object may take before it is an error
#: (as HTTP's :data:`~diskimg.hostio.http.DEFAULT_TIMEOUT`); ``open_fsspec(timeout=)`` or
#: ``storage_options={"x-timeout": s}`` (the key is diskimg's, not passed to fsspec)
DEFAULT_TIMEOUT = 30.0
#: stores in this process's memory or on its disks: no deadline (and no thread)
_LOCAL = frozenset({"memory", "file", "local"})
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
    """The fsspec filesystem of ``url`` and the path in it (diskimg's own key,
    ``x-timeout``, is not the filesystem's)."""
    fsspec = _fsspec(url)
    opts, _ = split_timeout(url, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
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


class _Deadline:
    """Runs calls on a daemon thread of its own; the caller waits at most ``timeout``
    seconds for each.  A call that did not end in time leaves the runner ``stuck``
    (that thread still waits for the store): the host fails every later read rather
    than queue behind it, and the process can still exit (a daemon thread).  The thread
    ends after :data:`IDLE` s without a call (a host never closed leaves no thread), and
    starts again on the next."""

    IDLE = 10.0

    def __init__(self, name: str) -> None:
        import queue

        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()
        self.stuck = False

    def _loop(self) -> None:
        import queue

        while True:
            try:
                job = self._q.get(timeout=self.IDLE)
            except queue.Empty:
                with self._mu:
                    if self._q.empty():
                        self._thread = None
                        return
                continue
            if job is None:
                return
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the caller, raised there
                box.append((False, e))
            done.set()

    def run(self, fn: Any, timeout: float) -> Any:
        """``fn()``'s result (or exception), or TimeoutError after ``timeout`` s."""
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        with self._mu:
            self._q.put((fn, box, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"diskimg-fsspec {self._name}")
                self._thread.start()
        if not done.wait(timeout):
            self.stuck = True
            raise TimeoutError
        ok, value = box[0]
        if ok:
            return value
        raise value

    def close(self) -> None:
        with self._mu:
            if self._thread is not None and not self.stuck:
                self._q.put(None)
                self._thread = None


class FsspecHost(ObjectHost):
    """A host over one object of an fsspec filesystem.  Offsets and lengths are bytes."""

    sync = False
    locked = False

    def __init__(self, fs: Any, key: str, url: str, *, writable: bool = False,
                 block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if block_size <= 0 or cache_bytes < block_size or not timeout > 0:
            raise UsageError("block_size, cache_bytes and timeout must be positive "
                             "(cache_bytes at least one block)")
        #: seconds the open and each read may take (not for memory:// and file://)
        self.timeout = timeout
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
        self._deadline = None if protocol in _LOCAL else _Deadline(url)

        def opened() -> tuple[dict[str, Any], Any]:
            fs.invalidate_cache(key)
            info = fs.info(key)
            if info.get("type", "file") != "file":
                raise UsageError(f"'{url}' is not an object (it is a {info.get('type')})")
            if info.get("size") is None:
                info = {**info, "size": fs.size(key)}
            return info, fs.open(key, "r+b" if writable else "rb", cache_type="none",
                                 block_size=block_size) \
                if protocol != "memory" else fs.open(key, "r+b" if writable else "rb")

        try:
            info, self._f = self._timed(opened, None)
        except (UsageError, RemoteError):
            raise
        except Exception as e:  # fsspec stores raise what their client raises
            raise remote_error(url, e, None) from None
        self.etag: str | None = info.get("ETag") or info.get("etag")
        self.version: str | None = info.get("VersionId") or info.get("version_id")
        self._size = int(info["size"])

    def _timed(self, fn: Any, offset: int | None) -> Any:
        """``fn()`` within :attr:`timeout` seconds, else a RemoteError naming the URL
        and ``offset`` (after which every read fails: the store never answered)."""
        d = self._deadline
        if d is None:
            return fn()
        if d.stuck:
            raise self._read_error(f"an earlier request timed out after {self.timeout:g} s",
                                   offset)
        try:
            return d.run(fn, self.timeout)
        except TimeoutError:
            if not d.stuck:     # the store's own timeout, raised by fn
                raise
            raise self._read_error(f"timed out after {self.timeout:g} s", offset) from None

    # --- reads (through ObjectHost's block cache) --------------------------------------
    def _fetch_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes at ``offset`` (all inside it)."""
        n = len(buf)

        def read() -> bytes:
            with self._lock:
                self._f.seek(offset)
                data: bytes = self._f.read(n)
                return data

        try:
            data = self._timed(read, offset)
        except RemoteError:
            raise
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
        if self._deadline is not None:
            self._deadline.close()
            if self._deadline.stuck:   # its thread holds the file object: left to it
                self._f = None
                return
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
                block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES,
                timeout: float | None = None) -> FsspecHost:
    """Open the object at fsspec ``url`` as a host.

    ``timeout`` (seconds) bounds the open and every read: a store that does not answer
    in time is a :class:`~diskimg.errors.RemoteError` naming the URL and the offset.
    None: ``storage_options["x-timeout"]`` (diskimg's key, the way ``diskimg.open``,
    ``convert`` and a backing file pass it), else :data:`DEFAULT_TIMEOUT`.  The store
    client's own timeouts and retries (s3fs: ``config_kwargs``) apply within it.

    ``storage_options`` go to the filesystem (s3: ``endpoint_url``, ``key``, ``secret``,
    ``anon`` ...; fsspec's configuration and environment ``FSSPEC_S3_ENDPOINT_URL``
    etc. apply too).  ``writable`` writes through (memory://, file://); an object store
    refuses it.  A fault raises :class:`~diskimg.errors.RemoteError` naming the URL.
    ``policy`` is accepted for symmetry with the other openers (backing files:
    :func:`diskimg.hostio.urls.open_backing`).
    """
    del policy
    _, given = split_timeout(url, storage_options)
    fs, key = _filesystem(url, storage_options)
    return FsspecHost(fs, key, url, writable=writable, block_size=block_size,
                      cache_bytes=cache_bytes,
                      timeout=timeout if timeout is not None else given or DEFAULT_TIMEOUT)


# the write side (re-exported: the documented names of this module)
from diskimg.hostio.remote_sink import (  # noqa: E402
    MAX_PARTS,
    PART_SIZE,
    ObjectSink,
    part_size,
    write_error,
)

__all__ = ["MAX_PARTS", "PART_SIZE", "BLOCK_SIZE", "CACHE_BYTES", "DEFAULT_TIMEOUT",
           "FsspecHost", "split_timeout",
           "ObjectSink", "is_fsspec_url", "open_fsspec", "open_fsspec_sink", "part_size",
           "remote_error", "scheme_of", "write_error"]


def open_fsspec_sink(url: str, storage_options: Mapping[str, Any] | None = None, *,
                     size_hint: int | None = None) -> ObjectSink:
    """A new object at fsspec ``url`` as an :class:`ObjectSink`: write it in order, then
    ``close()`` it (or leave the ``with`` block) to commit; nothing is visible under
    ``url`` before that, and ``abort()`` (or an exception in the block) leaves nothing.

    ``storage_options`` are the filesystem's (as for :func:`open_fsspec`); the upload
    runs on a filesystem instance of its own (its transaction defers the commit).
    ``size_hint`` (the expected size) picks the part size (:func:`part_size`); without
    it the part size grows as parts are sent (:func:`next_part_size`)."""
    if not is_fsspec_url(url):
        raise UsageError(f"'{url}' is not an object store URL that diskimg writes "
                         "(s3://, gs://, az://, memory:// ... through fsspec)", path=url)
    fs, key = _filesystem(url, {**dict(storage_options or {}), "skip_instance_cache": True})
    try:
        if fs.isdir(key):
            raise UsageError(f"'{url}' is a directory (a prefix), not an object name",
                             path=url)
        fs.start_transaction()        # this instance only: commit() publishes the object
        part = part_size(size_hint)
        f = fs.open(key, "wb", block_size=part)
    except UsageError:
        raise
    except Exception as e:
        raise write_error(url, e, 0) from e
    return ObjectSink(f, url, fs, key, part=part, grow=size_hint is None)


if TYPE_CHECKING:  # the type checker proves FsspecHost is a Host (the formats' byte source)
    def _is_a_host(h: FsspecHost) -> Host:
        return h
