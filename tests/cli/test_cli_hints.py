"""Issue 17 item 8: the small things a new user trips on."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg


def _di(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                          text=True, check=False)


@pytest.mark.parametrize("opt", ["--untrusted", "--debug"])
def test_global_option_after_the_command_says_where_it_goes(tmp_path: Path, opt: str) -> None:
    img = tmp_path / "a.qcow2"
    diskimg.create(str(img), "qcow2", 1 << 20)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    r = _di("check", opt, str(img))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"diskimg: unrecognized option '{opt}'",
        "Try 'diskimg --help' for more information",
        f"diskimg: note: '{opt}' is a global option: put it before the sub-command "
        f"(diskimg {opt} COMMAND ...)"]
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    # and where it belongs it works
    assert _di(opt, "check", str(img)).returncode == 0


def test_other_unknown_options_get_no_note() -> None:
    r = _di("check", "--bogus", "x")
    assert r.returncode == 1
    assert "note:" not in r.stderr


def test_dd_help_explains_its_operands() -> None:
    r = _di("dd", "--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for operand in ("if=IN", "of=OUT", "bs=N", "count=N", "skip=N"):
        assert any(ln.strip().startswith(operand + " ") for ln in lines), operand
    assert any("default 512" in ln for ln in lines)  # qemu-img dd's default block size
