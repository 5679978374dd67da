"""LUKS data both ways with qemu-img 7.2, through each XTS kernel (the pure-Python default
and numpy's, ``diskimg[fast]``), at sizes where a request is split over two threads:
``diskimg convert -n`` raw -> LUKS qcow2 reads back in qemu as the raw bytes, and a LUKS
qcow2 qemu wrote converts back to the raw bytes; reads at odd offsets (the bounce buffer
path) agree too."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = pytest.mark.qemu

PW = "kernel-pass"
SECRET = ["--object", f"secret,id=s0,data={PW}"]
CREATE = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
MiB = 1 << 20

try:
    import numpy  # noqa: F401

    HAVE_NUMPY = True
except ImportError:
    HAVE_NUMPY = False

#: the CLI with numpy blocked (as if not installed): the pure-Python kernel
_PURE = ("import sys, runpy; sys.modules['numpy'] = None; sys.argv[0] = 'diskimg'; "
         "runpy.run_module('diskimg', run_name='__main__')")
KERNELS = [pytest.param("numpy", marks=pytest.mark.skipif(not HAVE_NUMPY,
                                                          reason="numpy not installed")),
           "pure"]


def _diskimg(kernel: str, *args: str | Path) -> None:
    argv = [sys.executable, *(["-m", "diskimg"] if kernel == "numpy" else ["-c", _PURE]),
            *map(str, args)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def _opts(path: Path) -> list[str]:
    return [*SECRET, "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"]


def _workload(path: Path) -> bytes:
    """3 MiB: random data (long runs: 2 MiB reads, 1 MiB encrypted writes), a hole, and
    a partial-cluster tail of data."""
    rnd = random.Random(20)
    data = bytearray(3 * MiB)
    data[: 2 * MiB + 4096] = rnd.randbytes(2 * MiB + 4096)
    data[2 * MiB + 66048 : 2 * MiB + 140000] = rnd.randbytes(140000 - 66048)
    path.write_bytes(data)
    return bytes(data)


def _target(path: Path) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"


@pytest.fixture(scope="module")
def qemu_luks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, bytes]:
    """(raw workload, an empty LUKS qcow2 qemu-img created, a copy qemu-img convert -n
    wrote the workload into, the workload's bytes).  Made once: qemu's LUKS creation
    benchmarks PBKDF2 for at least half a CPU-second (so would diskimg's: the tests write
    into copies of the empty image with ``convert -n`` instead)."""
    d = tmp_path_factory.mktemp("luks")
    raw = d / "in.raw"
    data = _workload(raw)
    empty = d / "empty.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", *SECRET, "-o", CREATE, empty, str(len(data)))
    img = d / "q.qcow2"
    shutil.copyfile(empty, img)
    QEMU.img("convert", "-n", *SECRET, "-f", "raw", raw, "--target-image-opts", _target(img))
    return raw, empty, img, data


@pytest.mark.parametrize("kernel", KERNELS)
def test_diskimg_luks_write_read_by_qemu(tmp_path: Path, kernel: str,
                                         qemu_luks: tuple[Path, Path, Path, bytes]) -> None:
    raw, empty, _, _ = qemu_luks
    out = tmp_path / "d.qcow2"
    shutil.copyfile(empty, out)
    _diskimg(kernel, "convert", "-n", *SECRET, "-f", "raw", raw, "--target-image-opts",
             _target(out))
    *extra, spec = _opts(out)
    assert QEMU.compare(spec, f"driver=raw,file.filename={raw}", *extra) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_qemu_luks_image_read_by_diskimg(tmp_path: Path, kernel: str,
                                         qemu_luks: tuple[Path, Path, Path, bytes]) -> None:
    _, _, img, data = qemu_luks
    back = tmp_path / "back.raw"
    _diskimg(kernel, "convert", *_opts(img), "-O", "raw", back)
    assert back.read_bytes() == data


def test_odd_reads_of_qemu_luks_image(qemu_luks: tuple[Path, Path, Path, bytes]) -> None:
    """Reads that start or end inside a sector (the bounce-buffer path) and long ones."""
    _, _, img, data = qemu_luks
    with diskimg.open(img, secrets={"s0": PW.encode()},
                      options={"encrypt.key-secret": "s0"}) as d:
        for off, n in ((1, 2 * MiB + 5000), (MiB - 7, 65536 + 13), (2 * MiB + 66000, 1000),
                       (0, 3 * MiB)):
            assert d.read(off, n) == data[off : off + n]
