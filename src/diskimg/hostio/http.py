"""HttpHost: a read-only :class:`~diskimg.hostio.host.Host` over an ``http://`` or
``https://`` URL (stdlib ``socket`` and ``ssl`` only, through
:mod:`diskimg.hostio.httpwire`).

- every read is a ``GET`` with one ``Range``; a response that is not exactly the bytes
  asked for (``200`` with the whole body, a short or wrong ``Content-Range``, a body that
  ends early) is refused -- never read into memory whole, never returned as data;
- the body is received straight into the caller's buffer; keep-alive: each thread keeps
  its own connection;
- the stream: a large read (at least :data:`STREAM_MIN` bytes) is one GET of its bytes
  on a connection of its own; a read that starts where the last one ended is sequential
  (small ones join from the :data:`STREAM_AFTER`-th in a row) and its GET asks for
  :data:`STREAM_WINDOW` bytes (to the end of the object, in practice), and the next
  reads are received from that response as they come (a gap of at most
  :data:`STREAM_SKIP` bytes is read past into a scratch buffer).  Memory: the
  read-ahead is never copied into this process; what is in flight waits in the kernel's
  socket buffers (this socket's receive buffer and the server's send buffer: a few MiB,
  whatever the window), plus the ``STREAM_SKIP`` scratch buffer here.  One GET per
  window, not one per read: each new GET leaves the pipe empty for a round trip, which
  on a loaded machine cost ~15% against one whole-object GET (doubling windows from the
  read's size up to 64 MiB) and ~0-5% with this window.  A read elsewhere leaves the
  stream (its connection is closed when more than a few KiB of it is unread).  One
  connection: on 2 cores, parallel GETs from one nginx did not pay (the floor rows of
  benchmarks/bench_http.py), so ``workers`` only fetches the block cache's pieces of
  one read at once;
- other reads: a bounded LRU cache of ``block_size`` blocks (``cache_bytes`` in all), and
  read-ahead that grows while small reads are sequential
  (:mod:`diskimg.hostio.blockcache`);
- the size, ETag and Last-Modified are recorded at open; every response is checked
  against them (``If-Match`` is sent with a strong ETag): an object that changed is an
  error, never a mix of two versions.  A change after a GET's head arrived is seen by the
  next request (the cache path's, or the stream's next window); until then the body is
  what the server sends for that one response (nginx keeps sending the file it opened
  when the file is replaced by a rename);
- ``sign`` (an object store's client, :mod:`diskimg.hostio.s3`) adds a signature to the
  headers of every request; ``name`` (the ``s3://`` URL) is what messages then name;
- faults end in :class:`~diskimg.errors.RemoteError` naming the URL and the offset; a
  dropped connection is retried once (a GET is idempotent; a streamed read resumes where
  the body broke), a timeout or an HTTP status is not; redirects are followed
  ``max_redirects`` times, only to http/https, and to another host only when it is in
  ``allow_hosts``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection
from urllib.parse import urljoin, urlsplit

from diskimg.errors import RemoteError, UsageError
from diskimg.hostio.httpwire import Connection, ProtocolError, Response, certificate_refusal
from diskimg.hostio.objects import ObjectHost
from diskimg.policy import OpenPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:  # ssl is imported for https only
    import ssl

    from diskimg.hostio.host import Host

    #: ``sign(method, url, headers)`` -> the headers to send, signed (S3: sigv4)
    Signer = Callable[[str, str, dict[str, str]], dict[str, str]]

DEFAULT_TIMEOUT = 30.0
BLOCK_SIZE = 256 << 10
CACHE_BYTES = 8 << 20
WORKERS = 4
MAX_REDIRECTS = 5
MIN_PART = 1 << 20           # a parallel part of a large read: at least this many bytes
STREAM_MIN = 1 << 20         # a read at least this large is received from the stream
STREAM_WINDOW = 1 << 30      # what a sequential reader's streaming GET asks for
STREAM_SKIP = 256 << 10      # a gap in the stream at most this large is read past
STREAM_AFTER = 3             # small reads in a row, each where the last ended: streamed
_REDIRECTS = (301, 302, 303, 307, 308)
_SMALL_BODY = 65536          # a body this short is read to keep its connection
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


class _Conns(threading.local):
    """Each thread's keep-alive connections, by (scheme, host:port)."""

    def __init__(self) -> None:
        self.by_host: dict[tuple[str, str], Connection] = {}


