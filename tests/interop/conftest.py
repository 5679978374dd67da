"""Helpers for differential tests against qemu-img / qemu-io (every test here is ``qemu``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def run_cmd(cmd: list[str | Path]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}: {res.stderr}"
    return res


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
        res = run_cmd([QEMU_IMG, sub, "--output=json", *args])
        return json.loads(res.stdout)

    return call


@pytest.fixture
def qemu_io_cmds() -> Callable[..., str]:
    """``qemu_io_cmds(path, "raw", "write -P 0xab 0 4k", ...)`` runs qemu-io commands and
    returns stdout; fails the test if qemu-io reports a pattern mismatch or an error."""

    def call(path: str | Path, fmt: str, *cmds: str, read_only: bool = False) -> str:
        if QEMU_IO is None:
            pytest.skip("qemu-io not installed")
        argv: list[str | Path] = [QEMU_IO, "-f", fmt]
        if read_only:
            argv.append("-r")
        for c in cmds:
            argv += ["-c", c]
        res = run_cmd([*argv, path])
        out = res.stdout + res.stderr
        assert "Pattern verification failed" not in out, out
        assert "failed" not in out.lower() and "error" not in out.lower(), out
        return res.stdout

    return call
