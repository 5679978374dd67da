"""HttpHost's own HTTP/1.1 client (hostio/httpwire.py) against a scripted server: every
framing a server may choose (Content-Length, chunked, close-delimited, HTTP/1.0,
``Connection: close``, 1xx heads) gives the object's bytes; a hostile head (too long, too
many lines, not HTTP) or body (a bad chunk) is a RemoteError naming the URL and the
offset, never a hang or unbounded memory; keep-alive reuses one connection; large and
sequential reads are received from one streaming GET (windows doubling up to a bound),
random ones ask for their own bytes only."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from diskimg.errors import RemoteError
from diskimg.hostio.http import open_http

DATA = bytes((i * 7 + i // 251) & 0xFF for i in range(3 << 20))   # 3 MiB, no period of 256

#: a scripted answer: (status line and extra header lines, body) for one parsed request;
#: the server adds nothing but what the script says
Script = Callable[["Request"], bytes]


@dataclass
class Request:
    method: str
    first: int
    last: int
    conn: int          # which accepted connection (0, 1, ...)
    number: int        # requests served on that connection before this one


@dataclass
class Server:
    script: Script
    sock: socket.socket = field(default_factory=socket.socket)
    requests: list[Request] = field(default_factory=list)
    conns: int = 0
    close_after: set[int] = field(default_factory=set)   # request indexes: close after
    trickle: Callable[[socket.socket], None] | None = None   # sends every GET's answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/disk.img"

    def _serve(self, c: socket.socket, n: int) -> None:
        with c:
            c.settimeout(10)
            pending = b""
            number = 0
            while True:
                while b"\r\n\r\n" not in pending:
                    try:
                        got = c.recv(65536)
                    except OSError:
                        return
                    if not got:
                        return
                    pending += got
                head, _, pending = pending.partition(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode()
                m = re.search(rb"Range: bytes=(\d+)-(\d+)", head)
                first, last = (int(m[1]), int(m[2])) if m else (0, len(DATA) - 1)
                req = Request(method, first, last, n, number)
                self.requests.append(req)
                index = len(self.requests) - 1
                number += 1
                try:
                    if self.trickle is not None and method == "GET":
                        self.trickle(c)
                    else:
                        c.sendall(self.script(req))
                except OSError:
                    return
                if index in self.close_after:
                    return

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            n, self.conns = self.conns, self.conns + 1
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Server]]:
    servers: list[Server] = []

    def start(script: Script) -> Server:
        srv = Server(script)
        srv.sock.bind(("127.0.0.1", 0))
        srv.sock.listen(16)
        threading.Thread(target=srv._accept, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.sock.close()


def head_ok(extra: str = "", version: str = "HTTP/1.1") -> bytes:
    return (f"{version} 200 OK\r\nContent-Length: {len(DATA)}\r\nETag: \"e1\"\r\n"
            f"{extra}\r\n").encode()


def ranged(req: Request, *, framing: str = "length", version: str = "HTTP/1.1",
           extra: str = "", pre: str = "") -> bytes:
    """A correct 206 for ``req`` framed as asked; HEAD gets the size."""
    if req.method == "HEAD":
        return head_ok(extra, version)
    body = DATA[req.first : req.last + 1]
    top = (f"{pre}{version} 206 Partial Content\r\nContent-Range: bytes "
           f"{req.first}-{req.last}/{len(DATA)}\r\nETag: \"e1\"\r\n{extra}")
    if framing == "length":
        return f"{top}Content-Length: {len(body)}\r\n\r\n".encode() + body
    if framing == "chunked":
        out = [f"{top}Transfer-Encoding: chunked\r\n\r\n".encode()]
        for i in range(0, len(body), 70001):               # odd chunk sizes
            piece = body[i : i + 70001]
            out.append(b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n")
        out.append(b"0\r\nX-Trailer: 1\r\n\r\n")
        return b"".join(out)
    assert framing == "close"
    return f"{top}\r\n".encode() + body


def read_all(url: str, **kw: int) -> bytes:
    with open_http(url, timeout=5, **kw) as host:
        out = bytearray()
        for off in range(0, len(DATA), 700_000):   # uneven: the cache, then the stream
            out += host.pread(off, 700_000)
        return bytes(out)


@pytest.mark.parametrize("framing, version, extra", [
    ("length", "HTTP/1.1", ""),
    ("chunked", "HTTP/1.1", ""),
    ("close", "HTTP/1.1", ""),                       # no length: the body ends at close
    ("length", "HTTP/1.1", "Connection: close\r\n"),
    ("length", "HTTP/1.0", ""),                      # 1.0 closes unless keep-alive
    ("length", "HTTP/1.0", "Connection: keep-alive\r\n"),
])
def test_every_framing_reads_the_object(serve: Callable[[Script], Server], framing: str,
                                        version: str, extra: str) -> None:
    srv = serve(lambda r: ranged(r, framing=framing, version=version, extra=extra))
    closes = framing == "close" or "close" in extra or (version == "HTTP/1.0" and
                                                        "keep-alive" not in extra)
    assert read_all(srv.url, workers=1) == DATA
    gets = [r for r in srv.requests if r.method == "GET"]
    if closes:   # a new connection for every GET (the server leaves its side open)
        assert srv.conns == len(gets) + (framing != "close")
    else:     # keep-alive: one connection for the cache path's requests, one streams
        assert srv.conns == 2 and len([r for r in gets if r.conn == 0]) >= 2
        assert [(r.first, r.conn) for r in gets if r.conn] == [(2_100_000, 1)]


@pytest.mark.parametrize("extra, conns", [(5, 1), (100_000, 2)])
def test_interim_heads_and_a_body_past_the_range(serve: Callable[[Script], Server],
                                                 extra: int, conns: int) -> None:
    """1xx heads are skipped; a 206 whose body runs past the range gives the range; the
    rest of the body is read and dropped when short (the connection stays in step),
    else the connection is closed (never read as the next response)."""
    def script(r: Request) -> bytes:
        if r.method == "HEAD":
            return head_ok()
        body = DATA[r.first : r.last + 1]
        return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial\r\nContent-Range: "
                b"bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n"
                % (r.first, r.last, len(DATA), len(body) + extra) + body + b"x" * extra)

    srv = serve(script)
    with open_http(srv.url, timeout=5, workers=1) as host:
        assert host.pread(1000, 5000) == DATA[1000:6000]
        assert host.pread(2 << 20, 5000) == DATA[2 << 20 : (2 << 20) + 5000]
    assert srv.conns == conns


@pytest.mark.parametrize("bad, words", [
    (b"HTTP/1.1 206 OK\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n",
     "a response head longer than 65536 bytes"),
    (b"HTTP/1.1 206 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", "more than 100 header lines"),
    (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 206 OK\r\nBad Header\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-9/10\r\nContent-Length: 1\r\n"
     b"Content-Length: 2\r\n\r\n", "two different Content-Length headers"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 262144-524287/3145728\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 262144-524287/3145728\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "a line longer than 4096 bytes"),
])
def test_hostile_response_is_a_remote_error(serve: Callable[[Script], Server], bad: bytes,
                                            words: str) -> None:
    srv = serve(lambda r: head_ok() if r.method == "HEAD" else bad)
    url = srv.url
    t0 = time.monotonic()
    with open_http(url, timeout=2, workers=1) as host, pytest.raises(RemoteError) as ei:
        host.pread(300_000, 1000)
    err = ei.value
    assert words in str(err) and url in str(err) and err.url == url
    assert err.offset == 262144 and "at offset 0x40000" in str(err)
    assert time.monotonic() - t0 < 4                    # answered, not timed out


def test_stale_keepalive_connection_is_retried(serve: Callable[[Script], Server]) -> None:
    """A server that closes an idle keep-alive connection without saying so: the next
    request finds it closed and is sent again on a new connection."""
    srv = serve(lambda r: ranged(r))
    srv.close_after = {1}                               # after the first GET
    with open_http(srv.url, timeout=5, workers=1) as host:
        assert host.pread(0, 1000) == DATA[:1000]
        assert host.pread(2 << 20, 1000) == DATA[2 << 20 : (2 << 20) + 1000]
    assert srv.conns == 2          # HEAD and a GET, then a new one: the dead one retried
    assert [r.conn for r in srv.requests] == [0, 0, 1]


def test_a_large_read_is_one_get_into_the_buffer(serve: Callable[[Script], Server]
                                                 ) -> None:
    """A read of at least STREAM_MIN bytes at a new place is one GET of exactly its
    bytes, received straight into the caller's buffer (nothing cached), on the stream's
    own connection."""
    srv = serve(lambda r: ranged(r))
    with open_http(srv.url, timeout=5, workers=4) as host:
        buf = bytearray((2 << 20) + 5)
        host.preadinto(1000, memoryview(buf))
        assert bytes(buf) == DATA[1000 : 1000 + len(buf)]
        assert len(host._cache) == 0
    gets = [(r.first, r.last) for r in srv.requests if r.method == "GET"]
    assert gets == [(1000, 1000 + len(buf) - 1)]
    assert srv.conns == 2                       # the HEAD's and the stream's


MIB = 1 << 20


@pytest.mark.parametrize("window, last, want", [
    # the third read (4 KiB past where the stream stands) comes from the second GET
    (1 << 30, 2 * MIB + 4096, [(0, MIB - 1), (MIB, 3 * MIB - 1), (0, (256 << 10) - 1)]),
    # windows of 1 MiB at most: a GET per read
    (MIB, 2 * MIB, [(0, MIB - 1), (MIB, 2 * MIB - 1), (0, (256 << 10) - 1),
                    (2 * MIB, 3 * MIB - 1)]),
])
def test_sequential_reads_share_one_get(serve: Callable[[Script], Server],
                                        monkeypatch: pytest.MonkeyPatch, window: int,
                                        last: int, want: list[tuple[int, int]]) -> None:
    """Reads that follow each other are received from one GET of STREAM_WINDOW bytes (or
    to the end of the object); a small read elsewhere takes the
    cache path on another connection and leaves the stream open; a small gap is read
    past, not asked for again."""
    from diskimg.hostio import http

    monkeypatch.setattr(http, "STREAM_WINDOW", window)
    srv = serve(lambda r: ranged(r))
    with open_http(srv.url, timeout=5) as host:
        got = []
        for off, n in [(0, MIB), (MIB, MIB), (100, 50), (last, 3 * MIB - last)]:
            buf = bytearray(n)
            host.preadinto(off, memoryview(buf))
            got.append(bytes(buf) == DATA[off : off + n])
        assert got == [True] * 4
    assert [(r.first, r.last) for r in srv.requests if r.method == "GET"] == want


def test_small_sequential_reads_join_the_stream(serve: Callable[[Script], Server]
                                                ) -> None:
    """Small reads, each starting where the last ended: the first ones go through the
    block cache, from the STREAM_AFTER-th in a row on they come from one streaming GET
    (to the end of the object), with no further request."""
    srv = serve(lambda r: ranged(r))
    k = 64 << 10
    with open_http(srv.url, timeout=5) as host:
        out = b"".join(host.pread(off, k) for off in range(0, len(DATA), k))
    assert out == DATA
    assert [(r.first, r.last) for r in srv.requests if r.method == "GET"] == [
        (0, (256 << 10) - 1), (3 * k, len(DATA) - 1)]


def test_threads_share_a_host(serve: Callable[[Script], Server]) -> None:
    """Threads reading one host at once, large and small reads, sequential and not: one
    of them streams at a time, the others take the cache path; every byte is right."""
    srv = serve(lambda r: ranged(r))
    errors: list[str] = []
    with open_http(srv.url, timeout=5) as host:
        def reader(seed: int) -> None:
            for i in range(12):
                n = (MIB + 7) if (i + seed) % 3 else 50_000
                off = ((seed * 977 + i * 200_003) % (len(DATA) - n)) if seed % 2 else \
                    min(i * n, len(DATA) - n)
                if host.pread(off, n) != DATA[off : off + n]:
                    errors.append(f"thread {seed} read {i} at {off}")

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_jump_leaves_the_stream(serve: Callable[[Script], Server]) -> None:
    """A large read elsewhere than the stream stands closes its connection (most of the
    window unread) and asks for its own bytes only: no read-ahead on random reads."""
    srv = serve(lambda r: ranged(r))
    with open_http(srv.url, timeout=5) as host:
        for off in (0, MIB, 0, 2 * MIB):
            assert host.pread(off, MIB) == DATA[off : off + MIB]
    assert [(r.first, r.last) for r in srv.requests if r.method == "GET"] == [
        (0, MIB - 1), (MIB, 3 * MIB - 1), (0, MIB - 1), (2 * MIB, 3 * MIB - 1)]
    assert srv.conns == 3              # the HEAD's; the stream's, then a new one after the jump


def test_a_stream_dropped_mid_body_resumes_where_it_broke(
        serve: Callable[[Script], Server]) -> None:
    """The bytes received before a drop stay (they came in order from a checked 206);
    the one retry asks for the rest only, with If-Match; a second drop is a
    RemoteError naming the offset where the retry started."""
    half = 700_000

    def cut(r: Request) -> bytes:
        whole = ranged(r)
        return whole[: whole.index(b"\r\n\r\n") + 4 + half] if r.method == "GET" else whole

    srv = serve(lambda r: ranged(r))
    srv.close_after = {1}                       # the first GET: cut, then closed
    first = [True]

    def once(r: Request) -> bytes:
        if r.method == "GET" and first:
            first.clear()
            return cut(r)
        return ranged(r)

    srv.script = once
    with open_http(srv.url, timeout=5) as host:
        assert host.pread(10, 2 * MIB) == DATA[10 : 10 + 2 * MIB]
    assert [(r.first, r.last) for r in srv.requests if r.method == "GET"] == [
        (10, 10 + 2 * MIB - 1), (10 + half, 10 + 2 * MIB - 1)]

    always = serve(cut)
    always.close_after = set(range(1, 10))
    with open_http(always.url, timeout=5) as host, pytest.raises(RemoteError) as ei:
        host.pread(10, 2 * MIB)
    assert ei.value.offset == 10 + half and "connection dropped twice" in str(ei.value)
    assert always.url in str(ei.value) and f"at offset {10 + half:#x}" in str(ei.value)


def test_a_change_seen_elsewhere_ends_the_stream(serve: Callable[[Script], Server]
                                                 ) -> None:
    """The object changes while the stream's GET is open: the next request (a small read
    on the cache path) sees the new ETag, and from then on the stream's bytes are
    refused too -- never a mix of the two versions."""
    def script(r: Request) -> bytes:
        out = ranged(r)
        return out.replace(b'"e1"', b'"e2"') if len(srv.requests) > 3 else out

    srv = serve(script)
    with open_http(srv.url, timeout=5) as host:
        assert host.pread(0, MIB) == DATA[:MIB]
        assert host.pread(MIB, MIB) == DATA[MIB : 2 * MIB]    # GET 2: to the end
        with pytest.raises(RemoteError, match="changed since it was opened") as ei:
            host.pread(100, 50)
        assert ei.value.offset == 0
        with pytest.raises(RemoteError, match="changed since it was opened") as ei:
            host.pread(2 * MIB, MIB)                           # would come from GET 2
        assert ei.value.offset == 2 * MIB and srv.url in str(ei.value)
    assert len([r for r in srv.requests if r.method == "GET"]) == 3


@pytest.mark.parametrize("framing, version, extra", [
    ("chunked", "HTTP/1.1", ""),
    ("close", "HTTP/1.1", ""),
    ("length", "HTTP/1.0", ""),
])
def test_streamed_reads_in_every_framing(serve: Callable[[Script], Server], framing: str,
                                         version: str, extra: str) -> None:
    srv = serve(lambda r: ranged(r, framing=framing, version=version, extra=extra))
    with open_http(srv.url, timeout=5) as host:
        out = bytearray()
        for off in range(0, len(DATA), 1_100_000):
            out += host.pread(off, 1_100_000)
    assert bytes(out) == DATA


def test_reading_a_closed_connection_is_a_protocol_error() -> None:
    """Never an assertion or a None dereference: the callers turn ProtocolError into a
    dropped connection (retried once, then a RemoteError)."""
    from diskimg.hostio.httpwire import Connection, ProtocolError, Response

    conn = Connection("http", "127.0.0.1", 9, 1.0)
    resp = Response("HTTP/1.1", 206, "Partial", {"content-length": "10"})
    with pytest.raises(ProtocolError, match="closed"):
        conn.readinto(resp, memoryview(bytearray(4)))
    chunked = Response("HTTP/1.1", 206, "Partial", {"transfer-encoding": "chunked"})
    with pytest.raises(ProtocolError, match="closed"):
        conn.readinto(chunked, memoryview(bytearray(4)))


def test_a_trickled_head_times_out(serve: Callable[[Script], Server]) -> None:
    """A server that sends its head a byte at a time, each within the timeout, cannot
    hold a read past it: the whole head must arrive within the timeout."""
    trickle = b"HTTP/1.1 206 Partial Content\r\nX-Slow: " + b"a" * 200

    def slow(c: socket.socket) -> None:
        for i in range(len(trickle)):
            time.sleep(0.02)
            c.sendall(trickle[i : i + 1])

    srv = serve(lambda r: head_ok() if r.method == "HEAD" else b"")
    srv.trickle = slow
    t0 = time.monotonic()
    with open_http(srv.url, timeout=1, workers=1) as host, \
            pytest.raises(RemoteError, match=r"timed out after 1 s") as ei:
        host.pread(0, 10)
    assert ei.value.offset == 0
    assert time.monotonic() - t0 < 2.5           # one timeout: a timeout is not retried
