"""raw images, differential against qemu-io / qemu-img: what one writes the other reads, and
``map``/``info`` JSON equal qemu-img's as parsed objects."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import diskimg

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20


def test_diskimg_reads_what_qemu_io_wrote(make_image, qemu_io_cmds) -> None:
    img = make_image("q.raw", "raw", "8M")
    qemu_io_cmds(img, "raw",
                 "write -P 0xab 0 64k",
                 "write -P 0xcd 1000 3000",       # unaligned, overlaps the first write
                 "write -P 0xef 7M 1M",
                 "write -z 32k 16k",
                 "discard 7340032 4096")
    with diskimg.open(img) as d:
        assert d.read(0, 1000) == b"\xab" * 1000
        assert d.read(1000, 3000) == b"\xcd" * 3000
        assert d.read(4000, 32 * KiB - 4000) == b"\xab" * (32 * KiB - 4000)
        assert d.read(32 * KiB, 16 * KiB) == bytes(16 * KiB)
        assert d.read(48 * KiB, 16 * KiB) == b"\xab" * 16 * KiB
        assert d.read(64 * KiB, 7 * MiB - 64 * KiB) == bytes(7 * MiB - 64 * KiB)
        assert d.read(7 * MiB, 4096) == bytes(4096)  # qemu-io discard on raw punches a hole
        assert d.read(7 * MiB + 4096, MiB - 4096) == b"\xef" * (MiB - 4096)
        assert d.read(0, d.size) == Path(img).read_bytes()


def test_qemu_io_verifies_what_diskimg_wrote(make_image, qemu_io_cmds) -> None:
    img = make_image("d.raw", "raw", "4M", tool="diskimg")
    with diskimg.open(img, "r+") as d:
        d.write(0, b"\x11" * 4096)
        d.write(5000, b"\x22" * 70_000)
        d.write(MiB, b"\x33" * MiB)
        d.write_zeroes(MiB + 4096, 8192)
        d.write_zeroes(MiB + 65536, 65536, may_unmap=True)
        d.discard(3 * MiB, 4096)
        d.as_file().write(b"\x44" * 512)  # through the file view, at offset 0
    qemu_io_cmds(img, "raw",
                 "read -P 0x44 0 512",
                 "read -P 0x11 512 3584",
                 "read -P 0x00 4096 904",
                 "read -P 0x22 5000 70000",
                 "read -P 0x33 1M 4096",
                 "read -P 0x00 1052672 8192",
                 "read -P 0x33 1060864 53248",
                 "read -P 0x00 1114112 65536",
                 "read -P 0x33 1179648 917504",
                 "read -P 0x00 3M 1M",
                 read_only=True)


def _layout_empty(p: Path) -> None:
    p.write_bytes(b"")
    os.truncate(p, 4 * MiB)


def _layout_full(p: Path) -> None:
    p.write_bytes(os.urandom(2 * MiB))


def _layout_sparse_odd_size(p: Path) -> None:
    with open(p, "wb") as f:
        f.truncate(3 * MiB + 1000)  # not a multiple of 512: qemu rounds the virtual size up
        f.seek(65536)
        f.write(b"a" * 5000)
        f.seek(3 * MiB)
        f.write(b"x" * 1000)


def _layout_written_zeros(p: Path) -> None:
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(bytes(2 * MiB))  # allocated zeros are data for raw, as in qemu
        f.seek(6 * MiB)
        f.write(b"\xff" * 4096)


def _layout_by_diskimg(p: Path) -> None:
    diskimg.create(p, "raw", 6 * MiB)
    with diskimg.open(p, "r+", format="raw") as d:
        d.write(0, os.urandom(MiB))
        d.write_zeroes(4096, 65536, may_unmap=True)
        d.write_zeroes(200 * KiB, 8192)
        d.discard(512 * KiB, 128 * KiB)
        d.write(5 * MiB + 123, b"z" * 777)


def _layout_falloc(p: Path) -> None:
    diskimg.create(p, "raw", 2 * MiB, options={"preallocation": "falloc"})


def _layout_full_prealloc(p: Path) -> None:
    diskimg.create(p, "raw", 2 * MiB, options={"preallocation": "full"})


LAYOUTS: dict[str, Callable[[Path], None]] = {
    "empty": _layout_empty,
    "full": _layout_full,
    "sparse-odd-size": _layout_sparse_odd_size,
    "written-zeros": _layout_written_zeros,
    "by-diskimg": _layout_by_diskimg,
    "falloc": _layout_falloc,
    "full-prealloc": _layout_full_prealloc,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_map_json_equals_qemu_img_map(layout: str, tmp_path: Path, qemu_json,
                                      monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = Path("img.raw")  # relative, as a user would type it
    LAYOUTS[layout](p)
    with diskimg.open(p) as d:
        ours = [e.to_json() for e in d.map()]
    assert ours == qemu_json("map", "-f", "raw", p)


@pytest.mark.parametrize(("start", "length"), [(0, 4096), (65536, 1), (1000, 70000),
                                               (3 * MiB, 10 * MiB)])
def test_map_window_equals_qemu_img_map_with_offsets(start: int, length: int, tmp_path: Path,
                                                     qemu_json) -> None:
    p = tmp_path / "img.raw"
    _layout_sparse_odd_size(p)
    with diskimg.open(p) as d:
        ours = [e.to_json() for e in d.map(start, length)]
    theirs = qemu_json("map", "-f", "raw", f"--start-offset={start}", f"--max-length={length}", p)
    assert ours == theirs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_info_json_equals_qemu_img_info(layout: str, tmp_path: Path, qemu_json,
                                        monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = Path("img.raw")
    LAYOUTS[layout](p)
    with diskimg.open(p) as d:
        ours = d.info().to_json()
    theirs = qemu_json("info", "-f", "raw", p)
    assert ours == theirs
    assert list(ours) == list(theirs)  # same key order as qemu prints


def test_info_json_with_absolute_path(tmp_path: Path, qemu_json) -> None:
    p = tmp_path / "abs.raw"
    _layout_full(p)
    with diskimg.open(p) as d:
        assert d.info().to_json() == qemu_json("info", "-f", "raw", p)


def test_qemu_img_compare_identical_after_diskimg_copy(tmp_path: Path, run, qemu_img) -> None:
    src = tmp_path / "src.raw"
    _layout_by_diskimg(src)
    dst = tmp_path / "dst.raw"
    diskimg.create(dst, "raw", 6 * MiB)
    with diskimg.open(src) as s, diskimg.open(dst, "r+") as d:
        for e in s.map():
            if e.data:
                d.write(e.start, s.read(e.start, e.length))
    res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, dst])
    assert res.stdout.strip() == "Images are identical."
    assert dst.stat().st_blocks < src.stat().st_blocks + 8  # holes stayed holes
