"""S3 faults (issue 18 item 5), on reads and on the bucket sink: a fault proxy started by
the test sits between s3fs and the moto S3 server (tests/anywhere/s3_server.py) and, for
the requests a rule names, answers 500, 403 or 404, stalls longer than the client's
timeout, or drops the connection mid-transfer.

Every fault ends in a DiskImgError naming the URL and the offset, within the client's
timeouts (no hang); a fault that happens once is retried only where a retry is safe (a
ranged GET pinned to the object's ETag, a part upload: a part number names its bytes)
and then gives the right bytes; a failed upload leaves no object and no pending upload.

s3fs retries a timed-out or dropped request itself (5 times by default); the tests lower
that to 1 (``S3FileSystem.retries``) and pass botocore a 1 s read timeout and 2 attempts
(``storage_options["config_kwargs"]``) to bound their run time.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from anywhere.s3_server import S3, s3_server  # noqa: E402

import diskimg  # noqa: E402
from diskimg.errors import DiskImgError, RemoteError, UsageError  # noqa: E402
from diskimg.hostio.remote import DEFAULT_TIMEOUT, open_fsspec  # noqa: E402
from diskimg.hostio.sink import SinkError  # noqa: E402

TIMEOUT = 1.0            # botocore's read timeout in these tests (s)
STALL = 2.5              # how long a "slow" answer takes: longer than TIMEOUT
HANG = 12.0              # how long a "stall" takes: longer than any timeout of a test
SIZE = 12 << 20          # two full 5 MiB parts and a last one
ERRORS = {"500": ("InternalError", "We encountered an internal error"),
          "403": ("AccessDenied", "Access Denied"),
          "404": ("NoSuchKey", "The specified key does not exist.")}


@dataclass
class Rule:
    """Which requests fail, and how: ``fault`` is 500, 403, 404, ``slow`` (no answer for
    STALL s, then the connection closes), ``stall`` (the same for HANG s) or ``drop``;
    ``method`` and ``query`` (a substring of the query string: ``partNumber=`` is a part
    upload, ``uploads`` creates a multipart upload) select; ``ranged``: GETs with a Range
    header only; ``times``: how many matching requests fail (then they pass)."""

    fault: str
    method: str
    query: str = ""
    ranged: bool = False
    times: int = 1 << 30
    hits: int = 0

    def matches(self, method: str, path: str, headers: Any) -> bool:
        _, _, q = path.partition("?")
        return (self.hits < self.times and method == self.method and self.query in q
                and (not self.ranged or "Range" in headers))


@dataclass
class Proxy:
    server: ThreadingHTTPServer
    upstream: int
    rules: list[Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def rule(self, method: str, path: str, headers: Any) -> Rule | None:
        with self.lock:
            for r in self.rules:
                if r.matches(method, path, headers):
                    r.hits += 1
                    return r
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if not n:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, code: str) -> None:
        name, msg = ERRORS[code]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{name}</Code>'
                f"<Message>{msg}</Message><RequestId>fault</RequestId></Error>").encode()
        self.send_response(int(code))
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _any(self) -> None:
        proxy: Proxy = self.server.proxy
        body = self._body()
        rule = proxy.rule(self.command, self.path, self.headers)
        if rule is not None and rule.fault in ERRORS:
            self._error(rule.fault)
            return
        if rule is not None and rule.fault in ("slow", "stall"):
            time.sleep(STALL if rule.fault == "slow" else HANG)
            self._drop()
            return
        if rule is not None and rule.fault == "drop" and self.command != "GET":
            self._drop()           # the request was sent; no answer comes
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("expect", "connection", "transfer-encoding")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
        try:
            up.request(self.command, self.path, body=body or None, headers=headers)
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "server", "date") and \
                    (k.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(k, v)
        if self.command == "HEAD":     # the object's length, no body
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if rule is not None and rule.fault == "drop":     # half the body, then gone
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(s3: S3) -> Iterator[Proxy]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    p = Proxy(srv, int(s3.endpoint.rsplit(":", 1)[1]))
    srv.proxy = p  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield p
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def faults(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The proxy with no rules; s3fs's own retries lowered to 1 for the test."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    proxy.rules.clear()
    yield proxy
    proxy.rules.clear()


def _options(s3: S3, proxy: Proxy, attempts: int = 1) -> dict[str, Any]:
    """The proxy's endpoint, a short read timeout, and ``attempts`` tries per request
    (botocore retries HTTP 5xx and dropped connections)."""
    return {**s3.storage_options, "endpoint_url": proxy.endpoint,
            "config_kwargs": {"read_timeout": TIMEOUT, "connect_timeout": TIMEOUT,
                              "retries": {"max_attempts": attempts, "mode": "standard"}}}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw image of SIZE bytes: a different pattern in every MiB."""
    p = tmp_path_factory.mktemp("faults") / "src.raw"
    p.write_bytes(b"".join(bytes([i + 1]) * (1 << 20) for i in range(SIZE >> 20)))
    return p


