"""``convert`` into object storage (issue 18 item 2): ``diskimg convert ... s3://bucket/key``
and ``diskimg.convert(src, "s3://...", storage_options=...)`` stream raw, streamOptimized
vmdk and qcow2 into a multipart upload on the moto S3 server (tests/anywhere/s3_server.py)
through the same streaming writers as ``-``.  Every uploaded image is downloaded and read
back by qemu-img (compare, check); a failed or interrupted convert leaves no object (and no
pending upload), and an existing object at the key unchanged; refusals upload nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from anywhere.s3_server import S3, s3_server  # noqa: E402

import diskimg  # noqa: E402
from diskimg.errors import DiskImgError, UsageError  # noqa: E402
from diskimg.hostio.remote import MAX_PARTS, PART_SIZE, open_fsspec_sink, part_size  # noqa: E402
from diskimg.hostio.sink import SinkError  # noqa: E402

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SIZE = 16 * 1024 * 1024 + 1536          # several 5 MiB parts; the last cluster is partial


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 with 6 MiB of random (incompressible) data and 6 MiB of a pattern (two
    5 MiB parts or more in every format), a zeroed run, a hole and a partial last
    cluster."""
    d = tmp_path_factory.mktemp("sinks3")
    noise, p = d / "noise.raw", d / "src.qcow2"
    with noise.open("wb") as f:
        f.truncate(SIZE)
        f.seek(8 << 20)
        f.write(os.urandom(6 << 20))
    QEMU.img("convert", "-O", "qcow2", noise, p)
    QEMU.io(p, "write -P 0xab 0 6M", "write -P 0x11 7M 64k", "write -z 7300k 256k",
            f"write -P 0x5c {SIZE - 1536} 1536")
    return p


def _env(s3: S3) -> dict[str, str]:
    """The CLI reaches the moto server through fsspec's environment configuration."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"),
            "FSSPEC_S3_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing"}


def _download(s3: S3, url: str, dst: Path) -> Path:
    dst.write_bytes(s3.fs().cat_file(url))
    return dst


def _pending(s3: S3) -> list[Any]:
    """The bucket's multipart uploads that were neither completed nor aborted."""
    out = s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket)
    return list(out.get("Uploads", []))


def _readback(got: Path, src: Path, fmt: str) -> None:
    assert QEMU.compare(src, got, "-F", fmt) == 0
    if fmt != "raw":
        QEMU.check_clean(got)
    info = QEMU.info(got)
    assert info["format"] == fmt and info["virtual-size"] == -(-SIZE // 512) * 512


def test_cli_convert_into_a_bucket(s3: S3, src: Path, tmp_path: Path) -> None:
    url = s3.url("cli/out.qcow2")
    res = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", "qcow2",
                          str(src), url], capture_output=True, text=True, env=_env(s3),
                         stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == res.stderr == ""
    _readback(_download(s3, url, tmp_path / "got.qcow2"), src, "qcow2")
    assert _pending(s3) == []


def test_api_convert_raw_into_a_bucket(s3: S3, src: Path, tmp_path: Path) -> None:
    fmt = "raw"
    url = s3.url(f"api/out.{fmt}")
    diskimg.convert(src, url, fmt, options=_opts(fmt), storage_options=s3.storage_options)
    got = _download(s3, url, tmp_path / f"got.{fmt}")
    _readback(got, src, fmt)
    if fmt == "raw":
        assert hashlib.sha256(got.read_bytes()).digest() == \
            hashlib.sha256(QEMU.raw_bytes(src)).digest()
    assert _pending(s3) == []


def _opts(fmt: str) -> dict[str, str]:
    return {"subformat": "streamOptimized"} if fmt == "vmdk" else {}


