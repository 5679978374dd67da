"""Shared setup for the lifecycle CLI tests: the same images built in two directories."""

from __future__ import annotations

from pathlib import Path

from qemukit import QEMU


def create(d: Path, name: str, size: str | None, *opts: str) -> None:
    QEMU.img("create", "-f", "qcow2", *opts, name, *([size] if size else []), cwd=d)
