"""``/dev/stdin`` and other inputs that are not regular files (issue 18 item 1).

``< file``: stdin is the file itself and opens as qemu-img opens it.  A pipe: qemu-img
refuses it ("'file' driver requires '/dev/stdin' to be a regular file"); diskimg streams a
raw image (front to back, in constant memory when its ``size`` is given, else through an
unlinked temporary file) and refuses qcow2/vmdk up front, saying that they need random
access.  Every converted byte is checked with qemu-img compare/check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from diskimg.errors import DiskImgError, FormatError, UnsupportedFeatureError
from diskimg.hostio.pipe import PipeHost, open_pipe
from qemukit import Qemu

SIZE = 2 << 20


def _diskimg(*args: str | Path, stdin_file: Path | None = None,
             pipe_from: Path | None = None, pipe_bytes: bytes | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """``diskimg ARGS`` with stdin the file itself (``stdin_file``) or a pipe fed with
    the bytes of ``pipe_from`` / ``pipe_bytes``."""
    argv = [sys.executable, "-m", "diskimg", *map(str, args)]
    if stdin_file is not None:
        with open(stdin_file, "rb") as f:
            return subprocess.run(argv, stdin=f, capture_output=True, text=True, timeout=120)
    data = pipe_bytes if pipe_bytes is not None else Path(pipe_from or "/dev/null").read_bytes()
    # a pipe (communicate ignores the EPIPE of a refusal that stops reading)
    r = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(), r.stderr.decode())


def _raw(qemu: Qemu, tmp_path: Path) -> Path:
    p = tmp_path / "src.raw"
    qemu.img("create", "-q", "-f", "raw", p, SIZE)
    qemu.io(p, "write -P 0x41 0 65536", "write -P 0x42 1M 3000", f"write -P 0x43 {SIZE - 512} 512",
            fmt="raw")
    return p


@pytest.mark.qemu
def test_info_of_stdin_redirected_from_a_file_matches_qemu(qemu: Qemu, tmp_path: Path) -> None:
    p = _raw(qemu, tmp_path)
    q = tmp_path / "img.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", p, q)
    r = _diskimg("info", "--output=json", "/dev/stdin", stdin_file=q)
    piped = qemu.img("info", "/dev/stdin", input=q.read_bytes(), text=False, ok=(1,))
    assert r.returncode == 0, r.stderr
    ref = subprocess.run([qemu.qemu_img, "info", "--output=json", "/dev/stdin"],
                         stdin=open(q, "rb"), capture_output=True, text=True, check=True)
    assert r.stdout == ref.stdout
    assert b"requires '/dev/stdin' to be a regular file" in piped.stderr  # qemu: no pipes


@pytest.mark.qemu
@pytest.mark.parametrize(("sized", "out_fmt"), [(False, "qcow2"), (True, "vmdk")],
                         ids=["spooled-qcow2", "streamed-vmdk"])
def test_convert_raw_from_a_pipe(qemu: Qemu, tmp_path: Path, sized: bool,
                                 out_fmt: str) -> None:
    p = _raw(qemu, tmp_path)
    dst = tmp_path / f"out.{out_fmt}"
    src = f"driver=raw,file.filename=/dev/stdin,size={SIZE}" if sized else "/dev/stdin"
    opts = ["-o", "subformat=streamOptimized"] if out_fmt == "vmdk" else []
    r = _diskimg("convert", "-O", out_fmt, *opts, *(["--image-opts"] if sized else []),
                 src, dst, pipe_from=p)
    assert r.returncode == 0, r.stderr
    assert qemu.compare(dst, p) == 0
    qemu.check_clean(dst)


@pytest.mark.qemu
@pytest.mark.parametrize(("fmt", "opts", "given"), [("qcow2", "", False),
                                                    ("vmdk", "subformat=streamOptimized", True)])
def test_random_access_formats_from_a_pipe_are_refused_up_front(
        qemu: Qemu, tmp_path: Path, fmt: str, opts: str, given: bool) -> None:
    img = tmp_path / f"img.{fmt}"
    qemu.img("create", "-q", "-f", fmt, *(["-o", opts] if opts else []), img, SIZE)
    dst = tmp_path / "out.raw"
    r = _diskimg("convert", *(["-f", fmt] if given else []), "-O", "raw", "/dev/stdin", dst,
                 pipe_from=img)
    assert r.returncode == 1
    assert f"'/dev/stdin' is a pipe and holds a {fmt} image, which needs random access" \
        in r.stderr
    assert not dst.exists()
    r = _diskimg("info", "/dev/stdin", pipe_from=img)
    assert r.returncode == 1 and "needs random access" in r.stderr and not r.stdout


@pytest.mark.qemu
def test_a_pipe_shorter_than_its_size_fails_and_leaves_no_target(qemu: Qemu,
                                                                 tmp_path: Path) -> None:
    p = _raw(qemu, tmp_path)
    dst = tmp_path / "out.qcow2"
    r = _diskimg("convert", "-O", "qcow2", "--image-opts",
                 f"driver=raw,file.filename=/dev/stdin,size={SIZE}", dst,
                 pipe_bytes=p.read_bytes()[: 1 << 20])
    assert r.returncode == 1
    assert "'/dev/stdin' ended at offset 0x100000, before the 2097152 bytes" in r.stderr
    assert not dst.exists()


def _pipe_with(data: bytes) -> tuple[str, threading.Thread, int]:
    """A FIFO path with a writer already attached, fed ``data`` by a thread, as
    ``/dev/stdin`` after ``|`` is; the caller closes the extra read end (returned)."""
    import tempfile

    d = tempfile.mkdtemp()
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    # a read end that never reads keeps the pipe (and what was written) alive until the
    # code under test opens it; then the writer opens without waiting
    keep = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY)

    def feed() -> None:
        with open(wfd, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return fifo, t, keep


def test_pipe_host_reads_forward_only_and_never_returns_wrong_bytes() -> None:
    data = os.urandom(3 << 20)
    fifo, t, keep = _pipe_with(data)
    host = open_pipe(fifo, None, {"size": str(len(data))})
    os.close(keep)
    assert isinstance(host, PipeHost)
    try:
        assert host.pread(0, 512) == data[:512]                   # the probed head
        assert host.pread((1 << 20) + 7, 4096) == data[(1 << 20) + 7:(1 << 20) + 4103]
        assert host.pread((1 << 20) + 100, 10) == data[(1 << 20) + 100:(1 << 20) + 110]
        assert host.pread(0, 16) == data[:16]                    # the head stays readable
        with pytest.raises(DiskImgError, match=r"is a pipe, read once front to back: "
                           r"offset 0x20000 was already passed"):
            host.pread(0x20000, 16)
        assert host.pread(len(data) - 5, 100) == data[-5:]       # short at the end
    finally:
        host.close()
        t.join(timeout=10)


def test_pipe_host_refuses_qcow2_and_a_short_stream() -> None:
    fifo, t, keep = _pipe_with(b"QFI\xfb\0\0\0\3" + bytes(1000))
    with pytest.raises(UnsupportedFeatureError, match="holds a qcow2 image, which needs "
                       "random access"):
        open_pipe(fifo, None, {})
    os.close(keep)
    t.join(timeout=10)
    fifo, t, keep = _pipe_with(bytes(1000))
    with pytest.raises(FormatError, match="ended at offset 0x3e8, before the 4096 bytes"):
        open_pipe(fifo, "raw", {"size": "4096"})
    os.close(keep)
    t.join(timeout=10)


def test_a_character_device_is_not_taken_for_a_pipe() -> None:
    """An endless device must not be spooled: /dev/zero stays refused by name."""
    import diskimg

    with pytest.raises(DiskImgError, match="'/dev/zero': not a regular file or block device"):
        diskimg.open("/dev/zero")


def test_a_named_fifo_nobody_writes_to_is_refused_without_waiting(tmp_path: Path) -> None:
    import diskimg

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DiskImgError, match="a pipe with nothing to read"):
        diskimg.open(fifo)
