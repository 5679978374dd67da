"""raw's ``offset=``/``size=`` image options (a disk inside an OVA or a tar) against
qemu-img 7.2 and qemu-io: info, map, convert in and out of the window, writes inside it,
writes past it and windows past the end of the file refused (every byte unchanged)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

from .conftest import make_raw, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

FILE = 1 << 20
WRITES = [(4096, b"\x11" * 4096), (200000, b"hello"), (700000, b"x"), (FILE - 512, b"\xee" * 512)]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "s.raw", FILE, WRITES)


def opts(offset: str | None = None, size: str | None = None, name: str = "s.raw",
         driver: bool = True) -> str:
    parts = ["driver=raw"] if driver else []
    if offset is not None:
        parts.append(f"offset={offset}")
    if size is not None:
        parts.append(f"size={size}")
    return ",".join([*parts, f"file.filename={name}"])


WINDOWS = [("65536", "786432"), ("4k", "64k"), ("100", None), (None, "512"),
           ("0", None), (str(FILE), None), ("65536", "0")]


@pytest.mark.parametrize(("offset", "size"), WINDOWS)
def test_info_and_map_match_qemu(di, disk: Path, offset: str | None,
                                 size: str | None) -> None:
    spec = opts(offset, size)
    argvs = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"]]
    if offset == "100":
        argvs = argvs[:2]  # qemu-img 7.2's map aborts (assertion `bytes') on this window
    for argv in argvs:
        mine = di(*argv, "--image-opts", spec, cwd=disk.parent)
        ref = qemu(*argv, "--image-opts", spec, cwd=disk.parent)
        assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err), argv


@pytest.mark.parametrize("spec", [
    opts("65536", "2000000"), opts("2000000"), opts("100", "1000"), opts("-1"),
    opts(None, "abc"), opts("100", driver=False).replace("s.raw", "q.qcow2"),
    opts("0", None) + ",cache.foo=1",
])
def test_bad_windows_refused_as_qemu(di, disk: Path, spec: str) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", disk.parent / "q.qcow2", "1M")
    make_raw(disk.parent / "src.raw", 4096, [(0, b"\x77" * 4096)])
    before = {p.name: sha(p) for p in disk.parent.iterdir()}
    for argv in (["info"],):
        mine = di(*argv, "--image-opts", spec, cwd=disk.parent)
        ref = qemu(*argv, "--image-opts", spec, cwd=disk.parent)
        assert mine.rc == ref.rc == 1
        assert mine.err == ref.err
    mine = di("convert", "-n", "--target-image-opts", "-f", "raw", "src.raw", spec,
              cwd=disk.parent)
    ref = qemu("convert", "-n", "--target-image-opts", "-f", "raw", "src.raw", spec,
               cwd=disk.parent)
    assert mine.rc == ref.rc == 1 and mine.err == ref.err
    assert {p.name: sha(p) for p in disk.parent.iterdir()} == before


def test_convert_out_of_and_into_the_window(di, disk: Path) -> None:
    d = disk.parent
    spec = opts("65536", "786432")
    assert di("convert", "-O", "raw", "--image-opts", spec, "mine.raw", cwd=d).rc == 0
    QEMU.img("convert", "-O", "raw", "--image-opts", spec, "ref.raw", cwd=d)
    assert (d / "mine.raw").read_bytes() == (d / "ref.raw").read_bytes() == \
        disk.read_bytes()[65536:65536 + 786432]
    # into the window of a copy: the bytes outside it stay as they were
    QEMU.img("create", "-q", "-f", "qcow2", d / "t.qcow2", "768k")
    QEMU.io(d / "t.qcow2", "write -P 0x5c 4k 8k", "write -z 196k 64k")
    for who, name in (("mine", "a.raw"), ("ref", "b.raw")):
        shutil.copyfile(disk, d / name)
        argv = ["convert", "-n", "--target-image-opts", "-f", "qcow2", "t.qcow2",
                opts("65536", "786432", name)]
        res = di(*argv, cwd=d) if who == "mine" else qemu(*argv, cwd=d)
        assert res.rc == 0, res.err
    assert sha(d / "a.raw") == sha(d / "b.raw")
    data = (d / "a.raw").read_bytes()
    assert data[:65536] == disk.read_bytes()[:65536]
    assert data[65536 + 4096:65536 + 12288] == b"\x5c" * 8192
    assert data[65536 + 786432:] == disk.read_bytes()[65536 + 786432:]


def test_writes_inside_the_window_match_qemu_io(disk: Path) -> None:
    d = disk.parent
    a, b = d / "a.raw", d / "b.raw"
    shutil.copyfile(disk, a)
    shutil.copyfile(disk, b)
    with diskimg.open(a, "r+", "raw", options={"offset": "4096", "size": "65536"}) as img:
        assert img.size == 65536
        img.write(0, b"\xaa" * 4096)
        img.write_zeroes(8192, 4096)
        img.write(65536 - 512, b"\xbb" * 512)
        assert img.read(0, 4) == b"\xaa" * 4
        before = sha(a)
        with pytest.raises(diskimg.DiskImgError):
            img.write(63 * 1024, b"\xcc" * 2048)  # crosses the end of the window
        with pytest.raises(diskimg.DiskImgError):
            img.read(65536, 512)
        assert sha(a) == before
    QEMU.io(opts("4096", "65536", str(b)), "write -P 0xaa 0 4k", "write -z 8k 4k",
            "write -P 0xbb 65024 512", image_opts=True)
    res = QEMU.io(opts("4096", "65536", str(b)), "write -P 0xcc 63k 2k", image_opts=True,
                  ok=None)
    assert "write failed" in res.stdout + res.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[:4096] == disk.read_bytes()[:4096]


def test_resize_of_a_window(di, disk: Path) -> None:
    d = disk.parent
    shutil.copyfile(disk, d / "b.raw")
    before = sha(disk)
    fixed = opts("4096", "65536")
    mine = di("resize", "--image-opts", fixed, "128k", cwd=d)
    ref = qemu("resize", "--image-opts", fixed.replace("s.raw", "b.raw"), "128k", cwd=d)
    assert (mine.rc, mine.err) == (ref.rc, ref.err) == (1, "diskimg: Cannot resize fixed-size "
                                                          "raw disks\n")
    assert sha(disk) == sha(d / "b.raw") == before
    mine = di("resize", "--image-opts", opts("4096"), "2M", cwd=d)
    ref = qemu("resize", "--image-opts", opts("4096", name="b.raw"), "2M", cwd=d)
    assert (mine.rc, mine.out) == (ref.rc, ref.out)
    assert disk.stat().st_size == (d / "b.raw").stat().st_size == 4096 + (2 << 20)
    assert disk.read_bytes() == (d / "b.raw").read_bytes()
