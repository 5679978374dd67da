"""Fixtures for the NBD tests: ``diskimg nbd`` and ``qemu-nbd`` serving an image on a Unix
socket in a short temporary directory (socket paths are limited to 108 bytes), always
stopped when the test ends (tests/qemukit.py ``serving``)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemukit import serving

from tests.nbd.nbdtestlib import Serve


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="nbdt")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def diskimg_nbd(sockdir: Path) -> Serve:
    """``with diskimg_nbd(path, *args, fmt="qcow2") as sock:``: ``diskimg nbd -t ARGS``
    serving ``path`` on a fresh socket while the block runs."""
    count = [0]

    @contextmanager
    def serve(path: object, *args: str, fmt: str | None = "qcow2",
              persistent: bool = True) -> Iterator[str]:
        count[0] += 1
        sock = str(sockdir / f"d{count[0]}.sock")
        argv = [sys.executable, "-m", "diskimg", "nbd", *(["-t"] if persistent else []),
                *args, *(["-f", fmt] if fmt else []), "-k", sock, str(path)]
        with serving(argv, sock):
            yield sock

    return serve


@pytest.fixture
def qemu_nbd(sockdir: Path) -> Serve:
    """The same for ``qemu-nbd -t`` (the oracle)."""
    from qemukit import QEMU

    count = [0]

    @contextmanager
    def serve(path: object, *args: str, fmt: str | None = "qcow2") -> Iterator[str]:
        count[0] += 1
        sock = str(sockdir / f"q{count[0]}.sock")
        with QEMU.nbd(str(path), *args, fmt=fmt, sock=sock):
            yield sock

    return serve