def test_api_storage_options_and_same_bytes_as_a_pipe(s3: S3, src: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The object holds exactly the bytes ``-`` streams (one writer), given the endpoint
    and credentials as storage_options only; an s3:// source opens with them too."""
    import io

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")   # the vmdk's CID: repeatable
    opts = {"subformat": "streamOptimized"}
    url = s3.url("api/out.vmdk")
    diskimg.convert(src, url, "vmdk", options=opts, storage_options=s3.storage_options)
    piped = io.BytesIO()
    diskimg.convert(src, piped, "vmdk", options=opts)
    assert s3.fs().cat_file(url) == piped.getvalue()
    # bucket to bucket: the source is an s3:// URL opened with the same storage_options
    again = s3.url("api/again.qcow2")
    diskimg.convert(url, again, "qcow2", storage_options=s3.storage_options)
    _readback(_download(s3, again, tmp_path / "again.qcow2"), src, "qcow2")


class _Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["read-error", "interrupt"])
def test_failure_mid_upload_leaves_no_object(s3: S3, src: Path, how: str) -> None:
    """A source read error (or ^C) after two parts were uploaded: the upload is aborted,
    no multipart upload is left pending, and the key does not exist (a new key) or keeps
    every byte of the object that was there (^C over an existing key)."""
    fresh, kept = s3.url(f"fail/{how}.raw"), s3.url(f"fail/{how}-kept.raw")
    old = os.urandom(100_000)
    s3.fs().pipe(kept, old)
    for url in ((fresh,) if how == "read-error" else (kept,)):
        with diskimg.open(src) as dev:
            real = dev.readinto
            pending: list[list[Any]] = []

            def failing(offset: int, buf: Any, *a: Any, _real: Any = real,
                        _pending_then: list[list[Any]] = pending, **k: Any) -> Any:
                if offset >= 12 << 20:       # past two 5 MiB parts
                    _pending_then.append(_pending(s3))
                    if how == "interrupt":
                        raise KeyboardInterrupt
                    raise DiskImgError(f"injected read error at {offset}")
                return _real(offset, buf, *a, **k)

            dev.readinto = failing  # type: ignore[method-assign]
            exc: type[BaseException] = KeyboardInterrupt if how == "interrupt" \
                else DiskImgError
            with pytest.raises(exc):
                diskimg.convert(dev, url, "raw", storage_options=s3.storage_options)
            # the upload was under way (parts stored) when the source failed
            assert len(pending) == 1 and len(pending[0]) == 1, pending
    fs = s3.fs()
    assert not fs.exists(fresh) and (how == "read-error" or fs.cat_file(kept) == old)
    assert _pending(s3) == []


def test_existing_key_is_replaced_when_complete(s3: S3, src: Path, tmp_path: Path) -> None:
    """As qemu-img overwrites a target file, convert replaces an existing object, but only
    at the end: the old bytes stay readable while the new ones upload."""
    url = s3.url("replace/disk.qcow2")
    s3.fs().pipe(url, b"old object")
    seen: list[bytes] = []

    def progress(pct: float) -> None:
        if 50 < pct < 100 and not seen:
            seen.append(s3.fs(skip_instance_cache=True).cat_file(url))

    diskimg.convert(src, url, "qcow2", storage_options=s3.storage_options,
                    progress=progress)
    assert seen == [b"old object"]
    _readback(_download(s3, url, tmp_path / "r.qcow2"), src, "qcow2")


def test_refusals_upload_nothing(s3: S3, src: Path) -> None:
    url = s3.url("refused/x.img")
    res = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", "qcow2", "-c",
                          str(src), url], capture_output=True, text=True, env=_env(s3),
                         stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "compressed qcow2 cannot be written to a stream" in res.stderr, res.stderr
    for fmt, opts, why in (("vmdk", {}, "subformat 'monolithicSparse' cannot be written"),
                           ("qcow2", {"preallocation": "metadata"}, "preallocation is not"),
                           ("luks", {}, "format 'luks' cannot be written to a stream")):
        with pytest.raises(UsageError, match=why):
            diskimg.convert(src, url, fmt, options=opts, storage_options=s3.storage_options)
    assert not s3.fs().exists(url) and _pending(s3) == []


def test_url_targets_that_are_not_object_stores(src: Path, tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:9/x.raw", "https://example.invalid/x.raw"):
        with pytest.raises(UsageError, match="fsspec URLs"):
            diskimg.convert(src, url, "raw")
    res = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", "raw", str(src),
                          "http://127.0.0.1:9/x.raw"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "fsspec URLs" in res.stderr, res.stderr
    with pytest.raises(UsageError, match="storage_options apply only to fsspec URLs"):
        diskimg.convert(src, tmp_path / "x.raw", "raw", storage_options={"anon": True})
    assert list(tmp_path.iterdir()) == []


def test_missing_bucket_names_url_and_offset(s3: S3, src: Path) -> None:
    url = "s3://no-such-bucket/x.raw"
    with pytest.raises(SinkError) as ei:
        diskimg.convert(src, url, "raw", storage_options=s3.storage_options)
    assert url in str(ei.value) and ei.value.offset == 0 and "404" in str(ei.value)


def test_sink_context_manager_commits_or_discards(s3: S3) -> None:
    url = s3.url("ctx/a.bin")
    with pytest.raises(_Boom), open_fsspec_sink(url, s3.storage_options) as sink:
        sink.write(b"x" * (6 << 20))
        sink.flush()
        raise _Boom
    assert not s3.fs().exists(url) and _pending(s3) == []
    with open_fsspec_sink(url, s3.storage_options) as sink:
        sink.write(b"")
    assert s3.fs().cat_file(url) == b""                 # an empty object is an object


def test_part_size_keeps_under_the_part_limit() -> None:
    assert part_size(None) == part_size(1 << 30) == PART_SIZE
    for size in (PART_SIZE * (MAX_PARTS - 1) + 1, 1 << 40, 5 << 40):
        p = part_size(size)
        assert p % (1 << 20) == 0 and size // p < MAX_PARTS - 1


def test_memory_stays_flat(s3: S3, tmp_path: Path) -> None:
    """Peak RSS of ``convert`` into the bucket does not grow with the image: 16 MiB and
    64 MiB of random data (4x the bytes uploaded) peak within 8% of each other, where
    holding the data would add 48 MiB to a peak of ~80 (mostly python, s3fs and
    botocore: benchmarks/results-s3.md).  The big object reads back equal."""
    imgs = {}
    for name, mib in (("small", 16), ("big", 64)):
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(os.urandom(mib << 20))
        imgs[name] = raw
    # the peak RSS of a child of a small process: a child forked from pytest itself
    # would count pytest's own pages (its high-water mark survives exec)
    measure = ("import resource, subprocess, sys\n"
               "subprocess.run(sys.argv[1:], check=True, stdin=subprocess.DEVNULL)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")

    def peak(img: Path) -> int:
        res = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m",
                              "diskimg", "convert", "-O", "qcow2", str(img),
                              s3.url(f"rss/{img.name}.qcow2")], env=_env(s3),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return int(res.stdout) << 10

    small, big = peak(imgs["small"]), peak(imgs["big"])
    print(f"peak RSS: 16 MiB {small / 2**20:.1f} MiB, 64 MiB {big / 2**20:.1f} MiB")
    assert big / small < 1.08, (small, big)
    out = _download(s3, s3.url("rss/big.raw.qcow2"), tmp_path / "out.qcow2")
    assert QEMU.compare(imgs["big"], out) == 0


