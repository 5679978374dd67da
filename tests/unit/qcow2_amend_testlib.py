"""Helpers shared by the tests/unit/test_qcow2_amend_*.py modules (no tests here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import diskimg


def guest_sha256(p: Path) -> str:
    """sha256 of every guest byte of the image at ``p`` (through its backing chain)."""
    with diskimg.open(p) as d:
        return hashlib.sha256(d.read(0, d.size)).hexdigest()


def assert_clean(p: Path, **kw: object) -> None:
    """diskimg's check finds no corruption, leak or check error."""
    rep = diskimg.check(p, **kw)  # type: ignore[arg-type]
    assert (rep.corruptions, rep.leaks, rep.check_errors) == (0, 0, 0)
