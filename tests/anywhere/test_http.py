"""Images over HTTP: qemu-made images served by a real nginx read byte for byte and map
for map as the local file; the CLI gives the local file's output for a URL; every server
fault ends in a RemoteError naming the URL and the offset, within the timeout, never in
wrong data.  Servers: tests/anywhere/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import RemoteError, UsageError
from diskimg.hostio.http import open_http

pytestmark = pytest.mark.qemu
Nginx = Faulty = Any      # the fixtures' types: tests/anywhere/conftest.py

REPO = Path(__file__).resolve().parents[2]
SIZE = 4 * 1024 * 1024 + 1536          # the last cluster is partial
IMAGES = ("qcow2", "qcow2-compressed", "vmdk-stream", "vmdk-sparse", "raw")


@pytest.fixture(scope="module")
def images(nginx: Nginx, image_set: dict[str, Path]) -> dict[str, Path]:
    """conftest's image set, in nginx's root."""
    out = {}
    for kind, p in image_set.items():
        out[kind] = nginx.root / p.name
        if not out[kind].exists():
            out[kind].write_bytes(p.read_bytes())
    return out


def _url(nginx: Nginx, path: Path) -> str:
    return nginx.url(path.name)


def _diskimg(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                         text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode in ok, f"diskimg {args} exited {res.returncode}: {res.stderr}"
    return res


def _map(dev: diskimg.BlockDevice) -> list[tuple[int, int, int, bool, bool]]:
    return [(e.start, e.length, e.depth, e.zero, e.data) for e in dev.map()]


# --- real server: bytes and maps ----------------------------------------------------------

@pytest.mark.parametrize("kind", IMAGES)
def test_every_byte_and_map_as_local(nginx: Nginx, images: dict[str, Path], kind: str) -> None:
    local = images[kind]
    expect = QEMU.raw_bytes(local)
    url = _url(nginx, local)
    # cold reads first: offset 0 and the last partial cluster, each from a fresh open
    with diskimg.open(url) as dev:
        assert dev.read(0, 512) == expect[:512]
    with diskimg.open(url) as dev:
        assert dev.read(SIZE - 1536, 1536) == expect[SIZE - 1536:]
    with diskimg.open(url) as dev, diskimg.open(local) as ldev:
        assert dev.size == len(expect) == SIZE
        assert dev.read(0, dev.size) == expect
        if kind == "raw":   # a remote object shows no holes: all data, as qemu's curl
            assert _map(dev) == [(0, SIZE, 0, False, True)]
        else:
            assert _map(dev) == _map(ldev)
        assert dev.format == ldev.format


@pytest.mark.parametrize("cmd", ["info", "info-json", "map", "check", "measure", "compare"])
def test_cli_output_as_local(nginx: Nginx, images: dict[str, Path], cmd: str) -> None:
    local = images["qcow2"]
    url = _url(nginx, local)
    argv = {"info": ["info"], "info-json": ["info", "--output=json"],
            "map": ["map", "--output=json"], "check": ["check"],
            "measure": ["measure", "-O", "qcow2"],
            "compare": ["compare", str(images["vmdk-stream"])]}[cmd]
    tail = argv[1:] if cmd == "compare" else []
    head = argv[:1] if cmd == "compare" else argv
    got = _diskimg(*head, url, *tail).stdout.replace(url, "NAME")
    want = _diskimg(*head, str(local), *tail).stdout.replace(str(local), "NAME")

    def drop_disk_size(text: str) -> str:      # allocation: st_blocks locally, none remote
        return "\n".join(line for line in text.splitlines()
                         if "disk size" not in line and "actual-size" not in line)

    assert drop_disk_size(got) == drop_disk_size(want)
    if cmd == "compare":
        assert "Images are identical." in got


@pytest.mark.parametrize("kind", ["qcow2-compressed", "vmdk-stream"])
def test_cli_convert_from_url(nginx: Nginx, images: dict[str, Path], kind: str,
                              tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    _diskimg("convert", "-O", "qcow2", _url(nginx, images[kind]), str(out))
    QEMU.check_clean(out)
    assert QEMU.compare(out, images["qcow2"]) == 0
    assert QEMU.raw_bytes(out) == QEMU.raw_bytes(images[kind])


def test_backing_of_a_remote_image_in_the_same_store(nginx: Nginx, tmp_path: Path) -> None:
    """A relative backing name is looked up in the remote image's own store (issue 18);
    backing=False reads the image alone."""
    base = nginx.root / "base-b.qcow2"
    top = nginx.root / "top-b.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "1M")
    QEMU.io(base, "write -P 0x55 0 1M")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    QEMU.io(top, "write -P 0x66 64k 64k")
    with diskimg.open(nginx.url(top.name)) as dev:
        assert dev.backing is not None
        assert dev.read(0, dev.size) == QEMU.raw_bytes(top)
    alone = tmp_path / "alone.qcow2"              # what the top image holds by itself
    alone.write_bytes(top.read_bytes())
    QEMU.img("rebase", "-u", "-b", "", alone)
    with diskimg.open(nginx.url(top.name), backing=False) as dev:
        assert dev.backing is None
        assert dev.read(0, dev.size) == QEMU.raw_bytes(alone)


def test_read_only(nginx: Nginx, images: dict[str, Path]) -> None:
    url = _url(nginx, images["raw"])
    before = images["raw"].read_bytes()
    with pytest.raises(UsageError, match="read-only"):
        diskimg.open(url, "r+")
    with open_http(url) as host:
        for call in (lambda: host.pwrite(0, b"x"), lambda: host.truncate(0),
                     lambda: host.write_zeros(0, 512), lambda: host.lock(True)):
            with pytest.raises(UsageError, match="read-only"):
                call()
        host.flush()
        host.lock(False)
    assert images["raw"].read_bytes() == before


def test_parallel_reads_bounded_connections_and_cache(nginx: Nginx,
                                                      images: dict[str, Path]) -> None:
    local = images["raw"]
    data = local.read_bytes()
    with open_http(_url(nginx, local), block_size=64 << 10, cache_bytes=256 << 10,
                   workers=3) as host:
        buf = bytearray(len(data) + 4096)           # past the end: zeros
        host.preadinto(0, memoryview(buf))
        assert bytes(buf) == data + bytes(4096)
        for off in range(0, len(data), 192 << 10):  # sequential: read-ahead
            assert host.pread(off, 100_000) == data[off : off + 100_000]
        assert host.pread(len(data) - 10, 100) == data[-10:]
        assert host.pread(len(data), 100) == b""
        assert len(host._cache) <= 4                 # 256 KiB of 64 KiB blocks
        assert len(host._conns) <= 3                 # 3 workers: this thread and 2 more
    assert host.closed


def test_https(nginx: Nginx, images: dict[str, Path]) -> None:
    if not nginx.https_port:
        pytest.skip("no openssl command to make a certificate")
    import ssl

    local = images["vmdk-stream"]
    url = nginx.https_url(local.name)
    with pytest.raises(RemoteError, match="TLS certificate not accepted") as ei:
        diskimg.open(url)                           # self-signed: refused by default
    assert ei.value.url == url
    ctx = ssl.create_default_context(cafile=str(nginx.cafile))
    with open_http(url, ssl_context=ctx) as host:
        assert host.pread(0, host.size()) == local.read_bytes()
    raw = images["raw"].read_bytes()                # the stream over TLS: 1 MiB reads
    with open_http(nginx.https_url(images["raw"].name), ssl_context=ctx) as host:
        got = b"".join(host.pread(off, 1 << 20) for off in range(0, len(raw), 1 << 20))
        assert got == raw and len(host._stream.conns) == 1   # the stream read it


# --- redirects (nginx) ---------------------------------------------------------------------

def test_redirects(nginx: Nginx, images: dict[str, Path]) -> None:
    local = images["qcow2"]
    expect = QEMU.raw_bytes(local)
    with diskimg.open(nginx.url(f"r/{local.name}")) as dev:
        assert dev.read(0, dev.size) == expect
    away = nginx.url(f"away/{local.name}")
    with pytest.raises(RemoteError, match="another host") as ei:
        diskimg.open(away)
    assert ei.value.url == away
    with open_http(away, allow_hosts=["localhost"]) as host:
        assert host.pread(0, 4) == b"QFI\xfb"
    with pytest.raises(RemoteError, match="another host"):
        open_http(away, diskimg.OpenPolicy(untrusted=True), allow_hosts=["localhost"])
    with pytest.raises(RemoteError, match="only http and https"):
        diskimg.open(nginx.url("ftp/x"))
    with pytest.raises(RemoteError, match="more than 5 redirects"):
        diskimg.open(nginx.url("loop/x"))


def test_object_replaced_on_the_server(nginx: Nginx) -> None:
    """nginx answers If-Match with 412 once the file changed (its ETag is mtime and
    size): the read fails, what was read before the change was the old bytes, and no
    later read answers, not even from the cache."""
    path = nginx.root / "changing.raw"
    old = bytes(range(256)) * 4096
    path.write_bytes(old)
    os.utime(path, (1_000_000, 1_000_000))
    with open_http(nginx.url(path.name), block_size=64 << 10) as host:
        assert host.pread(0, 1000) == old[:1000]
        path.write_bytes(bytes(len(old)))             # same size, new content and mtime
        with pytest.raises(RemoteError, match="changed since it was opened") as ei:
            host.pread(512 << 10, 1000)
        assert ei.value.offset == 512 << 10 and ei.value.status == 412
        with pytest.raises(RemoteError, match="changed since it was opened"):
            host.pread(0, 1000)                        # cached, but of the old object


def test_missing_object_names_status_and_url(nginx: Nginx) -> None:
    url = nginx.url("no-such.qcow2")
    with pytest.raises(RemoteError, match="HTTP 404") as ei:
        diskimg.open(url)
    assert ei.value.status == 404 and url in str(ei.value)
    res = _diskimg("info", url, ok=(1,))
    assert url in res.stderr and "404" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


# --- faults (stdlib server) ----------------------------------------------------------------

DATA = bytes(range(256)) * 4096 + b"tail"        # 1 MiB + 4: blocks and a partial one


@pytest.mark.parametrize("fault, words", [
    ("drop", "connection dropped twice"),
    ("short", "short range: asked for bytes 262144-"),
    ("wrong", "wrong Content-Range"),
    ("ignore", "ignores Range"),
    ("gzip", "Content-Encoding gzip"),
    ("404", "HTTP 404"), ("403", "HTTP 403"), ("500", "HTTP 500"),
    ("etag", "changed since it was opened"),
])
def test_fault_is_a_remote_error(faulty: Faulty, fault: str, words: str) -> None:
    url = faulty.serve(DATA, fault)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        with open_http(url, timeout=5) as host:
            host.pread(300_000, 1000)
    err = ei.value
    assert words in str(err) and url in str(err) and err.url == url
    if fault not in ("404", "403", "500"):     # a status already refuses the open (HEAD)
        assert err.offset == 262144 and "at offset 0x40000" in str(err)
    else:
        assert err.status == int(fault)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("fault, words", [
    ("drop", "connection dropped twice"),
    ("short", "short range: asked for bytes 4-"),
    ("wrong", "wrong Content-Range"),
    ("ignore", "ignores Range"),
    ("gzip", "Content-Encoding gzip"),
    ("etag", "changed since it was opened"),
])
def test_fault_on_the_stream_is_a_remote_error(faulty: Faulty, fault: str,
                                               words: str) -> None:
    """A large read (the streaming GET, hostio/http.py STREAM_MIN) meets every fault as
    the block reads do: a RemoteError naming the URL and the offset, the buffer never
    returned."""
    url = faulty.serve(DATA, fault)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        with open_http(url, timeout=5) as host:
            host.pread(4, 1 << 20)
    err = ei.value
    assert words in str(err) and url in str(err) and err.url == url
    assert err.offset is not None and f"at offset {err.offset:#x}" in str(err)
    if fault == "drop":          # retried once from where the body broke, then refused
        assert 4 < err.offset < len(DATA)
    else:
        assert err.offset == 4
    assert time.monotonic() - t0 < 5


def test_stalled_stream_times_out(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "stall")
    with open_http(url, timeout=0.5) as host:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"timed out after 0.5 s \(\d+ of \d+ bytes") as ei:
            host.pread(0, 1 << 20)
        assert time.monotonic() - t0 < 2          # no retry after a timeout
    assert ei.value.offset == 0


def test_slow_server_times_out(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "slow")
    with open_http(url, timeout=0.5) as host:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"timed out after 0.5 s") as ei:
            host.pread(0, 10)
        assert time.monotonic() - t0 < 2          # no retry after a timeout
    assert ei.value.offset == 0


def test_stalled_body_times_out(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "stall")
    with open_http(url, timeout=0.5) as host:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"timed out after 0.5 s \(\d+ of \d+ bytes"):
            host.pread(0, 10)
        assert time.monotonic() - t0 < 2


def test_dropped_once_is_retried(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "drop1")
    with open_http(url, timeout=5) as host:
        assert host.pread(0, len(DATA)) == DATA


def test_size_without_head(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "nohead")
    with open_http(url, timeout=5) as host:
        assert host.size() == len(DATA)
        assert host.pread(len(DATA) - 100, 200) == DATA[-100:]


def test_changed_object_never_mixes_versions(faulty: Faulty) -> None:
    """The first response of the new version fails the read, and every read after."""
    url = faulty.serve(DATA, "etag")
    with open_http(url, timeout=5) as host:
        with pytest.raises(RemoteError, match="changed"):
            host.pread(0, 10)
        with pytest.raises(RemoteError, match="changed"):
            host.pread(0, 10)


def test_cli_fault_message(faulty: Faulty) -> None:
    url = faulty.serve(DATA, "ignore")
    res = _diskimg("info", "-f", "raw", url, ok=(1,))
    assert url in res.stderr and "ignores Range" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_files_a_remote_image_names_are_never_opened(nginx: Nginx, tmp_path: Path) -> None:
    """A remote qcow2 naming an external data file, or a vmdk descriptor naming an
    extent, by absolute local path: refused, the local file is never read."""
    secret = tmp_path / "secret.raw"
    qcow = nginx.root / "datafile.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", qcow,
             "1M")
    secret.write_bytes(b"local secret" * 1000 + bytes(1048576 - 12000))
    desc = nginx.root / "flat.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\n# Extent description\n'
                    f'RW 2048 FLAT "{secret}" 0\n\n# The Disk Data Base\n#DDB\n\n'
                    'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n'
                    'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n'
                    'ddb.adapterType = "ide"\n')
    assert QEMU.raw_bytes(desc)[:12] == b"local secret"  # qemu would read it
    with diskimg.open(qcow) as local:                     # and so does a local open
        assert local.read(0, 12) == b"local secret"
    for name in (qcow.name, desc.name):
        with pytest.raises(diskimg.DiskImgError,
                           match="Refusing to open|names separate extent files") as ei:
            diskimg.open(nginx.url(name))
        assert str(secret) in str(ei.value) or "names separate extent files" in str(ei.value)


def test_no_server_listening() -> None:
    import socket

    with socket.socket() as s:                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/disk.qcow2"
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="connection failed twice") as ei:
            open_http(url, timeout=2)
    assert ei.value.url == url and ei.value.offset is None
    assert time.monotonic() - t0 < 4
    with pytest.raises(UsageError, match="not an http"):
        open_http("ftp://127.0.0.1/disk.qcow2")


def test_content_range_parsing() -> None:
    from diskimg.hostio.blockcache import _runs
    from diskimg.hostio.http import _content_range

    assert _content_range("bytes 0-511/1024") == (0, 511, 1024)
    assert _content_range("bytes 512-1023/*") == (512, 1023, None)
    assert _content_range("bytes */1024") == (None, None, 1024)
    for bad in (None, "", "items 0-1/2", "bytes 5-1/10", "bytes a-b/c", "bytes 0-"):
        assert _content_range(bad)[:2] == (None, None)
    assert _runs([7, 1, 2, 3, 4, 5, 2], 4) == [(1, 4), (5, 1), (7, 1)]


# --- qemu-img's curl driver (Debian qemu-block-extra) on the same URLs ---------------------

@pytest.fixture(scope="module")
def qemu_curl(nginx: Nginx, images: dict[str, Path]) -> None:
    res = QEMU.img("info", _url(nginx, images["raw"]), ok=None, timeout=60)
    if res.returncode:
        pytest.skip(f"qemu-img has no curl driver (Debian qemu-block-extra): {res.stderr}")


@pytest.fixture(scope="module")
def chain(nginx: Nginx) -> Path:
    """A qcow2 over a relative backing file in the same directory of the server."""
    base, top = nginx.root / "qc-base.qcow2", nginx.root / "qc-top.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "2M")
    QEMU.io(base, "write -P 0x55 0 2M")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    QEMU.io(top, "write -P 0x66 64k 64k", "write -z 1M 64k")
    return top


@pytest.mark.parametrize("kind", [*IMAGES, "chain"])
def test_info_and_map_as_qemu_curl(nginx: Nginx, images: dict[str, Path], chain: Path,
                                   qemu_curl: None, kind: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """diskimg's info (JSON and text) and map (JSON and text) of a URL are qemu-img's,
    byte for byte, exit code too: no actual-size ("disk size: unavailable"), raw without
    a dirty flag, a remote raw all data, backing files resolved on the server.  (The CLI
    runs in this process: test_cli_output_as_local runs it as a command.)"""
    from diskimg.cli.main import main

    url = _url(nginx, chain if kind == "chain" else images[kind])
    for argv in (["info", "--output=json"], ["info"], ["map", "--output=json"], ["map"]):
        want = QEMU.img(*argv, url, ok=None, timeout=60)
        capsys.readouterr()
        rc = main([*argv, url])
        assert (capsys.readouterr().out, rc) == (want.stdout, want.returncode), argv


@pytest.mark.parametrize("kind", ["qcow2-compressed", "vmdk-stream", "chain"])
def test_convert_raw_as_qemu_curl(nginx: Nginx, images: dict[str, Path], chain: Path,
                                  qemu_curl: None, kind: str, tmp_path: Path) -> None:
    """``convert -O raw URL``: diskimg's file is qemu-img's, byte for byte.  qemu-img
    runs with -m 1: its curl driver (7.2) hangs in most runs with parallel requests."""
    local = chain if kind == "chain" else images[kind]
    url = _url(nginx, local)
    ours, theirs = tmp_path / "diskimg.raw", tmp_path / "qemu.raw"
    QEMU.img("convert", "-m", "1", "-O", "raw", url, theirs, timeout=60)
    _diskimg("convert", "-O", "raw", url, str(ours))
    assert ours.read_bytes() == theirs.read_bytes() == QEMU.raw_bytes(local)
