"""Fixtures for the NBD tests: ``diskimg nbd`` and ``qemu-nbd`` serving an image on a Unix
socket in a short temporary directory (socket paths are limited to 108 bytes), always
stopped when the test ends (tests/qemukit.py ``serving``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from qemukit import serving

from tests.nbd.nbdtestlib import Serve


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="nbdt")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def diskimg_nbd(sockdir: Path) -> Serve:
    """``with diskimg_nbd(path, *args, fmt="qcow2") as sock:``: ``diskimg nbd -t ARGS``
    serving ``path`` on a fresh socket while the block runs."""
    count = [0]

    @contextmanager
    def serve(path: object, *args: str, fmt: str | None = "qcow2",
              persistent: bool = True) -> Iterator[str]:
        count[0] += 1
        sock = str(sockdir / f"d{count[0]}.sock")
        argv = [sys.executable, "-m", "diskimg", "nbd", *(["-t"] if persistent else []),
                *args, *(["-f", fmt] if fmt else []), "-k", sock, str(path)]
        with serving(argv, sock):
            yield sock

    return serve


@pytest.fixture
def qemu_nbd(sockdir: Path) -> Serve:
    """The same for ``qemu-nbd -t`` (the oracle)."""
    from qemukit import QEMU

    count = [0]

    @contextmanager
    def serve(path: object, *args: str, fmt: str | None = "qcow2") -> Iterator[str]:
        count[0] += 1
        sock = str(sockdir / f"q{count[0]}.sock")
        with QEMU.nbd(str(path), *args, fmt=fmt, sock=sock):
            yield sock

    return serve


class Served:
    """An in-process server (the ``inproc_nbd`` fixture): its socket path, the
    :class:`~diskimg.nbd.server.Server`, and :meth:`stop` (shut it down, join its thread,
    close its image: flushed and unlocked)."""

    def __init__(self, sock: str, server: Any, thread: Any, dev: Any) -> None:
        self.sock, self.server, self.thread, self.dev = sock, server, thread, dev

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        self.dev.close()


@pytest.fixture
def inproc_nbd(sockdir: Path) -> Iterator[Callable[..., Served]]:
    """``start(path, fmt="raw", shared=4, handshake_timeout=10, read_only=False,
    **export_kw)``: a :class:`diskimg.nbd.server.Server` on a thread of the test process,
    serving ``path`` persistently (a :class:`Served`).  Every server started is stopped
    when the test ends."""
    import threading

    import diskimg
    from diskimg.nbd.export import Export
    from diskimg.nbd.server import Server, listen_unix

    running: list[Served] = []

    def start(path: object, fmt: str = "raw", *, shared: int = 4,
              handshake_timeout: float = 10.0, read_only: bool = False,
              **export_kw: Any) -> Served:
        sock = str(sockdir / f"i{len(running)}.sock")
        dev = diskimg.open(str(path), "r" if read_only else "r+", fmt)
        srv = Server(Export(dev, shared=shared, **export_kw), listen_unix(sock),
                     persistent=True, handshake_timeout=handshake_timeout)
        t = threading.Thread(target=srv.serve, daemon=True)
        t.start()
        served = Served(sock, srv, t, dev)
        running.append(served)
        return served

    try:
        yield start
    finally:
        for served in running:
            served.stop()


#: a P-256 key: made in milliseconds (an RSA key takes seconds on a loaded machine)
KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, named as QEMU's
    tls-creds-x509 and libnbd's ``tls-certificates`` directory expect.  Shared by the TLS
    tests of the server and of the client."""
    if not shutil.which("openssl"):
        pytest.skip("openssl absent")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", *KEY, "-keyout", d / "ca-key.pem",
             "-out", d / "ca-cert.pem", "-days", "2", "-subj", "/CN=diskimg test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, usage, san in (("server", "serverAuth", "subjectAltName=DNS:localhost\n"),
                            ("client", "clientAuth", "")):
        _openssl("req", *KEY, "-keyout", d / f"{who}-key.pem",
                 "-out", d / f"{who}.csr", "-subj", f"/CN={who}")
        ext = d / f"{who}.ext"
        ext.write_text(f"{san}extendedKeyUsage={usage}\n"
                       "keyUsage=digitalSignature,keyEncipherment\n")
        _openssl("x509", "-req", "-in", d / f"{who}.csr", "-CA", d / "ca-cert.pem",
                 "-CAkey", d / "ca-key.pem", "-CAcreateserial", "-out",
                 d / f"{who}-cert.pem", "-days", "2", "-extfile", ext)
    return d
