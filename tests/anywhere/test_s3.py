"""Images in object storage through fsspec: qemu-made images uploaded to a moto S3
server (tests/anywhere/s3_server.py) read byte for byte and map for map as the local
file; a changed object, a missing one and bad credentials end in a RemoteError naming the
URL; memory:// images are read, written through and follow their backing chain in the
same store.  No test opens a local file through a remote image."""

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

import fsspec  # noqa: E402
from anywhere.s3_server import S3, assert_reads_as_local, s3_server  # noqa: E402

import diskimg  # noqa: E402
from diskimg.errors import DiskImgError, RemoteError, UsageError  # noqa: E402
from diskimg.hostio.remote import open_fsspec, open_fsspec_sink  # noqa: E402

SIZE = 4 * 1024 * 1024 + 1536          # the last cluster is partial
IMAGES = ("qcow2", "qcow2-compressed", "vmdk-stream", "vmdk-sparse", "raw")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3_open(s3: S3) -> Iterator[S3]:
    """``diskimg.open("s3://...")`` reaches the moto server: fsspec's configuration."""
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = dict(s3.storage_options)
    try:
        yield s3
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved


@pytest.fixture(scope="module")
def images(s3: S3, image_set: dict[str, Path]) -> dict[str, Path]:
    """conftest's image set, uploaded under ``img/``."""
    s3.put_all(image_set.values(), "img")
    return image_set


pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("kind", IMAGES)
def test_every_byte_and_map_as_local(s3_open: S3, images: dict[str, Path], kind: str) -> None:
    local = images[kind]
    assert_reads_as_local(s3_open.url(f"img/{local.name}"), local, SIZE)


def test_host_reads_bounded_cache(s3: S3, images: dict[str, Path]) -> None:
    data = images["raw"].read_bytes()
    with open_fsspec(s3.url("img/img-raw"), storage_options=s3.storage_options,
                     block_size=64 << 10, cache_bytes=256 << 10) as host:
        assert host.size() == len(data)
        assert host.etag
        buf = bytearray(len(data) + 4096)           # past the end: zeros
        host.preadinto(0, memoryview(buf))
        assert bytes(buf) == data + bytes(4096)
        for off in range(0, len(data), 100_001):
            assert host.pread(off, 70_000) == data[off : off + 70_000]
        assert host.pread(len(data) - 10, 100) == data[-10:]
        assert host.pread(len(data), 100) == b""
        assert len(host._cache) <= 4                 # 256 KiB of 64 KiB blocks
    assert host.closed


def test_check_and_info_as_local(s3_open: S3, images: dict[str, Path]) -> None:
    local = images["qcow2"]
    url = s3_open.url(f"img/{local.name}")
    with diskimg.open(url) as dev, diskimg.open(local) as ldev:
        got, want = dev.check(), ldev.check()
        assert (got.corruptions, got.leaks, got.check_errors, got.image_end_offset,
                got.allocated_clusters) == (want.corruptions, want.leaks,
                                            want.check_errors, want.image_end_offset,
                                            want.allocated_clusters)
        gi, wi = dev.info(), ldev.info()
        assert gi.virtual_size == wi.virtual_size
        assert gi.format == wi.format
        assert gi.cluster_size == wi.cluster_size


def test_changed_object_is_an_error(s3: S3, images: dict[str, Path]) -> None:
    url = s3.url("img/changing.raw")
    fs = s3.fs()
    data = images["raw"].read_bytes()
    fs.pipe(url, data)
    with open_fsspec(url, storage_options=s3.storage_options, block_size=64 << 10,
                     cache_bytes=64 << 10) as host:
        assert host.pread(0, 4096) == data[:4096]
        fs.pipe(url, bytes(len(data)))               # replaced: same size, new ETag
        with pytest.raises(RemoteError, match="changed") as ei:
            host.pread(1 << 20, 4096)
        assert ei.value.url == url and ei.value.offset == 1 << 20
        with pytest.raises(RemoteError, match="changed"):   # cached blocks too
            host.pread(0, 4096)


