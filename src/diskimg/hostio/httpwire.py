"""One HTTP/1.1 client connection over a socket diskimg controls (stdlib ``socket`` and
``ssl`` only), written for ranged GETs of large bodies:

- the request goes out in one ``sendall``; the response head (status line and headers)
  is read into a bounded buffer and parsed strictly: at most :data:`MAX_HEAD` bytes and
  :data:`MAX_HEADERS` header lines, else :class:`ProtocolError`;
- the body is received with ``recv_into`` straight into the caller's buffer (no copy but
  the few bytes that arrived with the head; ``recv_into`` releases the GIL, so several
  connections fill parts of one buffer in parallel);
- framing: ``Content-Length``, ``Transfer-Encoding: chunked`` (decoded; chunk-size lines
  bounded) or a body that ends when the server closes; HEAD, 1xx, 204 and 304 have none;
- keep-alive: the connection is reused only after a body was read to its end and neither
  side said ``Connection: close`` (HTTP/1.0 closes unless it says keep-alive); a new
  request on a connection whose last body was not finished reconnects first;
- every socket operation has the connection's timeout, and the whole response head
  must arrive within it (a server trickling a byte at a time cannot hold a read); TLS is
  the same code over an
  ``ssl`` socket (``ssl`` is imported by the first https connection only).

Errors: ``TimeoutError`` (the timeout), ``ssl.SSLCertVerificationError``, ``OSError``
(the socket) and :class:`ProtocolError` (what the server sent) -- the caller decides what
each means (:mod:`diskimg.hostio.http`).
"""

from __future__ import annotations

import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # ssl is imported for https only (start-up of a plain http open)
    import ssl

MAX_HEAD = 64 << 10          # a response head (status line and headers) at most
MAX_HEADERS = 100            # header lines at most (as http.client)
MAX_LINE = 4096              # a chunk-size or trailer line at most
_RBUF = MAX_HEAD + (16 << 10)
_NO_BODY = (204, 304)


def certificate_refusal(e: BaseException) -> str | None:
    """Why TLS refused the server's certificate when ``e`` says so, else None (no ssl
    import for that: an error of the ssl module means ssl is loaded)."""
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(e, ssl.SSLCertVerificationError):
        return str(e.verify_message)
    return None


def host_header(scheme: str, host: str, port: int | None) -> str:
    """The ``Host`` header of a request to ``host`` (an IPv6 address in brackets) and
    ``port`` (left out when it is the scheme's default)."""
    name = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if scheme == "https" else 80):
        name = f"{name}:{port}"
    return name


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 response (or the connection closed
    where a response or a chunk was due)."""


class Response:
    """A response head; its body is read with :meth:`Connection.readinto`."""

    __slots__ = ("chunk_left", "chunked", "finished", "headers", "length", "reason",
                 "remaining", "status", "version", "will_close")

    def __init__(self, version: str, status: int, reason: str,
                 headers: dict[str, str]) -> None:
        self.version, self.status, self.reason, self.headers = version, status, reason, \
            headers
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = headers.get("content-length", "").strip()
        #: the Content-Length (None: absent, not a number, or a chunked body)
        self.length: int | None = int(cl) if cl.isdigit() and not self.chunked else None
        conn = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        self.will_close = "close" in conn or (version == "HTTP/1.0" and
                                              "keep-alive" not in conn)
        #: body bytes still to read (None: until the server closes, or chunked)
        self.remaining: int | None = self.length
        self.chunk_left = 0
        self.finished = False

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (any case; repeated headers joined by ``, ``)."""
        return self.headers.get(name.lower(), default)