@pytest.fixture(scope="module")
def uploaded(s3: S3, src: Path) -> str:
    url = s3.url("faults/src.raw")
    s3.fs().put_file(str(src), url)
    return url


def _pending(s3: S3) -> list[Any]:
    out = s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket)
    return list(out.get("Uploads", []))


def _timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


# --- reads ------------------------------------------------------------------------------

READ_FAULTS = [("500", 500), ("403", 403), ("404", 404), ("drop", None), ("slow", None)]


@pytest.mark.parametrize(("fault", "status"), READ_FAULTS)
def test_read_fault_names_url_and_offset(s3: S3, faults: Proxy, src: Path, uploaded: str,
                                         fault: str, status: int | None) -> None:
    """Every ranged GET fails: the read ends in a RemoteError naming the URL and the
    offset read, in bounded time; the open (a HEAD) went through."""
    with open_fsspec(uploaded, storage_options=_options(s3, faults),
                     block_size=1 << 20) as host:
        faults.rules.append(Rule(fault, "GET", ranged=True))
        at = 5 << 20
        err: list[BaseException] = []

        def read() -> None:
            with pytest.raises(RemoteError) as ei:
                host.pread(at, 4096)
            err.append(ei.value)

        took = _timed(read)
    e = err[0]
    assert isinstance(e, DiskImgError) and e.url == uploaded and e.offset == at
    assert uploaded in str(e) and f"{at:#x}" in str(e), str(e)
    if status in (403, 404):
        assert e.status == status and f"({status})" in str(e), str(e)
    elif status == 500:            # s3fs keeps the server's message, not the status
        assert "internal error" in str(e), str(e)
    assert took < 4 * STALL, took