def test_missing_object_and_bad_credentials(s3: S3, images: dict[str, Path]) -> None:
    url = s3.url("img/no-such.qcow2")
    with pytest.raises(RemoteError, match="404") as ei:
        open_fsspec(url, storage_options=s3.storage_options)
    assert ei.value.url == url and ei.value.status == 404 and url in str(ei.value)
    good = s3.url("img/img.qcow2")
    with s3.deny_all(), pytest.raises(RemoteError, match="403") as ei:
        open_fsspec(good, storage_options={**s3.storage_options, "key": "bad",
                                           "secret": "bad"})
    assert ei.value.url == good and ei.value.status == 403 and good in str(ei.value)


def test_s3_refuses_writing_in_place(s3_open: S3, images: dict[str, Path]) -> None:
    url = s3_open.url("img/img.qcow2")
    before = s3_open.fs().cat_file(url)
    with pytest.raises(UsageError, match="immutable"):
        diskimg.open(url, "r+")
    with pytest.raises(UsageError, match="immutable"):
        open_fsspec(url, writable=True, storage_options=s3_open.storage_options)
    assert s3_open.fs().cat_file(url) == before


def test_sink_uploads_in_parts(s3: S3) -> None:
    url = s3.url("out/sink.raw")
    payload = bytes(range(256)) * (45 << 10)         # 11.25 MiB: three 5 MiB parts
    with open_fsspec_sink(url, storage_options=s3.storage_options) as f:
        for off in range(0, len(payload), 1 << 20):
            f.write(payload[off : off + (1 << 20)])
        assert not s3.fs().exists(url)               # nothing visible before close
    assert hashlib.sha256(s3.fs().cat_file(url)).digest() == \
        hashlib.sha256(payload).digest()


def test_backing_in_the_same_bucket(s3_open: S3, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "1M")
    QEMU.io(base, "write -P 0x55 0 1M")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    QEMU.io(top, "write -P 0x66 64k 64k")
    fs = s3_open.fs()
    fs.put_file(str(base), s3_open.url("chain/base.qcow2"))
    fs.put_file(str(top), s3_open.url("chain/top.qcow2"))
    with diskimg.open(s3_open.url("chain/top.qcow2")) as dev:
        assert dev.backing is not None
        assert dev.backing.filename == s3_open.url("chain/base.qcow2")
        assert dev.read(0, dev.size) == QEMU.raw_bytes(top)
    # a backing name that is a local path, or that climbs out of the bucket, never opens
    # the local file or an object of another bucket (refused, or not found in this one)
    other = s3_open.url("x").replace(f"{s3_open.bucket}/x", "other")
    fs.mkdir(other)
    fs.put_file(str(base), f"{other}/base.qcow2")
    for name in (str(base), "../../other/base.qcow2", "s3://other/base.qcow2"):
        bad = tmp_path / "bad.qcow2"
        QEMU.img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", bad,
                 "1M")
        fs.put_file(str(bad), s3_open.url("chain/bad.qcow2"))
        with pytest.raises(DiskImgError) as ei:
            diskimg.open(s3_open.url("chain/bad.qcow2"))
        assert s3_open.url("chain/bad.qcow2") in str(ei.value) or \
            s3_open.url("other/base.qcow2") in str(ei.value), (name, str(ei.value))
    with diskimg.open(s3_open.url("chain/bad.qcow2"), backing=False) as dev:
        assert dev.backing is None and dev.read(0, 4096) == bytes(4096)


# --- memory:// (no server) ------------------------------------------------------------------

@pytest.fixture
def mem() -> Iterator[Any]:
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/t", recursive=True) if fs.exists("/t") else None


def test_memory_read_write_through(mem: Any, tmp_path: Path) -> None:
    local = tmp_path / "m.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", local, "2M")
    QEMU.io(local, "write -P 0x11 0 64k")
    mem.pipe("/t/m.qcow2", local.read_bytes())
    with diskimg.open("memory://t/m.qcow2", "r+") as dev:
        dev.write(1 << 20, b"\x77" * 65536)
        dev.flush()
    QEMU.io(local, "write -P 0x77 1M 64k")           # the same write, by qemu
    got = tmp_path / "got.qcow2"
    got.write_bytes(mem.cat_file("/t/m.qcow2"))
    QEMU.check_clean(got)
    assert QEMU.raw_bytes(got) == QEMU.raw_bytes(local)


