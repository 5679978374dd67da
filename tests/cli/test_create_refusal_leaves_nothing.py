"""A create that fails after it made its file removes that file again: a refusal leaves the
directory as it was (qemu-img leaves an empty or partial file behind).  A file that existed
before is never removed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    ["create", "-f", "vmdk", "big.vmdk", "1E"],
    ["create", "-f", "luks", "--object", "secret,id=s,data=pw", "-o", "key-secret=s",
     "big.luks", "1E"],
    ["create", "-f", "raw", "big.raw", "1E"],
    ["create", "-f", "qcow2", "big.qcow2", "1E"],
]


def _di(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskimg", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", CASES, ids=lambda a: a[2])
def test_failed_create_removes_the_file_it_made(tmp_path: Path, args: list[str]) -> None:
    r = _di(*args, cwd=tmp_path)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", CASES, ids=lambda a: a[2])
def test_failed_create_over_an_existing_file_keeps_it(tmp_path: Path,
                                                      args: list[str]) -> None:
    target = tmp_path / args[-2]
    target.write_bytes(b"someone's data" * 100)
    r = _di(*args, cwd=tmp_path)
    assert r.returncode == 1, r
    assert target.exists()  # never unlinked: the name was not ours to remove
