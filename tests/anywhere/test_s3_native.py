"""diskimg's own S3 client (no botocore/s3fs at run time) against the moto S3 server of
the tests (tests/anywhere/s3_server.py): qemu-made images read through it equal the local
file byte for byte and map for map (qcow2 with its backing file in the same bucket,
vmdk, raw; offset 0 and the last partial cluster from cold opens); the CLI's info, map,
check, compare and convert from s3:// with credentials from the environment equal their
output on the local file; ``convert -O raw|qcow2|vmdk`` into s3:// is streamed, read back
and clean under ``qemu-img check`` and ``qemu-img compare``.  fsspec is made unusable in
the process (every native test would fail if it fell back to it); s3fs is only the
tests' own tool to upload and download."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from anywhere.s3_server import S3, assert_reads_as_local, s3_server  # noqa: E402
from anywhere.s3_server import map_tuples as _map  # noqa: E402

import diskimg  # noqa: E402
from diskimg.hostio.http import HttpHost  # noqa: E402
from diskimg.hostio.url_sink import open_url_sink  # noqa: E402
from diskimg.hostio.urls import open_url  # noqa: E402
from diskimg.policy import OpenPolicy  # noqa: E402

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]
SIZE = 4 * 1024 * 1024 + 1536          # the image set's size: the last cluster is partial
IMAGES = ("qcow2", "qcow2-compressed", "vmdk-stream", "vmdk-sparse", "raw")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def native(s3: S3, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The storage_options of the native client; fsspec cannot be reached meanwhile."""
    import diskimg.hostio.remote as remote

    def no_fsspec(*a: Any, **k: Any) -> Any:
        raise AssertionError("fsspec was used")

    monkeypatch.setattr(remote, "_filesystem", no_fsspec)
    return {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def images(s3: S3, image_set: dict[str, Path]) -> dict[str, Path]:
    s3.put_all(image_set.values(), "nat")
    return image_set


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose fsspec, s3fs and botocore packages refuse to import: a CLI run
    with it first on its path fails if it leaves the native client."""
    d = tmp_path_factory.mktemp("blocked")
    for name in ("fsspec", "s3fs", "botocore", "aiobotocore"):
        (d / name).mkdir()
        (d / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    return d


def _env(s3: S3, blocked: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    path = str(REPO / "src") if blocked is None else f"{blocked}{os.pathsep}{REPO / 'src'}"
    return {**env, "PYTHONPATH": path, "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def _cli(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)
         ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                         text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode in ok, f"diskimg {args} exited {res.returncode}: {res.stderr}"
    return res


def test_the_native_client_opens_it(images: dict[str, Path], native: dict[str, Any],
                                    s3: S3) -> None:
    url = s3.url("nat/img-raw")
    host = open_url(url, OpenPolicy(), False, native)
    try:
        assert isinstance(host, HttpHost) and host.url == url
        assert host.size() == SIZE
    finally:
        host.close()


@pytest.mark.parametrize("kind", IMAGES)
def test_every_byte_and_map_as_local(s3: S3, images: dict[str, Path],
                                     native: dict[str, Any], kind: str) -> None:
    local = images[kind]
    assert_reads_as_local(s3.url(f"nat/{local.name}"), local, SIZE, storage_options=native)


def test_backing_in_the_same_bucket(s3: S3, native: dict[str, Any], tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "3M")
    QEMU.io(base, "write -P 0x61 0 1M", "write -P 0x62 2M 512k")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    QEMU.io(top, "write -P 0x71 512k 1M")
    fs = s3.fs()
    for p in (base, top):
        fs.put_file(str(p), s3.url(f"chain/{p.name}"))
    expect = QEMU.raw_bytes(top)
    with diskimg.open(s3.url("chain/top.qcow2"), storage_options=native) as dev, \
            diskimg.open(top) as ldev:
        assert dev.read(0, dev.size) == expect
        assert _map(dev) == _map(ldev)
        assert dev.backing is not None and dev.backing.filename == s3.url("chain/base.qcow2")


@pytest.mark.parametrize("cmd", ["info", "map", "check", "compare"])
def test_cli_reads_as_local(s3: S3, images: dict[str, Path], blocked: Path,
                            cmd: str) -> None:
    """Endpoint and credentials from the environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID ...); the output equals the local file's."""
    local = images["qcow2"]
    url = s3.url(f"nat/{local.name}")
    argv = {"info": ["info", "--output=json"], "map": ["map", "--output=json"],
            "check": ["check"], "compare": ["compare"]}[cmd]
    more = [str(images["raw"])] if cmd == "compare" else []
    got = _cli(_env(s3, blocked), *argv, url, *more).stdout.replace(url, "NAME")
    want = _cli(_env(s3), *argv, str(local), *more).stdout.replace(str(local), "NAME")
    keep = [line for line in got.splitlines() if "actual-size" not in line]
    assert keep == [line for line in want.splitlines() if "actual-size" not in line]
    if cmd == "compare":
        assert "Images are identical." in got


def test_cli_convert_from_s3(s3: S3, images: dict[str, Path], blocked: Path,
                            tmp_path: Path) -> None:
    local = images["vmdk-stream"]
    out = tmp_path / "out.qcow2"
    _cli(_env(s3, blocked), "convert", "-O", "qcow2", s3.url(f"nat/{local.name}"), str(out))
    assert QEMU.compare(local, out) == 0
    QEMU.check_clean(out)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 13 MiB + 1536: 6 MiB of random data (more than one 5 MiB part in every
    format), a pattern, a zeroed run, a hole, a partial last cluster."""
    d = tmp_path_factory.mktemp("nat-src")
    size = (13 << 20) + 1536
    noise, p = d / "noise.raw", d / "src.qcow2"
    with noise.open("wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(6 << 20))
    QEMU.img("convert", "-O", "qcow2", noise, p)
    QEMU.io(p, "write -P 0xab 8M 2M", "write -z 10M 256k", f"write -P 0x5c {size - 1536} 1536")
    return p


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_cli_convert_into_s3(s3: S3, src: Path, blocked: Path, tmp_path: Path,
                            fmt: str) -> None:
    url = s3.url(f"out/src.{fmt}")
    opts = ["-o", "subformat=streamOptimized"] if fmt == "vmdk" else []
    res = _cli(_env(s3, blocked), "convert", "-O", fmt, *opts, str(src), url)
    assert res.stdout == res.stderr == ""
    got = tmp_path / f"got.{fmt}"
    got.write_bytes(s3.fs().cat_file(url))
    assert QEMU.compare(src, got, "-F", fmt) == 0
    if fmt != "raw":
        QEMU.check_clean(got)
    pending = s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket).get("Uploads", [])
    assert pending == []


def test_small_output_is_one_put(s3: S3, native: dict[str, Any], tmp_path: Path) -> None:
    data = os.urandom(70_000)
    url = s3.url("out/small.bin")
    with open_url_sink(url, native, size_hint=len(data)) as sink:
        sink.write(data[:1000])
        sink.write(data[1000:])
    assert s3.fs().cat_file(url) == data
    with open_url_sink(s3.url("out/empty.bin"), native, size_hint=0):
        pass
    assert s3.fs().cat_file(s3.url("out/empty.bin")) == b""