def test_memory_host_refuses_writes_read_only(mem: Any) -> None:
    mem.pipe("/t/r.raw", b"\x01" * 4096)
    with open_fsspec("memory://t/r.raw") as host:
        for call in (lambda: host.pwrite(0, b"x"), lambda: host.truncate(0),
                     lambda: host.write_zeros(0, 512), lambda: host.lock(True)):
            with pytest.raises(UsageError, match="read-only"):
                call()
    assert mem.cat_file("/t/r.raw") == b"\x01" * 4096


# --- the CLI, and the core without fsspec ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _diskimg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env},
                         stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 0, f"diskimg {args} exited {res.returncode}: {res.stderr}"
    return res


@pytest.mark.parametrize("cmd", ["info", "map", "check"])
def test_cli_output_as_local(s3: S3, images: dict[str, Path], cmd: str) -> None:
    """The endpoint and credentials come from the environment (fsspec's FSSPEC_S3_*)."""
    local = images["qcow2"]
    url = s3.url(f"img/{local.name}")
    env = {"FSSPEC_S3_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    argv = {"info": ["info", "--output=json"], "map": ["map", "--output=json"],
            "check": ["check"]}[cmd]
    got = _diskimg(env, *argv, url).stdout.replace(url, "NAME")
    want = _diskimg({}, *argv, str(local)).stdout.replace(str(local), "NAME")

    def drop_disk_size(text: str) -> str:      # allocation: st_blocks locally, none remote
        return "\n".join(line for line in text.splitlines() if "actual-size" not in line)

    assert drop_disk_size(got) == drop_disk_size(want)