def _parse_head(head: bytes) -> Response:
    lines = head.split(b"\n")
    status_line = lines[0].rstrip(b"\r").decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    last = ""
    for raw in lines[1:]:
        line = raw.rstrip(b"\r").decode("latin-1")
        if line[:1] in (" ", "\t"):                     # obsolete line folding
            if not last:
                raise ProtocolError("a folded header line before any header")
            headers[last] += " " + line.strip(" \t")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(
                c in name for c in "()<>@,;\\\"/[]?={} \t"):
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        last = name.lower()
        value = value.strip(" \t")
        if last in headers:
            if last == "content-length" and headers[last] != value:
                raise ProtocolError("two different Content-Length headers")
            if last != "content-length":
                headers[last] += ", " + value
        else:
            headers[last] = value
    return Response(version, int(code), reason.strip(), headers)


class Connection:
    """A keep-alive connection to one ``scheme://host:port`` (``https``: TLS with
    ``ssl_context`` or the default, verifying, context)."""

    def __init__(self, scheme: str, host: str, port: int | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.host = scheme, host
        self.port = port or (443 if scheme == "https" else 80)
        self.timeout = timeout
        self._ssl = ssl_context
        self._sock: socket.socket | None = None
        self._rbuf = bytearray(_RBUF)
        self._rpos = self._rend = 0      # bytes received but not yet consumed
        self._resp: Response | None = None

    # --- the socket -------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        # an ASCII host name as bytes: getaddrinfo then needs no idna codec import
        host: str | bytes = self.host.encode("ascii") if self.host.isascii() else self.host
        sock = socket.create_connection((host, self.port), self.timeout)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import ssl

                ctx = self._ssl
                if ctx is None:
                    ctx = ssl.create_default_context()
                    ctx.set_alpn_protocols(["http/1.1"])
                sock = ctx.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close the socket (idempotent); the next request reconnects."""
        sock, self._sock = self._sock, None
        self._rpos = self._rend = 0
        self._resp = None
        if sock is not None:
            sock.close()

    def _recv_into(self, buf: memoryview) -> int:
        """Bytes into ``buf``: those already received first, else one ``recv_into``."""
        pending = self._rend - self._rpos
        if pending:
            k = min(pending, len(buf))
            buf[:k] = self._rbuf[self._rpos : self._rpos + k]
            self._rpos += k
            return k
        if self._sock is None:
            raise ProtocolError("the connection is closed")
        return self._sock.recv_into(buf)

    def _read_until(self, limit: int, *, blank: bool, deadline: float | None = None
                    ) -> bytes:
        """The bytes up to the end of the next line (``blank``: up to the next empty
        line, the end of a head), at most ``limit``; the terminator is consumed.
        ``deadline`` (``time.monotonic()``): TimeoutError once it passes."""
        if self._sock is None:
            raise ProtocolError("the connection is closed")
        seps = (b"\r\n\r\n", b"\n\n") if blank else (b"\n",)
        scan = self._rpos
        while True:
            hits = [(i, len(s)) for s in seps
                    if (i := self._rbuf.find(s, scan, self._rend)) >= 0]
            if hits:
                i, k = min(hits)
                if i - self._rpos > limit:
                    break
                out = bytes(self._rbuf[self._rpos : i])
                self._rpos = i + k
                return out
            if self._rend - self._rpos > limit:
                break
            if self._rpos:                               # keep the pending bytes first
                pending = self._rend - self._rpos
                self._rbuf[:pending] = self._rbuf[self._rpos : self._rend]
                self._rpos, self._rend = 0, pending
            scan = max(self._rpos, self._rend - 3)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the response head did not arrive in time")
                self._sock.settimeout(min(left, self.timeout))
            k = self._sock.recv_into(memoryview(self._rbuf)[self._rend:])
            if not k:
                raise ProtocolError("the server closed the connection without a response"
                                    if blank else "the connection closed inside a chunked "
                                    "body")
            self._rend += k
        what = "response head" if blank else "line"
        raise ProtocolError(f"a {what} longer than {limit} bytes")

    # --- one exchange -----------------------------------------------------------------
    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | bytearray | memoryview | None = None) -> Response:
        """Send one request and read the response head (1xx heads are skipped).
        ``body`` (the caller's ``headers`` give its ``Content-Length``) is sent from
        the caller's buffer as it is, after the head."""
        if self._resp is not None and not self._resp.finished:
            self.close()                    # an unread body: the connection is not reusable
        if self._sock is None:
            self._sock = self._connect()
        host = host_header(self.scheme, self.host, self.port)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        self._sock.sendall("\r\n".join(lines).encode("latin-1"))
        if body is not None and len(body):
            self._sock.sendall(body)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                resp = _parse_head(self._read_until(MAX_HEAD, blank=True,
                                                    deadline=deadline))
                if not (100 <= resp.status < 200) or resp.status == 101:
                    break
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        if method == "HEAD" or resp.status in _NO_BODY or resp.status < 200:
            resp.remaining, resp.chunked, resp.finished = 0, False, True
        elif resp.remaining is None and not resp.chunked:
            resp.will_close = True              # the body ends where the connection does
        elif resp.remaining == 0:
            resp.finished = True
        self._resp = resp
        if resp.finished and resp.will_close:
            self.close()
            self._resp = resp
        return resp

    def readinto(self, resp: Response, buf: memoryview) -> int:
        """Up to ``len(buf)`` body bytes of ``resp`` into ``buf``; 0 at the end of the
        body (or where the server closed the connection early: the caller compares what
        it got with what it asked for)."""
        if resp.finished or not len(buf):
            return 0
        if resp.chunked:
            if not resp.chunk_left and not self._next_chunk(resp):
                return 0
            want = min(len(buf), resp.chunk_left)
        elif resp.remaining is None:
            want = len(buf)
        else:
            want = min(len(buf), resp.remaining)
        k = self._recv_into(buf[:want])
        if not k:                                      # closed by the server
            resp.finished = resp.remaining is None and not resp.chunked
            self.close()
            return 0
        if resp.chunked:
            resp.chunk_left -= k
            if not resp.chunk_left and self._read_until(MAX_LINE, blank=False).strip():
                raise ProtocolError("no line end after a chunk of a chunked body")
        elif resp.remaining is not None:
            resp.remaining -= k
            if not resp.remaining:
                self._finish(resp)
        return k

    def _next_chunk(self, resp: Response) -> bool:
        """Read the next chunk-size line; False at the last chunk (trailers read)."""
        line = self._read_until(MAX_LINE, blank=False)
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF"
                                             for c in size):
            raise ProtocolError(f"bad chunk size line {line[:40]!r}")
        resp.chunk_left = int(size, 16)
        if resp.chunk_left:
            return True
        for _ in range(MAX_HEADERS + 1):                 # trailers, then an empty line
            if not self._read_until(MAX_LINE, blank=False).strip():
                self._finish(resp)
                return False
        raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")

    def _finish(self, resp: Response) -> None:
        resp.finished = True
        if resp.will_close:
            self.close()

    def read_body(self, resp: Response, most: int) -> bytes:
        """The whole body of ``resp`` (a small reply: an XML document) when it is at
        most ``most`` bytes; a longer one is a :class:`ProtocolError` (the connection
        is closed)."""
        out = bytearray()
        buf = memoryview(bytearray(min(most + 1, 65536)))
        while not resp.finished:
            k = self.readinto(resp, buf)
            if not k:
                break
            out += buf[:k]
            if len(out) > most:
                self.close()
                raise ProtocolError(f"a response body longer than {most} bytes")
        return bytes(out)

    def drain(self, resp: Response, most: int) -> None:
        """Read and drop the rest of ``resp``'s body when it is at most ``most`` bytes
        (a chunked body: while it stays so), so the connection stays usable; otherwise
        close it."""
        if resp.finished:
            return
        if (resp.remaining is None and not resp.chunked) or (resp.remaining or 0) > most:
            self.close()
            return
        scratch = memoryview(bytearray(min(most, 65536) or 1))
        left = most
        while not resp.finished:
            k = self.readinto(resp, scratch[: max(left, 1)])
            left -= k
            if (not k and not resp.finished) or left < 0:
                self.close()
                return
