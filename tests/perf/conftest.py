"""Fixtures shared by the start-up tests (test_import_shape.py, test_startup_imports.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import diskimg


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB qcow2 (made by diskimg) with one 64 KiB cluster of ``x`` at 1 MiB."""
    path = tmp_path_factory.mktemp("imports") / "a.qcow2"
    diskimg.create(path, "qcow2", 1 << 30)
    with diskimg.open(path, "r+") as img:
        img.write(1 << 20, b"x" * 65536)
    return path