def test_without_fsspec_the_error_names_the_extra() -> None:
    code = ("import sys; sys.modules['fsspec'] = None\n"
            "import diskimg\n"
            "try:\n    diskimg.open('s3://bucket/x.qcow2')\n"
            "except diskimg.DiskImgError as e:\n    print(type(e).__name__, e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(("UsageError", "UnsupportedFeatureError")), res.stdout
    assert "diskimg[remote]" in res.stdout and "s3://bucket/x.qcow2" in res.stdout


@pytest.mark.parametrize("store", ["file", "memory"])
def test_write_through_host(store: str, mem: Any, tmp_path: Path) -> None:
    """Writes reach the object at once; a write past the end leaves zeros in the gap;
    truncate shrinks and grows with zeros; cached blocks never hide a write."""
    data = bytes(range(256)) * 40                     # 10240 bytes
    if store == "file":
        (tmp_path / "w.raw").write_bytes(data)
        url = f"file://{tmp_path}/w.raw"

        def stored() -> bytes:
            return (tmp_path / "w.raw").read_bytes()
    else:
        mem.pipe("/t/w.raw", data)
        url = "memory://t/w.raw"

        def stored() -> bytes:
            return bytes(mem.cat_file("/t/w.raw"))
    expect = bytearray(data)
    with open_fsspec(url, writable=True, block_size=4096, cache_bytes=8192) as host:
        assert host.pread(0, 8192) == data[:8192]     # both blocks cached
        host.pwrite(4094, b"WXYZ")
        expect[4094:4098] = b"WXYZ"
        assert host.pread(0, 8192) == expect[:8192]
        host.pwrite(12000, b"Q")
        expect += bytes(12000 - len(expect)) + b"Q"
        host.flush()
        assert stored() == expect and host.size() == 12001
        host.truncate(11000)
        host.truncate(11500)
        expect = expect[:11000] + bytes(500)
        host.flush()
        assert host.pread(0, 20000) == expect
    assert stored() == expect


# --- one backing rule: storage_options, policies (diskimg.open -> urls.open_backing) -------

def _chain(tmp_path: Path, backing_name: str) -> tuple[Path, Path]:
    """base (0x55) and top (0x66 at 64k) naming ``backing_name``, made by qemu."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "1M")
    QEMU.io(base, "write -P 0x55 0 1M")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    QEMU.io(top, "write -P 0x66 64k 64k")
    if backing_name != base.name:
        QEMU.img("rebase", "-u", "-b", backing_name, "-F", "qcow2", top)
    return base, top


def test_storage_options_reach_the_backing_file(s3: S3, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No fsspec configuration: the endpoint and credentials given to diskimg.open open
    the top image, its backing file, and the image a pickle reopens."""
    import pickle

    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    base, top = _chain(tmp_path, "base.qcow2")
    fs = s3.fs()
    fs.put_file(str(base), s3.url("so/base.qcow2"))
    fs.put_file(str(top), s3.url("so/top.qcow2"))
    want = QEMU.raw_bytes(top)
    with diskimg.open(s3.url("so/top.qcow2"), storage_options=s3.storage_options) as dev:
        assert dev.backing is not None
        assert dev.backing.filename == s3.url("so/base.qcow2")
        assert hashlib.sha256(dev.read(0, dev.size)).digest() == hashlib.sha256(want).digest()
        copy = pickle.loads(pickle.dumps(dev))
    with copy:
        assert copy.backing is not None and copy.read(0, copy.size) == want


def test_storage_options_refused_where_fsspec_does_not_open(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "1M")
    before = img.read_bytes()
    for src in (str(img), img, "http://127.0.0.1:9/a.qcow2", "file:///a.qcow2"):
        with pytest.raises(UsageError, match="storage_options"):
            diskimg.open(src, "r+" if src is img else "r", storage_options={"anon": True})
    with img.open("rb") as f, pytest.raises(UsageError, match="storage_options"):
        diskimg.open(f, storage_options={"anon": True})
    assert img.read_bytes() == before


def test_untrusted_confines_to_the_top_prefix(mem: Any, tmp_path: Path) -> None:
    """``../base.qcow2`` stays in the store (opens by default) but leaves the top image's
    prefix: an untrusted open refuses it; allow_remote_backing does not lift that."""
    base, top = _chain(tmp_path, "../base.qcow2")
    mem.pipe("/t/base.qcow2", base.read_bytes())
    mem.pipe("/t/sub/top.qcow2", top.read_bytes())
    with diskimg.open("memory://t/sub/top.qcow2") as dev:
        assert dev.read(0, 65536) == b"\x55" * 65536
        assert dev.read(64 << 10, 65536) == b"\x66" * 65536
    for pol in (diskimg.OpenPolicy(untrusted=True),
                diskimg.OpenPolicy(untrusted=True, allow_remote_backing=True)):
        with pytest.raises(DiskImgError, match="outside 'memory://t/sub/'"):
            diskimg.open("memory://t/sub/top.qcow2", policy=pol)
    with pytest.raises(DiskImgError, match="outside"):
        diskimg.open("memory://t/sub/top.qcow2", untrusted=True)


def test_other_store_and_local_backing_only_when_allowed(mem: Any, tmp_path: Path) -> None:
    """A backing file in another store opens only with allow_remote_backing; a local path
    only with allow_local_backing (and then the local bytes are read)."""
    base, _ = _chain(tmp_path, "x")
    for name, allow in (("memory://elsewhere/base.qcow2", "allow_remote_backing"),
                        (str(base), "allow_local_backing")):
        _, top = _chain(tmp_path, name)
        mem.pipe("/t/top.qcow2", top.read_bytes())
        mem.pipe("/elsewhere/base.qcow2", base.read_bytes())
        with pytest.raises(DiskImgError, match=allow):
            diskimg.open("memory://t/top.qcow2")
        with diskimg.open("memory://t/top.qcow2",
                          policy=diskimg.OpenPolicy(**{allow: True})) as dev:
            assert dev.read(0, 65536) == b"\x55" * 65536
            assert dev.read(64 << 10, 65536) == b"\x66" * 65536
    mem.rm("/elsewhere", recursive=True)
