"""A moto S3 server for the tests of images in object storage (as s3fs's own tests do):
``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1, in this process.

``s3_server()`` yields an :class:`S3` with the endpoint and the ``storage_options``
(endpoint, fake key and secret) every s3fs filesystem of the tests uses; ``S3.fs()`` is
such a filesystem; ``S3.deny_all()`` turns moto's credential checks on for a block (so a
bad key gets HTTP 403).  Also used by examples/dask_fleet.py's test.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET = "images"


def map_tuples(dev: Any) -> list[tuple[int, int, int, bool, bool]]:
    """``dev.map()`` as tuples (start, length, depth, zero, data): what the tests compare
    between an image read from the store and the same file read locally."""
    return [(e.start, e.length, e.depth, e.zero, e.data) for e in dev.map()]


def assert_reads_as_local(url: str, local: Path, size: int, *,
                          storage_options: dict[str, Any] | None = None) -> None:
    """The image at ``url`` read as the local file ``local`` (of ``size`` guest bytes,
    the last cluster partial): offset 0 and the last 1536 bytes from cold opens, then
    every byte and the map (an object store's raw object shows no holes: all data)."""
    import hashlib

    import diskimg
    from qemukit import QEMU

    expect = QEMU.raw_bytes(local)
    kw: dict[str, Any] = {"storage_options": storage_options} if storage_options else {}
    with diskimg.open(url, **kw) as dev:
        assert dev.read(0, 512) == expect[:512]
    with diskimg.open(url, **kw) as dev:
        assert dev.read(size - 1536, 1536) == expect[size - 1536:]
    with diskimg.open(url, **kw) as dev, diskimg.open(local) as ldev:
        assert dev.size == len(expect) == size
        assert hashlib.sha256(dev.read(0, dev.size)).digest() == \
            hashlib.sha256(expect).digest()
        if ldev.format == "raw":
            assert map_tuples(dev) == [(0, size, 0, False, True)]
        else:
            assert map_tuples(dev) == map_tuples(ldev)
        assert dev.format == ldev.format and dev.filename == url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3:
    endpoint: str
    bucket: str = BUCKET
    storage_options: dict[str, Any] = field(default_factory=dict)

    def fs(self, **extra: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**{**self.storage_options, **extra})

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_all(self, paths: Iterable[Path], prefix: str) -> None:
        """Upload each file in ``paths`` as ``prefix/NAME`` (the tests' image sets)."""
        fs = self.fs()
        for p in paths:
            fs.put_file(str(p), self.url(f"{prefix}/{p.name}"))

    @contextlib.contextmanager
    def deny_all(self) -> Iterator[None]:
        """moto's IAM checks on until the block ends: unknown keys get 403."""
        from moto import settings  # the server runs in this process

        before = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def _reset(endpoint: str) -> None:
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/moto-api/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """A moto S3 server with an empty bucket ``images`` until the block ends."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = S3(endpoint, storage_options={
            "endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "skip_instance_cache": True})
        _reset(endpoint)        # moto's state is per process: no bucket of an earlier server
        s3.fs().mkdir(BUCKET)
        yield s3
    finally:
        server.stop()
