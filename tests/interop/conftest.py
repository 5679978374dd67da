"""Helpers for differential tests against qemu-img / qemu-io (every test here is ``qemu``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and (QEMU_IMG is None or QEMU_IO is None):
            item.add_marker(pytest.mark.skip(reason="qemu-img/qemu-io not installed"))


@pytest.fixture
def qemu_json() -> Callable[..., Any]:
    """``qemu_json("map", "-f", "raw", path)`` -> parsed ``--output=json`` of qemu-img."""

    def call(sub: str, *args: str | Path) -> Any:
        if QEMU_IMG is None:
            pytest.skip("qemu-img not installed")
        return QEMU.json(sub, *args)

    return call


@pytest.fixture
def qemu_io_cmds() -> Callable[..., str]:
    """``qemu_io_cmds(path, "raw", "write -P 0xab 0 4k", ...)`` runs qemu-io commands and
    returns stdout; fails the test if qemu-io reports a pattern mismatch or an error."""

    def call(path: str | Path, fmt: str, *cmds: str, read_only: bool = False) -> str:
        if QEMU_IO is None:
            pytest.skip("qemu-io not installed")
        res = QEMU.io(path, *cmds, fmt=fmt, read_only=read_only)
        out = res.stdout + res.stderr
        assert "failed" not in out.lower() and "error" not in out.lower(), out
        return res.stdout

    return call


@pytest.fixture(scope="module")
def bitmaps_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 MiB qcow2 with three persistent bitmaps made by qemu: ``b`` (64 KiB, enabled),
    ``c`` (1 MiB, disabled, ``b`` merged into it) and ``f`` (512 B, enabled), dirty near
    both ends and in the middle (qemu-io writes)."""
    p = tmp_path_factory.mktemp("bitmaps") / "bitmaps.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p, "10M")
    QEMU.img("bitmap", "--add", p, "b")
    QEMU.img("bitmap", "--add", "-g", "1M", "--disable", p, "c")
    QEMU.img("bitmap", "--add", "-g", "512", p, "f")
    QEMU.io(p, "write -P 7 0 64k", "write -P 8 9M 1M", "write -P 9 5000k 1k")
    QEMU.img("bitmap", "--merge", "b", p, "c")
    return p


@pytest.fixture
def turns_at_the_edges(tmp_path: Path) -> Callable[[Path, str, int], None]:
    """Two writers on ``img`` (format ``fmt``, ``size`` bytes): qemu-io writes at offset 0
    and the last 512 bytes, diskimg reads every byte back and writes at 64 KiB, and
    qemu-img's raw conversion holds every byte of both."""

    def turns(img: Path, fmt: str, size: int) -> None:
        import diskimg

        QEMU.io(img, "write -P 0x11 0 4k", f"write -P 0x22 {size - 512} 512", fmt=fmt)
        with diskimg.open(img, "r+") as d:
            got = d.read(0, size)
            d.write(65536, b"\x33" * 4096)
        want = bytearray(size)
        want[:4096] = b"\x11" * 4096
        want[size - 512:] = b"\x22" * 512
        assert got == bytes(want)
        want[65536:65536 + 4096] = b"\x33" * 4096
        ref = tmp_path / "turns-ref.raw"
        QEMU.img("convert", "-f", fmt, "-O", "raw", img, ref)
        assert ref.read_bytes() == bytes(want)
        ref.unlink()

    return turns
