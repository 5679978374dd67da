"""convert into destinations that cannot seek (issue 18 item 2): stdout, a FIFO, a
socket, a file object.  Every streamed image is read back by qemu-img (compare, check);
refusals write no byte; a reader that goes away ends in an error naming the offset."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import DiskImgError, UsageError
from diskimg.hostio.sink import CountingSink, Sink, SinkError

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SIZE = 6 * 1024 * 1024 + 1536          # the last grain/cluster is partial
STREAMABLE = [("raw", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("qcow2", [])]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 with data, a zeroed run, a hole and a partial last cluster."""
    p = tmp_path_factory.mktemp("sinks") / "src.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p, str(SIZE))
    QEMU.io(p, "write -P 0xab 0 1M", "write -P 0x11 3M 64k", "write -z 3200k 256k",
            "write -P 0x5c 6M 1536")
    return p


def _opts(fmt: str) -> dict[str, str]:
    return {"subformat": "streamOptimized"} if fmt == "vmdk" else {}


def _readback(path: Path, src: Path, fmt: str) -> None:
    """qemu-img reads the streamed file as the source's guest bytes, and checks it."""
    assert QEMU.compare(src, path, "-F", fmt) == 0
    if fmt != "raw":
        QEMU.check_clean(path)
    info = QEMU.info(path)
    assert info["format"] == fmt and info["virtual-size"] == -(-SIZE // 512) * 512


def _drain(fd: int, out: list[bytes]) -> threading.Thread:
    def drain() -> None:
        with os.fdopen(fd, "rb") as f:
            out.append(f.read())

    t = threading.Thread(target=drain)
    t.start()
    return t


@pytest.mark.parametrize(("fmt", "extra"), STREAMABLE)
def test_stdout(src: Path, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    out = tmp_path / f"out.{fmt}"
    # through a pipe (cat), so that stdout cannot seek
    with out.open("wb") as f:
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=f)
        res = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", fmt, *extra,
                              str(src), "-"], stdout=cat.stdin, stderr=subprocess.PIPE,
                             env=ENV, timeout=120)
        assert cat.stdin is not None
        cat.stdin.close()
        assert cat.wait(60) == 0
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""
    _readback(out, src, fmt)


@pytest.mark.parametrize(("fmt", "extra"), STREAMABLE)
def test_fifo(src: Path, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    # the reader opens the FIFO (blocking until convert opens it for writing)
    t = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    t.start()
    diskimg.convert(src, fifo, fmt, options=_opts(fmt))
    t.join(60)
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"".join(got))
    _readback(out, src, fmt)


@pytest.mark.parametrize(("fmt", "extra"), STREAMABLE)
def test_socketpair_and_file_object(src: Path, tmp_path: Path, fmt: str,
                                    extra: list[str]) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []
    t = _drain(b.detach(), got)
    try:
        diskimg.convert(src, a.fileno(), fmt, options=_opts(fmt))
    finally:
        a.close()
    t.join(60)
    via_socket = b"".join(got)
    # a file object: written in order only (BytesIO could seek, convert does not)
    buf = io.BytesIO()
    diskimg.convert(src, buf, fmt, options=_opts(fmt))
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(via_socket)
    _readback(out, src, fmt)
    if fmt == "raw":
        assert buf.getvalue() == via_socket
    else:  # the same image bar the random CID
        out.write_bytes(buf.getvalue())
        _readback(out, src, fmt)


def test_vmdk_stream_is_the_seekable_path_bytes(src: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CID made repeatable, the streamed vmdk is byte for byte the file convert
    writes to a path (whose embedded descriptor names it: disk.vmdk, the stream's name)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")
    disk = tmp_path / "disk.vmdk"
    diskimg.convert(src, disk, "vmdk", options=_opts("vmdk"))
    buf = io.BytesIO()
    diskimg.convert(src, buf, "vmdk", options=_opts("vmdk"))
    assert buf.getvalue() == disk.read_bytes()
    counted = CountingSink()
    diskimg.convert(src, counted, "vmdk", options=_opts("vmdk"))
    assert counted.offset == disk.stat().st_size


REFUSED = [
    (["-O", "qcow2", "-c"], "compressed qcow2 cannot be written to a stream"),
    (["-O", "qcow2", "-o", "extended_l2=on"], "extended_l2 cannot be written to a stream"),
    (["-O", "vmdk"], "vmdk subformat 'monolithicSparse' cannot be written to a stream"),
    (["-O", "vmdk", "-o", "subformat=monolithicFlat"], "use -o subformat=streamOptimized"),
    (["-O", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
      "encrypt.format=luks,encrypt.key-secret=s0"], "encrypted qcow2 is not written"),
    (["-O", "luks", "--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"],
     "format 'luks' cannot be written to a stream"),
    (["-O", "raw", "-o", "preallocation=full"], "preallocation is not supported"),
    (["-O", "raw", "-r", "1M"], "-r (rate limit) is not supported"),
    (["-O", "vmdk", "-o", "subformat=streamOptimized", "-B", "b.vmdk", "-F", "vmdk"],
     "cannot have a backing file"),
]


@pytest.mark.parametrize(("args", "why"), REFUSED)
def test_refusals_write_nothing(src: Path, args: list[str], why: str) -> None:
    res = subprocess.run([sys.executable, "-m", "diskimg", "convert", *args, str(src), "-"],
                         capture_output=True, env=ENV, timeout=60)
    assert res.returncode == 1
    assert res.stdout == b""
    assert why in res.stderr.decode(), res.stderr


@pytest.mark.parametrize("opts", ["cluster_size=4096,refcount_bits=1", "compat=0.10",
                                  "cluster_size=512,refcount_bits=64,lazy_refcounts=on"])
def test_qcow2_stream_layouts(src: Path, tmp_path: Path, opts: str) -> None:
    """qcow2 laid out metadata-first: no leaks (check), same guest bytes (compare), every
    data cluster mapped once, in guest order after the metadata."""
    buf = io.BytesIO()
    diskimg.convert(src, buf, "qcow2", options=dict(kv.split("=") for kv in opts.split(",")))
    out = tmp_path / "out.qcow2"
    out.write_bytes(buf.getvalue())
    _readback(out, src, "qcow2")
    data = [e for e in QEMU.map(out) if e["data"]]
    offs = [e["offset"] for e in data]
    assert offs == sorted(offs) and offs[-1] + data[-1]["length"] <= len(buf.getvalue())
    assert sum(e["length"] for e in data) >= 1 << 20


def test_unix_socket_path(src: Path, tmp_path: Path) -> None:
    """A path naming a listening unix socket: convert connects and streams into it."""
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as f:
            got.append(f.read())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        diskimg.convert(src, path, "qcow2")
        t.join(60)
    finally:
        server.close()
    out = tmp_path / "out.qcow2"
    out.write_bytes(got[0])
    _readback(out, src, "qcow2")


def test_stdout_terminal_refused(src: Path) -> None:
    import pty

    master, slave = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", "raw",
                              str(src), "-"], stdout=slave, stderr=subprocess.PIPE, env=ENV,
                             timeout=60)
        os.set_blocking(master, False)
        try:
            written = os.read(master, 1 << 16)
        except BlockingIOError:
            written = b""
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 1 and written == b""
    assert b"standard output, which is a terminal" in res.stderr