class _Stream:
    """The state of the one sequential stream of an :class:`HttpHost`: its connections
    (its own, by host), the open response (None: none) whose body still holds the
    object's bytes ``[pos, end)``, where the last read ended (``next``), how many reads
    in a row started there (``run``) and a scratch buffer to read past a gap.  ``next``
    and ``run`` are a heuristic, updated without the lock."""

    __slots__ = ("conn", "conns", "end", "lock", "next", "pos", "resp", "run", "scratch")

    def __init__(self) -> None:
        self.conns: dict[tuple[str, str], Connection] = {}
        self.resp: Response | None = None
        self.conn: Connection | None = None
        self.pos = self.end = self.run = 0
        self.next = -1
        self.scratch: memoryview | None = None
        self.lock = threading.Lock()

    def follows(self, offset: int, n: int) -> bool:
        """Whether ``[offset, offset + n)`` lies in the open response, at most
        :data:`STREAM_SKIP` bytes past where it stands."""
        return (self.resp is not None and self.pos <= offset <= self.pos + STREAM_SKIP
                and offset + n <= self.end)


class _Dropped(Exception):
    """The connection failed under a request: safe to retry a GET once.  ``got``: the
    body bytes received (in order, into the caller's buffer) before it failed."""

    def __init__(self, what: str, got: int = 0) -> None:
        super().__init__(what)
        self.got = got


