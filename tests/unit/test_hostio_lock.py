"""QEMU-compatible image locking, checked against live qemu-io / qemu-img processes.

qemu's lock bytes (ECOSYSTEM.md 5.6): 100+i "I hold permission i", 200+i "I do not share
permission i".  A qcow2 writer holds 100,101,103 and refuses 201,203; a raw writer (qemu's
raw driver shares everything) holds only 100,101.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import ImageLockedError

pytestmark = pytest.mark.qemu


@contextmanager
def qemu_io_holding(qemu_io: str, img: Path, fmt: str, read_only: bool = False) -> Iterator[None]:
    """Keep ``img`` open in an interactive qemu-io until the block ends."""
    cmd = [qemu_io, "-f", fmt, *(["-r"] if read_only else []), str(img)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("read 0 512\n")
        p.stdin.flush()
        line = p.stdout.readline()  # once qemu-io answers, the image is open and locked
        assert "read 512/512 bytes" in line, line
        yield
    finally:
        if p.stdin:
            p.stdin.close()  # EOF makes qemu-io quit
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_open_fails_while_qemu_io_writes(fmt: str, make_image, qemu_io: str) -> None:
    img = make_image(f"busy.{fmt}", fmt, "1M")
    with qemu_io_holding(qemu_io, img, fmt):
        for mode in ("r", "r+"):
            with pytest.raises(ImageLockedError) as ei:
                # format="raw" for both: locking happens before any format code runs
                diskimg.open(img, mode, format="raw")
            msg = str(ei.value)
            assert msg.splitlines()[-1] == f"Is another process using the image [{img}]?"
        with pytest.raises(ImageLockedError) as ei:
            diskimg.open(img, "r", format="raw")
        assert str(ei.value).startswith('Failed to get shared "write" lock')
        # -U (force_share) reads anyway, as qemu-img -U does
        with diskimg.open(img, "r", format="raw", force_share=True) as dev:
            assert dev.size > 0
    # once qemu-io is gone the image opens normally
    with diskimg.open(img, "r+", format="raw"):
        pass


def test_read_only_open_fails_like_qemu_img_convert(make_image, qemu_img: str,
                                                    qemu_io: str, run, tmp_path: Path) -> None:
    """A reader that needs a consistent image refuses to share write, like convert."""
    img = make_image("src.raw", "raw", "1M")
    with qemu_io_holding(qemu_io, img, "raw"):
        res = run([qemu_img, "convert", "-f", "raw", "-O", "raw", img, tmp_path / "o"], check=1)
        with pytest.raises(ImageLockedError) as ei:
            diskimg.open(img, "r", format="raw")
    expected = res.stderr.strip().replace("qemu-img: Could not open '%s': " % img, "")
    assert str(ei.value) == expected


def test_read_only_open_coexists_with_qemu_reader(make_image, qemu_io: str) -> None:
    img = make_image("shared.qcow2", "qcow2", "1M")
    with qemu_io_holding(qemu_io, img, "qcow2", read_only=True):
        with diskimg.open(img, "r", format="raw") as dev:
            assert dev.read(0, 4) == b"QFI\xfb"
        with pytest.raises(ImageLockedError, match='Failed to get "write" lock'):
            diskimg.open(img, "r+", format="raw")


def test_qemu_img_sees_diskimg_writer(make_image, qemu_img: str, qemu_io: str, run) -> None:
    img = make_image("held.qcow2", "qcow2", "1M")
    with diskimg.open(img, "r+", format="raw"):  # raw view, so only the lock matters
        res = run([qemu_img, "info", img], check=1)
        assert 'Failed to get shared "write" lock' in res.stderr
        assert f"Is another process using the image [{img}]?" in res.stderr
        run([qemu_img, "info", "-U", img])  # force-share works
        res = run([qemu_io, "-f", "qcow2", "-c", "read 0 512", img], check=1)
        assert 'Failed to get "write" lock' in res.stderr
    run([qemu_img, "info", img])  # released on close


def test_qemu_img_resize_fails_against_diskimg_reader(make_image, qemu_img: str, run) -> None:
    img = make_image("r.raw", "raw", "1M")
    with diskimg.open(img, "r"):
        res = run([qemu_img, "resize", "-f", "raw", img, "2M"], check=1)
        assert 'Failed to get "write" lock' in res.stderr
    run([qemu_img, "resize", "-q", "-f", "raw", img, "2M"])



@pytest.mark.parametrize("ltype, start, length", [(0, 100, 1), (1, 201, 1), (2, 100, 200),
                                                  (1, (1 << 63) - 1, 0)])
def test_flock_layout_is_structs(ltype: int, start: int, length: int) -> None:
    """The ``struct flock`` lock.py builds without the struct module is byte for byte the
    one ``struct.pack("hhqqi4x", ...)`` gives (native order, padding included); and
    ``_fcntl`` reads ``l_type`` back from it."""
    import struct

    from diskimg.hostio import lock

    want = struct.pack("hhqqi4x", ltype, 0, start, length, 0)
    got = lock._flock(ltype, start, length)
    assert got == want
    assert struct.unpack("hhqqi4x", got)[0] == int.from_bytes(got[:2], "little"
                                                              if struct.pack("=h", 1)[0]
                                                              else "big", signed=True)
