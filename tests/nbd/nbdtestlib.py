"""What the NBD tests share besides the fixtures (tests/nbd/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

NBD_TOOLS = all(shutil.which(t) for t in ("qemu-nbd", "nbdinfo", "nbdcopy", "qemu-img"))
needs_nbd_tools = pytest.mark.skipif(not NBD_TOOLS,
                                     reason="qemu-nbd/nbdinfo/nbdcopy/qemu-img absent")

#: ``with serve(path, *args, fmt="qcow2") as sock:`` (the diskimg_nbd/qemu_nbd fixtures)
Serve = Callable[..., AbstractContextManager[str]]


def uri(sock: str, name: str = "") -> str:
    """The NBD URI of export ``name`` on Unix socket ``sock``."""
    return f"nbd+unix:///{name}?socket={sock}"
