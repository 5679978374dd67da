"""Helpers for the CLI tests: run diskimg in-process, run qemu-img, build sample images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.cli.main import main

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")

try:
    import diskimg.qcow2.image  # noqa: F401

    HAVE_QCOW2 = True
except ImportError:  # pragma: no cover - while qcow2 is being written
    HAVE_QCOW2 = False
needs_qcow2 = pytest.mark.skipif(not HAVE_QCOW2, reason="diskimg.qcow2.image not importable")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> object:
        return json.loads(self.out)

    def err_lines(self) -> list[str]:
        return self.err.splitlines()


@pytest.fixture
def di(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run ``diskimg ARGS`` in-process in a directory; returns a :class:`Result`."""

    def run(*args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        rc = main(list(args))
        cap = capsys.readouterr()
        return Result(rc, cap.out, cap.err)

    return run


def qemu(*args: str, cwd: Path) -> Result:
    """Run ``qemu-img ARGS``; program name in output replaced by ``diskimg``."""
    p = QEMU.img(*args, ok=None, cwd=cwd, timeout=60)
    return Result(p.returncode, p.stdout.replace("qemu-img", "diskimg"),
                  p.stderr.replace("qemu-img", "diskimg"))


def run_module(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m diskimg ARGS`` in a subprocess."""
    e = dict(os.environ)
    e.pop("DISKIMG_DEBUG", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "diskimg", *args], cwd=cwd,
                       capture_output=True, timeout=60, env=e)  # bytes: keep "\r" as is
    return Result(p.returncode, p.stdout.decode(), p.stderr.decode())


def make_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    """A sparse raw file of ``size`` bytes with ``writes`` (offset, data) applied."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


SAMPLE_WRITES = [(1 << 20, b"\xab" * 65536), (3 << 20, b"\x01" * 4096),
                 (5 << 20, b"\x02" * 512)]


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """A 6 MiB sparse raw image with three data runs, in its own directory."""
    d = tmp_path / "img"
    d.mkdir()
    return make_raw(d / "s.raw", 6 << 20, SAMPLE_WRITES)


@pytest.fixture
def twin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two empty directories: one for qemu-img, one for diskimg, same relative names."""
    a, b = tmp_path / "qemu", tmp_path / "diskimg"
    a.mkdir()
    b.mkdir()
    return a, b