def test_raw_concatenates_sources(src: Path, tmp_path: Path) -> None:
    second = tmp_path / "b.raw"
    second.write_bytes(os.urandom(1 << 20) + bytes(512))
    buf = io.BytesIO()
    diskimg.convert([src, second], buf, "raw")
    assert buf.getvalue() == QEMU.raw_bytes(src) + second.read_bytes()


def test_text_file_object_refused(src: Path) -> None:
    text = io.StringIO()
    with pytest.raises(UsageError, match="text file object"):
        diskimg.convert(src, text, "raw")
    assert text.getvalue() == ""


def test_refusal_api_leaves_file_object_empty(src: Path) -> None:
    buf = io.BytesIO()
    with pytest.raises(UsageError, match="compressed qcow2"):
        diskimg.convert(src, buf, "qcow2", compress=True)
    assert buf.getvalue() == b""


def test_reader_goes_away_names_the_offset(src: Path) -> None:
    """EPIPE mid-stream: the CLI says where the stream stopped, exits 1, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "diskimg", "convert", "-O", "raw", str(src),
                          "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert p.stdout is not None and p.stderr is not None
    head = p.stdout.read(100_000)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == 1
    assert len(head) == 100_000 and head[:1024] == b"\xab" * 1024
    assert "stdout: write failed at offset " in err and "Traceback" not in err, err
    at = int(err.split("offset ")[1].split(":")[0])
    assert 100_000 <= at < SIZE


def test_sink_error_and_bounded_buffer() -> None:
    a, b = socket.socketpair()
    sink = Sink(a.fileno(), "peer", buffer=4096)
    sink.write(b"x" * 1000)
    assert sink.offset == 1000
    b.close()
    with pytest.raises(SinkError) as ei:
        for _ in range(100):
            sink.write(b"y" * 4096)
    assert isinstance(ei.value, DiskImgError)
    assert ei.value.offset >= 0 and "peer: write failed at offset" in str(ei.value)
    a.close()


def test_nonblocking_pipe_waits(src: Path) -> None:
    """A non-blocking pipe that fills up is waited on, not an error."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    got: list[bytes] = []
    t = _drain(r, got)
    try:
        diskimg.convert(src, w, "raw")
    finally:
        os.close(w)
    t.join(60)
    assert got[0] == QEMU.raw_bytes(src)


def test_api_peer_closes_mid_stream(src: Path) -> None:
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(SinkError, match=r"fd \d+: write failed at offset 0") as ei:
        diskimg.convert(src, a.fileno(), "qcow2")
    assert ei.value.offset == 0
    a.close()


def test_sink_holds_at_most_its_buffer() -> None:
    seen: list[int] = []

    class Rec:
        def write(self, data: Any) -> int:
            seen.append(len(data))
            return len(data)

    sink = Sink(Rec(), "rec", buffer=1000)
    for _ in range(10):
        sink.write(b"z" * 300)
    assert all(n >= 1000 for n in seen) and sink.offset == 3000
    assert sum(seen) + len(sink._buf) == 3000 and len(sink._buf) < 1000
    sink.close()
    assert sum(seen) == 3000


@pytest.mark.parametrize(("fmt", "extra"), STREAMABLE)
def test_memory_is_bounded(tmp_path: Path, fmt: str, extra: list[str]) -> None:
    """The stream is written as it is produced, not gathered: the peak of Python
    allocations while streaming 48 MiB of incompressible data stays a small fraction of it,
    and bytes reach the destination long before the source is read to its end."""
    import tracemalloc

    src = tmp_path / "full.raw"
    src.write_bytes(os.urandom(48 << 20))
    seen: list[int] = []

    class Counting:
        def write(self, data: Any) -> int:
            seen.append(len(data))
            return len(data)

    tracemalloc.start()
    try:
        diskimg.convert(src, Counting(), fmt, options=_opts(fmt), workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(seen) >= 48 << 20 if fmt != "vmdk" else sum(seen) > 40 << 20
    assert len(seen) > 10           # many writes, not one at the end
    assert peak < 16 << 20, peak
