"""Fixtures of the robustness tests: base images to mutate, a sandboxed worker process.

The helper modules (``robustlib``, ``robust_worker``, ``crash_child``) live beside this file
and are imported by name (the suite runs with ``--import-mode=importlib``, so this
directory is put on ``sys.path`` here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import robustlib  # noqa: E402


@pytest.fixture(scope="session")
def qcow2_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, robustlib.BaseImage]:
    if not (robustlib.QEMU_IMG and robustlib.QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed")
    return robustlib.build_qcow2_bases(tmp_path_factory.mktemp("qcow2-bases"))


@pytest.fixture(scope="session")
def vmdk_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, robustlib.BaseImage]:
    if not (robustlib.QEMU_IMG and robustlib.QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed")
    return robustlib.build_vmdk_bases(tmp_path_factory.mktemp("vmdk-bases"))


@pytest.fixture(scope="module")
def worker() -> Iterator[robustlib.Worker]:
    w = robustlib.Worker(mem_mb=int(os.environ.get("DISKIMG_FUZZ_MEM_MB", "1024")),
                         time_limit=float(os.environ.get("DISKIMG_FUZZ_TIME_LIMIT", "20")))
    try:
        yield w
    finally:
        w.close()
