"""Shared setup for the lifecycle CLI tests: the same images built in two directories."""

from __future__ import annotations

import subprocess
from pathlib import Path


def sh(d: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=d, check=True, capture_output=True, text=True)


def qio(d: Path, name: str, *cmds: str) -> None:
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    sh(d, *args, name)


def create(d: Path, name: str, size: str | None, *opts: str) -> None:
    sh(d, "qemu-img", "create", "-f", "qcow2", *opts, name, *([size] if size else []))


def qmap(d: Path, name: str) -> str:
    return sh(d, "qemu-img", "map", "--output=json", name).stdout


def qcheck_clean(d: Path, name: str) -> None:
    p = subprocess.run(["qemu-img", "check", name], cwd=d, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def qcompare(a: Path, b: Path) -> int:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True
                          ).returncode
