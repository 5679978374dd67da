"""The file-object view of an image (``as_file()`` / ``DeviceIO``) and BlockDevice rules,
exercised through a raw image so only device.py's machinery is under test."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import diskimg
from diskimg.device import DeviceIO, MapEntry
from diskimg.errors import UsageError

SIZE = 1 << 20

@pytest.fixture
def raw_img(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    p = tmp_path / "disk.raw"
    p.write_bytes(data)
    return p, data


def test_as_file_reads_sequentially_and_hits_eof(raw_img) -> None:
    p, data = raw_img
    with diskimg.open(p, format="raw") as img, img.as_file() as f:
        assert f.read(10) == data[:10]
        assert f.tell() == 10
        assert f.read() == data[10:]
        assert f.read(1) == b""  # past the end: empty, not an error
        assert f.read() == b""


def test_as_file_seek_semantics(raw_img) -> None:
    p, data = raw_img
    with diskimg.open(p, format="raw") as img, img.as_file() as f:
        assert f.seekable()
        assert f.seek(-100, io.SEEK_END) == SIZE - 100
        assert f.read() == data[-100:]
        assert f.seek(SIZE + 4096) == SIZE + 4096  # seeking past the end is allowed
        assert f.read(10) == b""
        f.seek(1000)
        assert f.seek(24, io.SEEK_CUR) == 1024
        assert f.read(4) == data[1024:1028]
        with pytest.raises((ValueError, OSError)):
            f.seek(-1)


def test_as_file_write_through_to_the_image(raw_img) -> None:
    p, data = raw_img
    with diskimg.open(p, "r+", format="raw") as img:
        f = img.as_file()
        assert f.writable()
        f.seek(4096)
        f.write(b"hello world")
        f.seek(SIZE - 3)
        f.write(b"end")
        f.flush()
        assert img.read(4096, 11) == b"hello world"
        f.seek(SIZE - 2)
        with pytest.raises(OSError):
            f.write(b"toolong")
            f.flush()
    got = p.read_bytes()
    assert len(got) == SIZE  # a disk never grows by writing through its file view
    assert got[4096:4107] == b"hello world"
    assert got[-3:] == b"end"
    assert got[:4096] == data[:4096]


def test_read_only_file_view_is_not_writable(raw_img) -> None:
    p, _ = raw_img
    with diskimg.open(p, format="raw") as img:
        raw = DeviceIO(img)
        assert raw.readable() and not raw.writable()
        with pytest.raises(UsageError):
            img.write(0, b"x")


def test_shutil_copyfileobj_gives_identical_bytes(raw_img, tmp_path: Path) -> None:
    p, data = raw_img
    out = tmp_path / "copy"
    with diskimg.open(p, format="raw") as img, img.as_file() as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g, 65536 + 3)  # an odd chunk size on purpose
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_tarfile_can_archive_the_disk_as_a_member(raw_img, tmp_path: Path) -> None:
    p, data = raw_img
    tar = tmp_path / "disk.tar"
    with diskimg.open(p, format="raw") as img, img.as_file() as f, tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("disk.img")
        info.size = img.size
        t.addfile(info, f)
    with tarfile.open(tar) as t:
        member = t.extractfile("disk.img")
        assert member is not None
        assert member.read() == data


def test_tarfile_reads_an_archive_stored_inside_an_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        payload = b"inside the image\n" * 100
        ti = tarfile.TarInfo("note.txt")
        ti.size = len(payload)
        t.addfile(ti, io.BytesIO(payload))
    p = tmp_path / "tar.raw"
    p.write_bytes(buf.getvalue().ljust(SIZE, b"\0"))
    with diskimg.open(p, format="raw") as img, tarfile.open(fileobj=img.as_file()) as t:
        assert t.getnames() == ["note.txt"]
        assert t.extractfile("note.txt").read() == payload  # type: ignore[union-attr]


def test_out_of_range_requests_are_usage_errors(raw_img) -> None:
    p, _ = raw_img
    with diskimg.open(p, "r+", format="raw") as img:
        for call in (lambda: img.read(SIZE - 1, 2), lambda: img.read(-1, 1),
                     lambda: img.write(SIZE, b"x"), lambda: img.write_zeroes(0, SIZE + 1),
                     lambda: img.discard(SIZE, 1)):
            with pytest.raises(UsageError, match="outside the image"):
                call()
        assert img.read(SIZE, 0) == b""  # empty requests at the end are fine


def test_readinto_accepts_bytearray_and_memoryview(raw_img) -> None:
    p, data = raw_img
    with diskimg.open(p, format="raw") as img:
        ba = bytearray(100)
        assert img.readinto(50, ba) == 100
        assert bytes(ba) == data[50:150]
        mv = memoryview(bytearray(200))[10:110]
        img.readinto(0, mv)
        assert mv.tobytes() == data[:100]


def test_close_is_idempotent_and_context_manager_closes(raw_img) -> None:
    p, _ = raw_img
    img = diskimg.open(p, "r+", format="raw")
    with img:
        pass
    img.close()
    # closed means unlocked: a new writer gets in
    with diskimg.open(p, "r+", format="raw"):
        pass


def test_map_entry_to_json_matches_qemu_keys() -> None:
    e = MapEntry(0, 512, 0, True, False, True, 4096, "x")
    assert e.to_json() == {"start": 0, "length": 512, "depth": 0, "present": True,
                           "zero": False, "data": True, "offset": 4096}
    assert "offset" not in MapEntry(0, 512, 1, False, True, False).to_json()