class HttpHost(ObjectHost):
    """A read-only host over one HTTP(S) object.  Offsets and lengths are in bytes."""

    writable = False
    sync = False
    locked = False

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 block_size: int = BLOCK_SIZE, cache_bytes: int = CACHE_BYTES,
                 workers: int = WORKERS, max_redirects: int = MAX_REDIRECTS,
                 allow_hosts: Collection[str] = (),
                 ssl_context: ssl.SSLContext | None = None,
                 sign: Signer | None = None, name: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"'{url}' is not an http:// or https:// URL")
        if block_size <= 0 or cache_bytes < block_size or workers < 1 or timeout <= 0:
            raise UsageError("block_size, cache_bytes, workers and timeout must be positive "
                             "(cache_bytes at least one block)")
        #: the URL as given, or ``name`` (an ``s3://`` URL): what error messages name
        self.path: str = name or url
        #: the same (its scheme's two slashes intact): what messages name
        self.name = self.path
        self.url = self.path
        self._target = url                  # after the redirects taken at open
        self._sign = sign
        self._origin = parts.hostname.lower()
        self.timeout = timeout
        self._max_redirects = max_redirects
        self._allow_hosts = {h.lower() for h in allow_hosts}
        self._ssl = ssl_context
        self._local = _Conns()
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self._init_reads(block_size, cache_bytes, workers, MIN_PART)
        self._stream = _Stream()
        self._closed = False
        self._etag: str | None = None
        self._modified: str | None = None
        self._size = -1
        try:
            self._size = self._stat()
        except BaseException:
            self.close()
            raise

    # --- connections ------------------------------------------------------------------
    def _conn(self, url: str, conns: dict[tuple[str, str], Connection] | None = None
              ) -> Connection:
        """This thread's keep-alive connection to ``url``'s host (one per host), or the
        one in ``conns`` (the stream's)."""
        p = urlsplit(url)
        key = (p.scheme, p.netloc)
        if conns is None:
            conns = self._local.by_host
        c = conns.get(key)
        if c is None:
            c = Connection(p.scheme, p.hostname or "", p.port, self.timeout, self._ssl)
            conns[key] = c
            with self._lock:
                self._conns.append(c)
        return c

    def _drop_conn(self, url: str) -> None:
        p = urlsplit(url)
        c = self._local.by_host.get((p.scheme, p.netloc))
        if c is not None:
            c.close()

    def _error(self, what: str, offset: int | None, status: int | None = None) -> RemoteError:
        return self._read_error(what, offset, status)

    # --- one request ------------------------------------------------------------------
    def _request(self, method: str, headers: dict[str, str], offset: int | None,
                 conn_of: Callable[[str], Connection] | None = None
                 ) -> tuple[Response, Connection, str]:
        """Send ``method`` to the URL, following redirects; return the response (its
        body unread), its connection and the URL that answered.  Raises
        :class:`_Dropped` when the connection failed before a complete response head."""
        url = self._target
        for _ in range(self._max_redirects + 1):
            p = urlsplit(url)
            target = (p.path or "/") + (f"?{p.query}" if p.query else "")
            if _BAD_TARGET.search(target):
                raise self._error(f"the URL path {target!r} holds a space or a control "
                                  "character", offset)
            conn = (conn_of or self._conn)(url)
            sent = {"Accept-Encoding": "identity", **headers}
            if self._sign is not None:
                sent = self._sign(method, url, sent)
            try:
                resp = conn.request(method, target, sent)
            except TimeoutError:
                conn.close()
                raise self._error(f"timed out after {self.timeout:g} s", offset) from None
            except (OSError, ProtocolError) as e:
                conn.close()
                refusal = certificate_refusal(e)
                if refusal is not None:
                    raise self._error(f"TLS certificate not accepted: {refusal}",
                                      offset) from None
                raise _Dropped(str(e) or type(e).__name__) from None
            if resp.status not in _REDIRECTS:
                return resp, conn, url
            location = resp.header("Location")
            self._discard(resp, conn)
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

    def _discard(self, resp: Response, conn: Connection) -> None:
        """Leave a response: a short body is read so the connection stays usable,
        anything else (or a failure reading it) closes it."""
        try:
            conn.drain(resp, _SMALL_BODY)
        except (OSError, ProtocolError):
            conn.close()

    def _check_version(self, resp: Response, conn: Connection, offset: int | None) -> None:
        etag = resp.header("ETag")
        modified = resp.header("Last-Modified")
        if (self._etag and etag and etag != self._etag) or \
                (self._modified and modified and modified != self._modified):
            self._discard(resp, conn)
            raise self._changed_error(f"ETag {self._etag} -> {etag}, Last-Modified "
                                      f"{self._modified} -> {modified}", offset)

    def _status_error(self, resp: Response, conn: Connection,
                      offset: int | None) -> RemoteError:
        self._discard(resp, conn)
        if resp.status == 412:
            return self._changed_error("HTTP 412 Precondition Failed", offset, 412)
        return self._error(f"HTTP {resp.status} {resp.reason}", offset, resp.status)

    def _stat(self) -> int:
        """Size, ETag and Last-Modified: from HEAD, else from a one-byte ranged GET."""
        resp, conn, self._target = self._retry(lambda: self._request("HEAD", {}, None),
                                               None)
        length = resp.header("Content-Length")
        if resp.status == 200 and length is not None and length.isdigit():
            self._etag = resp.header("ETag")
            self._modified = resp.header("Last-Modified")
            return int(length)
        if resp.status >= 400 and resp.status not in (405, 501):
            raise self._error(f"HTTP {resp.status} {resp.reason}", None, resp.status)
        resp, conn, _ = self._retry(lambda: self._request("GET", {"Range": "bytes=0-0"}, 0),
                                    0)
        if resp.status != 206:
            if resp.status == 200:
                self._discard(resp, conn)
                raise self._error("the server ignores Range requests (HTTP 200)", 0, 200)
            raise self._status_error(resp, conn, 0)
        self._etag = resp.header("ETag")
        self._modified = resp.header("Last-Modified")
        total = _content_range(resp.header("Content-Range"))[2]
        self._discard(resp, conn)
        if total is None:
            raise self._error("no size: neither Content-Length nor Content-Range/total",
                              0)
        return total

    def _retry(self, call: Callable[[], tuple[Response, Connection, str]],
               offset: int | None) -> tuple[Response, Connection, str]:
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
        resp, conn = self._open_range(offset, offset + len(buf), self._conn)
        self._recv_body(resp, conn, offset, buf)
        if not resp.finished:   # a chunked body's last chunk, or more than the range
            self._discard(resp, conn)

    def _open_range(self, offset: int, end: int, conn_of: Callable[[str], Connection]
                    ) -> tuple[Response, Connection]:
        """Send ``GET`` for the bytes ``[offset, end)`` (with ``If-Match`` when the ETag
        is strong) on ``conn_of(url)``'s connection; return the response once its head
        proves it is exactly those bytes of this version of the object (its body
        unread), else raise :class:`RemoteError` (:class:`_Dropped`: the connection
        failed before a complete head)."""
        last = end - 1
        headers = {"Range": f"bytes={offset}-{last}"}
        if self._etag and not self._etag.startswith("W/"):
            headers["If-Match"] = self._etag
        resp, conn, _ = self._request("GET", headers, offset, conn_of)
        if resp.status == 200:
            self._check_version(resp, conn, offset)
            self._discard(resp, conn)
            raise self._error("the server ignores Range requests (HTTP 200 with the "
                              "whole object): refused", offset, 200)
        if resp.status != 206:
            raise self._status_error(resp, conn, offset)
        self._check_version(resp, conn, offset)
        refusal = self._refusal(resp, offset, last)
        if refusal is not None:
            self._discard(resp, conn)
            raise refusal
        return resp, conn

    def _recv_body(self, resp: Response, conn: Connection, offset: int, buf: memoryview
                   ) -> None:
        """Receive exactly ``len(buf)`` body bytes of ``resp`` (the object's bytes from
        ``offset``) into ``buf``; a timeout is a
        :class:`RemoteError` naming ``offset``, a failed or closed connection
        :class:`_Dropped` (the connection is closed either way)."""
        n = len(buf)
        got = 0
        try:
            while got < n:
                k = conn.readinto(resp, buf[got:])
                if not k:
                    break
                got += k
        except TimeoutError:
            conn.close()
            raise self._error(f"timed out after {self.timeout:g} s ({got} of {n} bytes "
                              "read)", offset) from None
        except (OSError, ProtocolError) as e:
            conn.close()
            raise _Dropped(f"{e or type(e).__name__} after {got} of {n} bytes",
                           got) from None
        if got < n:
            conn.close()
            raise _Dropped(f"the body ended after {got} of {n} bytes", got)

    # --- the sequential stream --------------------------------------------------------
    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of the object are zeroed.

        A large read (at least :data:`STREAM_MIN` bytes), a read that continues the open
        stream, and a run of small sequential reads (from the :data:`STREAM_AFTER`-th
        on) are received from the stream (:meth:`_stream_into`); any other read goes
        through the block cache.  One thread at a time streams: another thread's
        read meanwhile takes the cache path."""
        self._check_open()
        if self._changed is not None:
            raise self._read_error(self._changed, offset)
        st = self._stream
        n = len(buf)
        st.run = st.run + 1 if offset == st.next else 0
        if self._streams(offset, n) and st.lock.acquire(blocking=False):
            try:
                if self._streams(offset, n):
                    end = self._clip(offset, buf)
                    if offset < end:
                        self._stream_into(offset, buf[: end - offset])
                    st.next = offset + n
                    return n
            finally:
                st.lock.release()
        super().preadinto(offset, buf)
        st.next = offset + n
        return n

    def _streams(self, offset: int, n: int) -> bool:
        """Whether a read of ``n`` bytes at ``offset`` is the stream's: a large one, one
        that lies in the open response, or the :data:`STREAM_AFTER`-th small read in a row
        to start where the last one ended."""
        st = self._stream
        return n >= STREAM_MIN or st.run >= STREAM_AFTER or st.follows(offset, n)

    def _stream_into(self, offset: int, buf: memoryview) -> None:
        """Receive the object's bytes ``[offset, offset + len(buf))`` (all inside it) from
        the stream: the open GET when the read continues it (a gap of at most
        :data:`STREAM_SKIP` bytes is read past), else a new ranged GET from ``offset``.
        A read that starts where the last one ended is sequential: its GET asks for
        :data:`STREAM_WINDOW` bytes (or the read's, when more); any other read asks for
        its own bytes only.  A connection dropped under a read is retried once, from
        where it failed (GET is idempotent and ``If-Match`` pins the version; the bytes
        received before the drop came in order from the checked response)."""
        st = self._stream
        n = len(buf)
        sequential = st.follows(offset, n) or st.run > 0
        got = drops = 0
        try:
            while got < n:
                pos = offset + got
                try:
                    if not st.follows(pos, 1):
                        self._stream_open(pos, n - got, sequential)
                    elif pos > st.pos:
                        self._stream_skip(pos - st.pos)
                    assert st.resp is not None and st.conn is not None
                    k = min(n - got, st.end - pos)
                    self._recv_body(st.resp, st.conn, pos, buf[got : got + k])
                except _Dropped as e:
                    self._stream_close()
                    got += e.got            # received in order: resumed from there
                    sequential = False      # the retry asks for the rest of this read
                    drops += 1
                    if drops > 1:
                        raise self._error(f"connection dropped twice: {e}", pos) from None
                    continue
                st.pos += k
                got += k
                if st.pos == st.end:
                    self._stream_close()
        except BaseException:
            self._stream_close()
            raise

    def _stream_open(self, pos: int, want: int, sequential: bool) -> None:
        """A new streaming GET from ``pos``: ``want`` bytes, or a sequential reader's
        window (whichever is more, to the end of the object)."""
        st = self._stream
        self._stream_close()
        end = min(self._size, pos + (max(want, STREAM_WINDOW) if sequential else want))
        st.resp, st.conn = self._open_range(pos, end, self._stream_conn)
        st.pos, st.end = pos, end

    def _stream_skip(self, k: int) -> None:
        """Read past ``k`` (at most :data:`STREAM_SKIP`) bytes of the open stream."""
        st = self._stream
        assert st.resp is not None and st.conn is not None
        if st.scratch is None:
            st.scratch = memoryview(bytearray(STREAM_SKIP))
        try:
            self._recv_body(st.resp, st.conn, st.pos, st.scratch[:k])
        except _Dropped as e:               # none of the caller's bytes came
            raise _Dropped(str(e)) from None
        st.pos += k

    def _stream_close(self) -> None:
        """Leave the open stream: its connection stays when little of the body is left
        (read and dropped), else it is closed."""
        st = self._stream
        resp, conn, st.resp = st.resp, st.conn, None
        if resp is not None and conn is not None and not resp.finished:
            self._discard(resp, conn)

    def _stream_conn(self, url: str) -> Connection:
        """The stream's own keep-alive connection to ``url``'s host."""
        return self._conn(url, self._stream.conns)

    def _refusal(self, resp: Response, offset: int, end: int) -> RemoteError | None:
        """Why a 206 response is not the bytes ``offset``..``end`` of this object, or
        None."""
        encoding = (resp.header("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            return self._error(f"the server sent an encoded body (Content-Encoding "
                               f"{encoding}) though identity was asked for", offset, 206)
        first, last, total = _content_range(resp.header("Content-Range"))
        if first is None or last is None:
            return self._error(f"a 206 response without a usable Content-Range "
                               f"({resp.header('Content-Range')!r})", offset, 206)
        if total is not None and total != self._size:
            return self._changed_error(f"size {self._size} -> {total}", offset, 206)
        if first == offset and last < end:
            return self._error(f"short range: asked for bytes {offset}-{end}, got "
                               f"{first}-{last}", offset, 206)
        if first != offset or last != end:
            return self._error(f"wrong Content-Range: asked for bytes {offset}-{end}, got "
                               f"{first}-{last}", offset, 206)
        return None

    # --- size and the rest of the Host protocol ---------------------------------------
    def _read_only(self) -> UsageError:
        return UsageError(f"'{self.url}' is read-only (an HTTP source)" if self._sign is None
                          else f"'{self.url}' is read-only (an object store's object)")

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
        self._close_reads()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()

    def __enter__(self) -> HttpHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
