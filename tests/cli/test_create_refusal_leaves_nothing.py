"""A create that fails after it made its file removes that file again: a refusal leaves the
directory as it was (qemu-img leaves an empty or partial file behind).  A file that existed
before is never removed, and keeps every byte (qemu-img empties it first)."""

from __future__ import annotations

import hashlib
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
    # refused only when the file system is asked for the size (EFBIG): after the lock
    ["create", "-f", "vmdk", "huge.vmdk", "2E"],
    ["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1E"],
    ["create", "-f", "qcow2", "-o", "preallocation=falloc", "pre.qcow2", "1E"],
    ["create", "-f", "luks", "--object", "secret,id=s,data=pw", "-o", "key-secret=s",
     "huge.luks", "4E"],
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
    data = b"someone's data" * 100
    target.write_bytes(data)
    r = _di(*args, cwd=tmp_path)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    # never unlinked (the name was not ours to remove), never emptied: every byte kept
    assert hashlib.sha256(target.read_bytes()).hexdigest() == \
        hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_raw_create_with_an_unknown_option_creates_nothing(tmp_path: Path) -> None:
    """qemu-img checks -o before it makes the file: no file, and an existing one kept."""
    r = _di("create", "-f", "raw", "-o", "bogus=1", "new.raw", "1M", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "diskimg: new.raw: Invalid parameter 'bogus'\n")
    assert not (tmp_path / "new.raw").exists()
    old = tmp_path / "old.raw"
    old.write_bytes(b"x" * 4096)
    r = _di("create", "-f", "raw", "-o", "bogus=1", "old.raw", "1M", cwd=tmp_path)
    assert r.returncode == 1
    assert old.read_bytes() == b"x" * 4096
