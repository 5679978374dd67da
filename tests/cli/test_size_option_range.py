"""A size option past qemu's range names the option, as qemu-img's ``cvtnum`` does
(``Invalid rate limit specified. Must be between 0 and 9223372036854775807.``), not the
image size; nothing is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]


@pytest.mark.parametrize("args", [
    ["convert", "-r", "9E", "a.qcow2", "o.raw"],
    ["convert", "-S", "9E", "a.qcow2", "o.raw"],
    ["commit", "-r", "9E", "a.qcow2"],
    ["map", "--start-offset=9E", "a.qcow2"],
    ["map", "--max-length=9E", "a.qcow2"],
    ["dd", "count=9E", "if=a.qcow2", "of=o.raw"],
    ["dd", "skip=9E", "if=a.qcow2", "of=o.raw"],
    ["bitmap", "--add", "-g", "9E", "a.qcow2", "b0"],
    ["measure", "--size", "9E", "-O", "qcow2"],
    ["bench", "-o", "9E", "a.qcow2"],
], ids=lambda a: " ".join(a))
def test_out_of_range_size_option_matches_qemu(di, tmp_path: Path, args: list[str]) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    before = hashlib.sha256((tmp_path / "a.qcow2").read_bytes()).hexdigest()
    ref = qemu(*args, cwd=tmp_path)
    mine = di(*args, cwd=tmp_path)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert mine.rc == 1 and "Must be between 0 and 9223372036854775807." in mine.err
    assert hashlib.sha256((tmp_path / "a.qcow2").read_bytes()).hexdigest() == before
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("bs", ["9E", "0", "3G"])
def test_dd_bs_range_matches_qemu(di, tmp_path: Path, bs: str) -> None:
    """dd's bs= has qemu's own range, 1 to INT_MAX, in the same message form."""
    QEMU.img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    args = ["dd", f"bs={bs}", "if=a.qcow2", "of=o.raw"]
    ref = qemu(*args, cwd=tmp_path)
    mine = di(*args, cwd=tmp_path)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert "Must be between 1 and 2147483647." in mine.err
    assert not (tmp_path / "o.raw").exists()