@pytest.mark.parametrize("fault", ["drop"])
def test_read_fault_once_is_retried_to_the_right_bytes(s3: S3, faults: Proxy, src: Path,
                                                       uploaded: str, fault: str,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A GET that fails once is asked again (the object is pinned by its ETag): the
    bytes read are the object's."""
    want = src.read_bytes()
    faults.rules.append(Rule(fault, "GET", ranged=True, times=1))
    if fault == "drop":    # a body cut short is retried by s3fs (not botocore)
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    with diskimg.open(uploaded, storage_options=_options(s3, faults, 2)) as dev:
        assert hashlib.sha256(dev.read(0, dev.size)).digest() == hashlib.sha256(want).digest()
    assert faults.rules[0].hits == 1


def _patient(s3: S3, proxy: Proxy) -> dict[str, Any]:
    """The proxy's endpoint with botocore's own read timeout far above the stall: only
    diskimg's deadline can end a stalled read in time."""
    return {**s3.storage_options, "endpoint_url": proxy.endpoint,
            "config_kwargs": {"read_timeout": 60, "connect_timeout": 60,
                              "retries": {"max_attempts": 1}}}


def test_stalled_read_ends_at_diskimg_timeout(s3: S3, faults: Proxy, uploaded: str) -> None:
    """The store stops answering a ranged GET (for longer than the test may wait) while
    its client would wait 60 s: the read ends after ``x-timeout`` (2 s: the open, s3fs's
    first request, must fit in it on a loaded machine) in a RemoteError
    naming the URL and the offset; later reads fail at once (the stalled request still
    holds the file object), and closing does not wait for it.  The default is 30 s."""
    with open_fsspec(uploaded, storage_options=s3.storage_options) as host:
        assert host.timeout == DEFAULT_TIMEOUT == 30
    opts = {**_patient(s3, faults), "x-timeout": 2}
    at = 5 << 20
    with open_fsspec(uploaded, storage_options=opts, block_size=1 << 20) as host:
        faults.rules.append(Rule("stall", "GET", ranged=True))
        t = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            host.pread(at, 4096)
        took = time.monotonic() - t
        e = ei.value
        assert isinstance(e, DiskImgError) and e.url == uploaded and e.offset == at
        assert f"Could not read '{uploaded}' at offset {at:#x}: timed out after 2 s" == \
            str(e), str(e)
        assert took < HANG / 3, took
        with pytest.raises(RemoteError, match="an earlier request timed out after 2 s"):
            host.pread(0, 512)
        t = time.monotonic()
    assert time.monotonic() - t < 1.0                     # close did not wait either


def test_stalled_open_ends_at_diskimg_timeout(s3: S3, faults: Proxy, uploaded: str) -> None:
    """``diskimg.open`` of a store that stalls (its first read, the image header): a
    DiskImgError naming the URL and offset 0 after ``x-timeout``, no hang."""
    faults.rules.append(Rule("stall", "GET", ranged=True))
    t = time.monotonic()
    with pytest.raises(DiskImgError) as ei:
        diskimg.open(uploaded, storage_options={**_patient(s3, faults), "x-timeout": 1.5})
    assert time.monotonic() - t < HANG / 3
    assert str(ei.value) == f"Could not read '{uploaded}' at offset 0x0: timed out after " \
        "1.5 s", str(ei.value)


def test_deadline_thread_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that runs a host's reads ends when idle (a host never closed leaves
    none behind) and starts again; a call's exception reaches the caller; a call past
    its deadline is a TimeoutError and leaves the runner stuck."""
    import threading

    from diskimg.hostio.remote import _Deadline

    monkeypatch.setattr(_Deadline, "IDLE", 0.2)
    d = _Deadline("test")
    before = threading.active_count()
    assert d.run(lambda: 42, 5) == 42
    assert threading.active_count() == before + 1
    deadline = time.monotonic() + 5
    while threading.active_count() > before:
        assert time.monotonic() < deadline, "the idle thread did not end"
        time.sleep(0.05)
    assert d.run(lambda: 43, 5) == 43
    with pytest.raises(ZeroDivisionError):
        d.run(lambda: 1 // 0, 5)
    assert not d.stuck
    with pytest.raises(TimeoutError):
        d.run(lambda: time.sleep(1), 0.1)
    assert d.stuck
    d.close()


@pytest.mark.parametrize("bad", [0, -1, "soon", None])
def test_bad_timeout_is_refused(s3: S3, uploaded: str, bad: object) -> None:
    with pytest.raises(UsageError, match="x-timeout.*must be a number of seconds"):
        open_fsspec(uploaded, storage_options={**s3.storage_options, "x-timeout": bad})


# --- the sink ---------------------------------------------------------------------------

SINK_FAULTS = [("500", "PUT", "partNumber="), ("drop", "PUT", "partNumber="),
               ("slow", "PUT", "partNumber="), ("403", "POST", "uploads"),
               ("404", "POST", "uploadId=")]


@pytest.mark.parametrize(("fault", "method", "query"), SINK_FAULTS)
def test_upload_fault_leaves_no_object(s3: S3, faults: Proxy, src: Path, fault: str,
                                       method: str, query: str) -> None:
    """A part upload that keeps failing (500, a dropped connection, a stalled server),
    a refused upload (403) or a failed completion: a SinkError naming the URL and the
    offset of the first byte not stored; no object, no pending upload."""
    url = s3.url(f"faults/out-{fault}.raw")
    faults.rules.append(Rule(fault, method, query))
    err: list[SinkError] = []

    def convert() -> None:
        with pytest.raises(SinkError) as ei:
            diskimg.convert(str(src), url, "raw", storage_options=_options(s3, faults))
        err.append(ei.value)

    took = _timed(convert)
    e = err[0]
    assert isinstance(e, DiskImgError) and url in str(e) and e.path == url
    assert f"at offset {e.offset}:" in str(e)
    if query == "uploadId=":      # every part was stored; completing it failed
        assert e.offset == SIZE and "Not found (404 NoSuchKey)" in str(e), str(e)
    else:                         # the first part (or the upload itself) failed
        assert e.offset == 0, str(e)
    if fault == "403":
        assert "Access denied (403 AccessDenied): Access Denied" in str(e), str(e)
    if fault == "500":
        assert "HTTP 500 InternalError: We encountered an internal error" in str(e), str(e)
    assert took < 4 * STALL, took
    faults.rules.clear()
    assert not s3.fs().exists(url) and _pending(s3) == []


@pytest.mark.parametrize("fault", ["500"])
def test_upload_fault_once_is_retried(s3: S3, faults: Proxy, src: Path, fault: str) -> None:
    """The second part's upload fails once: the part is sent again (safe: a part number
    names its bytes) and the object is the source, byte for byte."""
    url = s3.url(f"faults/retried-{fault}.raw")
    faults.rules.append(Rule(fault, "PUT", "partNumber=2", times=1))
    diskimg.convert(str(src), url, "raw", storage_options=_options(s3, faults, 2))
    assert faults.rules[0].hits == 1
    assert hashlib.sha256(s3.fs().cat_file(url)).digest() == \
        hashlib.sha256(src.read_bytes()).digest()
    assert _pending(s3) == []
