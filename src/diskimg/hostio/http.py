"""HttpHost: a read-only :class:`~diskimg.hostio.host.Host` over an ``http://`` or
``https://`` URL (stdlib ``http.client`` only).

- every read is a ``GET`` with one ``Range``; a response that is not exactly the bytes
  asked for (``200`` with the whole body, a short or wrong ``Content-Range``, a body that
  ends early) is refused -- never read into memory whole, never returned as data;
- keep-alive: each thread keeps its own connection; large reads are split into parts
  fetched in parallel on a bounded thread pool (``workers`` connections at most);
- a bounded LRU cache of ``block_size`` blocks (``cache_bytes`` in all), and read-ahead
  that grows while reads are sequential;
- the size, ETag and Last-Modified are recorded at open; every response is checked
  against them (``If-Match`` is sent with a strong ETag): an object that changed is an
  error, never a mix of two versions;
- faults end in :class:`~diskimg.errors.RemoteError` naming the URL and the offset; a
  dropped connection is retried once (a GET is idempotent), a timeout or an HTTP status is
  not; redirects are followed ``max_redirects`` times, only to http/https, and to another
  host only when it is in ``allow_hosts``.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from urllib.parse import urljoin, urlsplit

from diskimg.errors import RemoteError, UsageError
from diskimg.hostio.objects import ObjectHost
from diskimg.policy import OpenPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.hostio.host import Host

DEFAULT_TIMEOUT = 30.0
BLOCK_SIZE = 256 << 10
CACHE_BYTES = 8 << 20
WORKERS = 4
MAX_REDIRECTS = 5
_PART_BLOCKS = 4             # a parallel part: at most this many blocks (1 MiB)
_READAHEAD_MAX = 16          # blocks read ahead at most (4 MiB) while reads are sequential
_REDIRECTS = (301, 302, 303, 307, 308)
_CHANGED = "the object changed since it was opened"
_Conn = http.client.HTTPConnection


class _Conns(threading.local):
    """Each thread's keep-alive connections, by (scheme, host:port)."""

    def __init__(self) -> None:
        self.by_host: dict[tuple[str, str], _Conn] = {}


class _Dropped(Exception):
    """The connection failed under a request: safe to retry a GET once."""


