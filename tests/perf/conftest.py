"""Fixtures shared by the start-up tests (test_import_shape.py, test_startup_imports.py)
and the copy-loop tests (``readers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import diskimg


def _one_run(factory: pytest.TempPathFactory, fmt: str, size: int, byte: bytes) -> Path:
    """A ``fmt`` image of ``size`` bytes (made by diskimg): 64 KiB of ``byte`` at 1 MiB."""
    path = factory.mktemp("imports") / f"a.{fmt}"
    diskimg.create(path, fmt, size)
    with diskimg.open(path, "r+") as img:
        img.write(1 << 20, byte * 65536)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB qcow2 (made by diskimg) with one 64 KiB cluster of ``x`` at 1 MiB."""
    return _one_run(tmp_path_factory, "qcow2", 1 << 30, b"x")


@pytest.fixture(scope="module")
def vmdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB monolithicSparse vmdk (made by diskimg): one 64 KiB grain run of ``v`` at
    1 MiB."""
    return _one_run(tmp_path_factory, "vmdk", 64 << 20, b"v")


@pytest.fixture
def readers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The read-ahead readers (``ops.readahead._ReadAhead``) started during the test, in
    order: each runs on a ``_thread`` thread (no ``threading.Thread``, so
    ``threading.enumerate`` does not list it), ``ident`` its thread id, and its
    ``running`` lock is held while it runs."""
    from diskimg.ops import readahead

    started: list[Any] = []
    real = readahead._ReadAhead.__enter__

    def enter(self: Any) -> Any:
        started.append(self)
        return real(self)

    monkeypatch.setattr(readahead._ReadAhead, "__enter__", enter)
    return started