def _example(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("client", ["fsspec", "native"])
def test_ova_into_a_bucket(s3: S3, src: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """examples/ova_stream.py writes the OVA straight into the bucket (no temporary file),
    through s3fs or diskimg's own S3 client: downloaded and untarred, its manifest's
    SHA256 lines match the members and qemu-img reads the vmdk as the source's guest
    bytes."""
    import io
    import tarfile

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    monkeypatch.delenv("SOURCE_DATE_EPOCH")      # the example sets it; restored after
    url = s3.url(f"ova/app-{client}.ova")
    opts = {**s3.storage_options, "x-client": client}
    if client == "native":
        opts.pop("skip_instance_cache")     # an fsspec-only option
    size = _example("ova_stream").stream_ova_to_url(str(src), url, name="app",
                                                    storage_options=opts)
    blob = s3.fs().cat_file(url)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert tar.getnames() == ["app.ovf", "app.mf", "disk1.vmdk"]
        files = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tar.getmembers()}
    assert len(files["disk1.vmdk"]) == size > 5 << 20           # a multipart upload
    lines = files["app.mf"].decode().splitlines()
    assert lines == [f"SHA256({n})= {hashlib.sha256(files[n]).hexdigest()}"
                     for n in ("app.ovf", "disk1.vmdk")]
    vmdk = tmp_path / "disk1.vmdk"
    vmdk.write_bytes(files["disk1.vmdk"])
    QEMU.check_clean(vmdk)
    assert QEMU.compare(src, vmdk) == 0
    assert _pending(s3) == []


def test_a_commit_the_store_ignores_is_an_error(src: Path) -> None:
    """A store whose files ignore the deferred commit (fsspec's default commit() does
    nothing) would lose the image silently: the size check after the commit says so."""
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
    from fsspec.registry import register_implementation

    class LostFile(MemoryFile):
        def commit(self) -> None:
            pass

    class Lossy(MemoryFileSystem):
        protocol = "lossymem"
        store: dict[str, Any] = {}
        pseudo_dirs = [""]

        def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
            if "w" in mode:
                return LostFile(self, self._strip_protocol(path))
            return super()._open(path, mode, **kw)

    register_implementation("lossymem", Lossy, clobber=True)
    with pytest.raises(SinkError, match="the store has no object there after the upload "
                       f"of {SIZE} bytes") as ei:
        diskimg.convert(src, "lossymem://b/x.raw", "raw")
    assert "lossymem://b/x.raw" in str(ei.value)


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_cli_killed_mid_upload_leaves_nothing(s3: S3, sig: str) -> None:
    """``kill`` while the CLI uploads (its source a pipe that stops after 12 MiB): the
    upload is aborted, exit status 143; no object and no pending upload remain.  (^C is
    the API's KeyboardInterrupt case above, and exits 130.)"""
    import signal
    import time

    url = s3.url(f"killed/{sig}.raw")
    p = subprocess.Popen([sys.executable, "-m", "diskimg", "convert", "-O", "raw",
                          "--image-opts", f"driver=raw,file.filename=/dev/stdin,size={SIZE}",
                          url], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(s3))
    assert p.stdin is not None and p.stderr is not None
    p.stdin.write(os.urandom(12 << 20))
    p.stdin.flush()
    deadline = time.monotonic() + 60
    while not _pending(s3):                      # the multipart upload has begun
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(getattr(signal, sig))
    err = p.stderr.read().decode()
    code = p.wait(60)
    p.stdin.close()
    assert code == (143 if sig == "SIGTERM" else 130), (code, err)
    assert "Traceback" not in err
    assert not s3.fs().exists(url) and _pending(s3) == []