class HttpHost(ObjectHost):
    """A read-only host over one HTTP(S) object.  Offsets and lengths are in bytes."""

    writable = False
    sync = False
    locked = False

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES,
                 workers: int = WORKERS, max_redirects: int = MAX_REDIRECTS,
                 allow_hosts: Collection[str] = (),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"'{url}' is not an http:// or https:// URL")
        if block_size <= 0 or cache_bytes < block_size or workers < 1 or timeout <= 0:
            raise UsageError("block_size, cache_bytes, workers and timeout must be positive "
                             "(cache_bytes at least one block)")
        #: the URL as given: what error messages name
        self.path: str = url
        #: the URL as given (its scheme's two slashes intact): what messages name
        self.name = url
        self.url = url
        self._target = url                  # after the redirects taken at open
        self._origin = parts.hostname.lower()
        self.timeout = timeout
        self._block = block_size
        self._max_blocks = cache_bytes // block_size
        self._workers = workers
        self._max_redirects = max_redirects
        self._allow_hosts = {h.lower() for h in allow_hosts}
        self._ssl = ssl_context
        self._local = _Conns()
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._next = -1                      # where a sequential read would start
        self._ahead = 0                      # read-ahead window, in blocks
        self._closed = False
        self._changed: str | None = None     # why the object is known to have changed
        self._etag: str | None = None
        self._modified: str | None = None
        self._size = -1
        try:
            self._size = self._stat()
        except BaseException:
            self.close()
            raise

    # --- connections ------------------------------------------------------------------
    def _conn(self, url: str) -> _Conn:
        """This thread's keep-alive connection to ``url``'s host (one per host)."""
        p = urlsplit(url)
        key = (p.scheme, p.netloc)
        conns = self._local.by_host
        c = conns.get(key)
        if c is None:
            host = p.hostname or ""
            if p.scheme == "https":
                c = http.client.HTTPSConnection(host, p.port, timeout=self.timeout,
                                                context=self._ssl)
            else:
                c = http.client.HTTPConnection(host, p.port, timeout=self.timeout)
            conns[key] = c
            with self._lock:
                self._conns.append(c)
        return c

    def _drop_conn(self, url: str) -> None:
        p = urlsplit(url)
        c = self._local.by_host.pop((p.scheme, p.netloc), None)
        if c is not None:
            c.close()

    def _error(self, what: str, offset: int | None, status: int | None = None) -> RemoteError:
        if what.startswith(_CHANGED):
            # every later read fails too (cached blocks included): never a mix of versions
            self._changed = what
        at = "" if offset is None else f" at offset {offset:#x}"
        return RemoteError(f"Could not read '{self.url}'{at}: {what}", url=self.url,
                           offset=offset, status=status)

    # --- one request ------------------------------------------------------------------
    def _request(self, method: str, headers: dict[str, str], offset: int | None
                 ) -> tuple[http.client.HTTPResponse, str]:
        """Send ``method`` to the URL, following redirects; return the response (its
        body unread) and the URL that answered.  Raises :class:`_Dropped` when the
        connection failed before a status line."""
        url = self._target
        for _ in range(self._max_redirects + 1):
            p = urlsplit(url)
            path = (p.path or "/") + (f"?{p.query}" if p.query else "")
            conn = self._conn(url)
            try:
                conn.request(method, path, headers={"Accept-Encoding": "identity",
                                                    **headers})
                resp = conn.getresponse()
            except (TimeoutError, socket.timeout):
                self._drop_conn(url)
                raise self._error(f"timed out after {self.timeout:g} s", offset) from None
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self._drop_conn(url)
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise self._error(f"TLS certificate not accepted: {e.verify_message}",
                                      offset) from None
                raise _Dropped(str(e) or type(e).__name__) from None
            if resp.status not in _REDIRECTS:
                return resp, url
            location = resp.getheader("Location")
            self._discard(resp, url)
            if not location:
                raise self._error(f"HTTP {resp.status} without a Location", offset,
                                  resp.status)
            nxt = urljoin(url, location)
            q = urlsplit(nxt)
            if q.scheme not in ("http", "https"):
                raise self._error(f"refusing a redirect to '{nxt}': only http and https "
                                  "are followed", offset, resp.status)
            host = (q.hostname or "").lower()
            if host != self._origin and host not in self._allow_hosts:
                raise self._error(f"refusing a redirect to another host '{nxt}' (allow "
                                  "it with allow_hosts)", offset, resp.status)
            url = nxt
        raise self._error(f"more than {self._max_redirects} redirects", offset)

    def _discard(self, resp: http.client.HTTPResponse, url: str) -> None:
        """Leave a response without reading a body of unknown or large size: a short
        body is read so the connection stays usable, anything else closes it."""
        length = resp.getheader("Content-Length")
        if resp.chunked or length is None or not length.isdigit() or int(length) > 65536:
            resp.close()
            self._drop_conn(url)
        else:
            try:
                resp.read()
            except (OSError, http.client.HTTPException):
                self._drop_conn(url)

    def _check_version(self, resp: http.client.HTTPResponse, offset: int | None) -> None:
        etag = resp.getheader("ETag")
        modified = resp.getheader("Last-Modified")
        if (self._etag and etag and etag != self._etag) or \
                (self._modified and modified and modified != self._modified):
            raise self._error(f"{_CHANGED} (ETag {self._etag} "
                              f"-> {etag}, Last-Modified {self._modified} -> {modified})",
                              offset)

    def _status_error(self, resp: http.client.HTTPResponse, url: str,
                      offset: int | None) -> RemoteError:
        self._discard(resp, url)
        if resp.status == 412:
            return self._error(f"{_CHANGED} (HTTP 412 "
                               "Precondition Failed)", offset, 412)
        return self._error(f"HTTP {resp.status} {resp.reason}", offset, resp.status)

    def _stat(self) -> int:
        """Size, ETag and Last-Modified: from HEAD, else from a one-byte ranged GET."""
        resp, url = self._retry(lambda: self._request("HEAD", {}, None), None)
        resp.read()
        self._target = url
        length = resp.getheader("Content-Length")
        if resp.status == 200 and length is not None and length.isdigit():
            self._etag = resp.getheader("ETag")
            self._modified = resp.getheader("Last-Modified")
            return int(length)
        if resp.status >= 400 and resp.status not in (405, 501):
            raise self._error(f"HTTP {resp.status} {resp.reason}", None, resp.status)
        resp, url = self._retry(lambda: self._request("GET", {"Range": "bytes=0-0"}, 0), 0)
        if resp.status != 206:
            if resp.status == 200:
                self._discard(resp, url)
                raise self._error("the server ignores Range requests (HTTP 200)", 0, 200)
            raise self._status_error(resp, url, 0)
        self._etag = resp.getheader("ETag")
        self._modified = resp.getheader("Last-Modified")
        total = _content_range(resp.getheader("Content-Range"))[2]
        self._discard(resp, url)
        if total is None:
            raise self._error("no size: neither Content-Length nor Content-Range/total",
                              0)
        return total

    def _retry(self, call: Callable[[], tuple[http.client.HTTPResponse, str]],
               offset: int | None) -> tuple[http.client.HTTPResponse, str]:
        """``call()``, once more if the connection failed under it."""
        try:
            return call()
        except _Dropped:
            pass
        try:
            return call()
        except _Dropped as e:
            raise self._error(f"connection failed twice: {e}", offset) from None

    def _fetch_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (all inside the object) with one
        ranged GET; a connection dropped mid-body is retried once."""
        for attempt in (0, 1):
            try:
                self._fetch_once(offset, buf)
                return
            except _Dropped as e:
                if attempt:
                    raise self._error(f"connection dropped twice: {e}", offset) from None

    def _fetch_once(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        end = offset + n - 1
        headers = {"Range": f"bytes={offset}-{end}"}
        if self._etag and not self._etag.startswith("W/"):
            headers["If-Match"] = self._etag
        resp, url = self._request("GET", headers, offset)
        if resp.status == 200:
            self._check_version_or_discard(resp, url, offset)
            self._discard(resp, url)
            raise self._error("the server ignores Range requests (HTTP 200 with the "
                              "whole object): refused", offset, 200)
        if resp.status != 206:
            raise self._status_error(resp, url, offset)
        self._check_version_or_discard(resp, url, offset)
        encoding = resp.getheader("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            self._discard(resp, url)
            raise self._error(f"the server sent an encoded body (Content-Encoding "
                              f"{encoding}) though identity was asked for", offset, 206)
        first, last, total = _content_range(resp.getheader("Content-Range"))
        if first is None or last is None:
            self._discard(resp, url)
            raise self._error(f"a 206 response without a usable Content-Range "
                              f"({resp.getheader('Content-Range')!r})", offset, 206)
        if total is not None and total != self._size:
            self._discard(resp, url)
            raise self._error(f"{_CHANGED} (size {self._size} "
                              f"-> {total})", offset, 206)
        if first == offset and last < end:
            self._discard(resp, url)
            raise self._error(f"short range: asked for bytes {offset}-{end}, got "
                              f"{first}-{last}", offset, 206)
        if first != offset or last != end:
            self._discard(resp, url)
            raise self._error(f"wrong Content-Range: asked for bytes {offset}-{end}, got "
                              f"{first}-{last}", offset, 206)
        got = 0
        try:
            while got < n:
                k = resp.readinto(buf[got:])
                if not k:
                    break
                got += k
        except (TimeoutError, socket.timeout):
            self._drop_conn(url)
            raise self._error(f"timed out after {self.timeout:g} s ({got} of {n} bytes "
                              "read)", offset) from None
        except http.client.IncompleteRead as e:
            got += len(e.partial)
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            self._drop_conn(url)
            raise _Dropped(f"{e or type(e).__name__} after {got} of {n} bytes") from None
        if got < n:
            self._drop_conn(url)
            raise _Dropped(f"the body ended after {got} of {n} bytes")
        if not resp.isclosed():
            # a body longer than the range: the connection cannot be reused
            if resp.length:
                self._drop_conn(url)
            else:
                resp.read()

    def _check_version_or_discard(self, resp: http.client.HTTPResponse, url: str,
                                  offset: int) -> None:
        try:
            self._check_version(resp, offset)
        except RemoteError:
            self._discard(resp, url)
            raise

    # --- block cache ------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers,
                                                thread_name_prefix="diskimg-http")
            return self._pool

    def _fill(self, first: int, count: int, offset: int, buf: memoryview) -> None:
        """Fetch blocks ``first`` .. ``first + count - 1`` (inside the object), cache
        them and copy what overlaps ``buf`` (which starts at ``offset``)."""
        bs = self._block
        start = first * bs
        stop = min((first + count) * bs, self._size)
        data = bytearray(stop - start)
        self._fetch_into(start, memoryview(data))
        lo, hi = max(start, offset), min(stop, offset + len(buf))
        if lo < hi:
            buf[lo - offset : hi - offset] = memoryview(data)[lo - start : hi - start]
        with self._lock:
            for i in range(count):
                b = first + i
                self._cache[b] = bytes(data[i * bs : (i + 1) * bs])
                self._cache.move_to_end(b)
            while len(self._cache) > self._max_blocks:
                self._cache.popitem(last=False)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of the object are zeroed."""
        self._check_open()
        if self._changed is not None:
            raise self._error(self._changed, offset)
        n = len(buf)
        end = self._clip(offset, buf)
        if offset >= end:
            return n
        bs = self._block
        first, last = offset // bs, (end - 1) // bs
        missing: list[int] = []
        with self._lock:
            for b in range(first, last + 1):
                blk = self._cache.get(b)
                if blk is None:
                    missing.append(b)
                    continue
                self._cache.move_to_end(b)
                lo, hi = max(b * bs, offset), min((b + 1) * bs, end)
                buf[lo - offset : hi - offset] = blk[lo - b * bs : hi - b * bs]
            sequential = offset == self._next
            self._next = end
            self._ahead = min(max(self._ahead * 2, 2), _READAHEAD_MAX) if sequential \
                else 0
            nblocks = -(-self._size // bs)
            # read ahead for small sequential reads only: a large read is its own
            # read-ahead, and going through the cache would copy it twice more
            small = last - first < _PART_BLOCKS
            ahead = [b for b in range(last + 1, min(last + 1 + self._ahead, nblocks))
                     if b not in self._cache] if missing and small and self._ahead else []
        if not missing:
            return n
        # runs wholly inside the request go straight into ``buf`` (not cached: a large
        # read is not read again); partial blocks and read-ahead go through the cache
        jobs: list[Callable[[], None]] = []
        for b, c in _runs(missing + ahead, _PART_BLOCKS):
            lo, hi = b * bs, min((b + c) * bs, self._size)
            if lo >= offset and hi <= end and c > 1:
                jobs.append(partial(self._fetch_into, lo, buf[lo - offset : hi - offset]))
            else:
                jobs.append(partial(self._fill, b, c, offset, buf))
        if len(jobs) == 1:
            jobs[0]()
            return n
        pool = self._executor()
        futs = [pool.submit(j) for j in jobs[1:]]
        first_error: BaseException | None = None
        try:
            jobs[0]()
        except BaseException as e:
            first_error = e
        errors = [first_error, *(f.exception() for f in futs)]
        for err in errors:
            if err is not None:
                raise err
        return n

    # --- size and the rest of the Host protocol ---------------------------------------
    def _read_only(self) -> UsageError:
        return UsageError(f"'{self.url}' is read-only (an HTTP source)")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise self._read_only()

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        raise self._read_only()

    def truncate(self, size: int) -> None:
        raise self._read_only()

    def empty(self) -> None:
        raise self._read_only()

    def punch_hole(self, offset: int, length: int) -> bool:
        raise self._read_only()

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        raise self._read_only()

    def preallocate(self, offset: int, length: int) -> None:
        raise self._read_only()

    def write_zeros(self, offset: int, length: int) -> None:
        raise self._read_only()

    def flush(self) -> None:
        """Nothing to flush: the host is read-only."""

    def lock(self, writable: bool) -> None:
        """No lock bytes over HTTP; a writable lock is refused."""
        if writable:
            raise self._read_only()

    def close(self) -> None:
        """Close every connection and the thread pool (idempotent)."""
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
            conns, self._conns = self._conns, []
            self._cache.clear()
        if pool is not None:
            pool.shutdown(wait=True)
        for c in conns:
            c.close()

    def __enter__(self) -> HttpHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(blocks: list[int], most: int) -> list[tuple[int, int]]:
    """Sorted distinct ``blocks`` as (first, count) runs of at most ``most`` blocks."""
    runs: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if runs and runs[-1][0] + runs[-1][1] == b and runs[-1][1] < most:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes FIRST-LAST/TOTAL`` (TOTAL may be ``*``) as numbers; None where absent or
    not parseable."""
    if not value:
        return None, None, None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None, None
    span, _, total = rest.partition("/")
    tot = int(total) if total.strip().isdigit() else None
    first, _, last = span.partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit()):
        return None, None, tot
    a, b = int(first), int(last)
    if b < a:
        return None, None, tot
    return a, b, tot


def open_http(url: str, policy: OpenPolicy | None = None, writable: bool = False, *,
              timeout: float = DEFAULT_TIMEOUT, block_size: int = BLOCK_SIZE,
              cache_bytes: int = CACHE_BYTES, workers: int = WORKERS,
              max_redirects: int = MAX_REDIRECTS, allow_hosts: Collection[str] = (),
              ssl_context: ssl.SSLContext | None = None) -> HttpHost:
    """Open ``url`` (http:// or https://) as a read-only host.

    ``timeout`` (seconds) bounds every connect and every socket read; ``allow_hosts``
    names the other hosts a redirect may lead to (none by default: ``policy`` with
    ``untrusted=True`` refuses them even when named).  The size and version (ETag,
    Last-Modified) are read now; a fault raises :class:`~diskimg.errors.RemoteError`.
    """
    if writable:
        raise UsageError(f"'{url}' is read-only (an HTTP source)")
    if policy is not None and policy.untrusted:
        allow_hosts = ()
    return HttpHost(url, timeout=timeout, block_size=block_size, cache_bytes=cache_bytes,
                    workers=workers, max_redirects=max_redirects, allow_hosts=allow_hosts,
                    ssl_context=ssl_context)


if TYPE_CHECKING:  # the type checker proves HttpHost is a Host (the formats' byte source)
    def _is_a_host(h: HttpHost) -> Host:
        return h
