"""HTTP servers for the tests of images anywhere, started by the test suite.

- ``nginx``: a real nginx (Debian ``nginx-light``) on a free port of 127.0.0.1, serving a
  temporary directory (``nginx.root``) with Range support, from a temporary config
  (``daemon off``, pid, logs and temp dirs under the same directory); a few locations
  redirect (``/r/NAME`` -> ``/NAME``, ``/away/NAME`` -> the same server named
  ``localhost``: another host).  Stopped at the end of the session.
- ``faulty``: a stdlib ThreadingHTTPServer for the faults nginx cannot be made to produce:
  ``faulty.serve(data, fault)`` returns a URL whose server misbehaves in the named way
  (see ``FAULTS``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start listening within 10 s")


@dataclass
class Nginx:
    root: Path
    port: int
    #: https on another port with a self-signed certificate for 127.0.0.1 (``cafile``
    #: trusts it); 0 without the openssl command
    https_port: int = 0
    cafile: Path | None = None

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"

    def https_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.https_port}/{name}"


def _self_signed(base: Path) -> tuple[Path, Path] | None:
    """A certificate and key for 127.0.0.1, or None without the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return cert, key


@contextlib.contextmanager
def nginx_server(base: Path) -> Iterator[Nginx]:
    """nginx serving ``base/www`` on a free port of 127.0.0.1 until the block ends (also
    used by benchmarks/bench_http.py)."""
    if NGINX is None:
        raise FileNotFoundError("nginx not installed (Debian package nginx-light)")
    root = base / "www"
    root.mkdir()
    port = _free_port()
    tls = _self_signed(base)
    https_port = _free_port() if tls else 0
    https = "" if tls is None else f"""
    server {{
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {tls[0]};
        ssl_certificate_key {tls[1]};
        root {root};
    }}"""
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = base / "nginx.conf"
    conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    default_type application/octet-stream;
    keepalive_requests 10000;
    sendfile on;  # as Debian's /etc/nginx/nginx.conf
    server {{
        listen 127.0.0.1:{port};
        server_name 127.0.0.1;
        root {root};
        location /r/ {{ rewrite ^/r/(.*)$ /$1 redirect; }}
        location /away/ {{ rewrite ^/away/(.*)$ http://localhost:{port}/$1 redirect; }}
        location /ftp/ {{ return 302 ftp://127.0.0.1/x; }}
        location /loop/ {{ rewrite ^/loop/(.*)$ /loop/$1 redirect; }}
    }}{https}
}}
""")
    log = base / "error.log"
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(base), "-e", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, log)
        yield Nginx(root, port, https_port, tls[0] if tls else None)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if NGINX is None:
        pytest.skip("nginx not installed (Debian package nginx-light)")
    with nginx_server(tmp_path_factory.mktemp("nginx")) as server:
        yield server


#: what ``faulty.serve(data, fault)`` makes the server do on every ranged GET
FAULTS = (
    "none",      # behave (Range, ETag, keep-alive)
    "drop",      # send the headers and half the body, then close the connection
    "drop1",     # drop the first ranged GET only (a retry succeeds)
    "short",     # 206 with fewer bytes than asked, Content-Range saying so
    "wrong",     # 206 with the right length but a Content-Range one byte off
    "ignore",    # 200 with the whole object, as a server without Range support
    "404", "403", "500",
    "slow",      # sleep longer than any test timeout before answering a GET
    "stall",     # send the headers and half the body, then sleep as "slow" does
    "gzip",      # a 206 whose body says Content-Encoding: gzip
    "etag",      # a new ETag (and content) after the first ranged GET
    "nohead",    # HEAD answers 405: the size comes from a ranged GET
)


@dataclass
class _Object:
    data: bytes
    fault: str
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _obj(self) -> _Object | None:
        obj = self.server.objects.get(self.path)
        if obj is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        return obj

    def _etag(self, obj: _Object) -> str:
        return '"v2"' if obj.fault == "etag" and obj.gets else '"v1"'

    def do_HEAD(self) -> None:
        obj = self._obj()
        if obj is None:
            return
        if obj.fault in ("404", "403", "500"):
            self.send_response(int(obj.fault))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if obj.fault == "nohead":
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(obj.data)))
        self.send_header("ETag", self._etag(obj))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        obj = self._obj()
        if obj is None:
            return
        with obj.lock:
            obj.gets += 1
            n = obj.gets
        fault, data = obj.fault, obj.data
        if fault in ("404", "403", "500"):
            body = f"fault {fault}\n".encode()
            self.send_response(int(fault))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if fault == "slow":
            time.sleep(self.server.slow)
        rng = self.headers.get("Range", "")
        if fault == "ignore" or not rng.startswith("bytes="):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:
                pass
            return
        a, _, b = rng[6:].partition("-")
        first, last = int(a), min(int(b), len(data) - 1)
        if fault == "etag":
            data = bytes(x ^ 0xFF for x in data[: last + 1])
        body = data[first : last + 1]
        if fault == "short":
            body = body[: max(1, len(body) // 2)]
            last = first + len(body) - 1
        self.send_response(206)
        shown = (first + 1, last + 1) if fault == "wrong" else (first, last)
        self.send_header("Content-Range", f"bytes {shown[0]}-{shown[1]}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", self._etag(obj))
        if fault == "gzip":
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if fault == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(self.server.slow)
            self.close_connection = True
            return
        if fault == "drop" or (fault == "drop1" and n == 1):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    objects: dict[str, _Object]
    slow: float


@dataclass
class Faulty:
    server: _FaultServer

    def serve(self, data: bytes, fault: str = "none") -> str:
        """A URL whose object holds ``data`` and whose server shows ``fault`` on every
        GET (``drop1``: the first only); HEAD behaves but for the HTTP statuses and
        ``nohead``."""
        assert fault in FAULTS, fault
        path = f"/{fault}/{len(self.server.objects)}.img"
        self.server.objects[path] = _Object(data, fault)
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture(scope="session")
def faulty() -> Iterator[Faulty]:
    srv = _FaultServer(("127.0.0.1", 0), _Handler)
    srv.objects = {}
    srv.slow = 3.0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield Faulty(srv)
    finally:
        srv.shutdown()
        srv.server_close()


#: the virtual size of every image of ``image_set`` (the last cluster is partial)
IMAGE_SIZE = 4 * 1024 * 1024 + 1536


@pytest.fixture(scope="session")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind of image, made once by qemu in a directory of its own: ``qcow2`` (data,
    a zeroed run, a partial last cluster), and converted from it ``qcow2-compressed``,
    ``vmdk-stream``, ``vmdk-sparse`` and ``raw``.  The HTTP tests serve them from nginx's
    root, the S3 tests upload them: the same bytes behind every server."""
    from qemukit import QEMU

    if not QEMU.qemu_img or not os.path.exists(QEMU.qemu_img):
        pytest.skip("qemu-img not installed")
    root = tmp_path_factory.mktemp("image-set")
    base = root / "img.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, IMAGE_SIZE)
    QEMU.io(base, "write -P 0x11 0 64k", "write -P 0x22 1000k 300k", "write -z 2M 64k",
            "write -P 0x33 3M 4k", f"write -P 0x44 {IMAGE_SIZE - 1536} 1536")
    out = {"qcow2": base}
    for name, args in (("qcow2-compressed", ["-c", "-O", "qcow2"]),
                       ("vmdk-stream", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
                       ("vmdk-sparse", ["-O", "vmdk", "-o", "subformat=monolithicSparse"]),
                       ("raw", ["-O", "raw"])):
        dst = root / f"img-{name}"
        QEMU.img("convert", *args, base, dst)
        out[name] = dst
    return out
