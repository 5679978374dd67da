"""A failed convert removes every file it created: the image, and the vmdk extents or the
qcow2 data file made with it; files that were there before stay byte-identical."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from qemukit import QEMU

pytestmark = pytest.mark.qemu


def _broken_source(d: Path) -> Path:
    """A qcow2 whose data runs past its truncated end: the copy fails part-way."""
    src = d / "src.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", str(src), "4M")
    QEMU.io(src, "write -P 1 0 4M")
    with open(src, "r+b") as f:
        f.truncate(300000)
    return src


def _tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}


@pytest.mark.parametrize("fmt, opts", [
    ("qcow2", "data_file=new.raw"),
    ("vmdk", "subformat=monolithicFlat"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"),
])
def test_failed_convert_removes_every_file_it_created(tmp_path: Path, fmt: str,
                                                       opts: str) -> None:
    src = _broken_source(tmp_path)
    (tmp_path / "keep.raw").write_bytes(b"x" * 4096)  # an unrelated file nearby
    before = _tree(tmp_path)
    r = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", fmt, "-o", opts,
                        str(src), str(tmp_path / f"out.{fmt}")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1, r.stderr
    assert "lies past the end" in r.stderr
    assert _tree(tmp_path) == before


def test_a_data_file_that_existed_is_kept(tmp_path: Path) -> None:
    src = _broken_source(tmp_path)
    (tmp_path / "old.raw").write_bytes(b"y" * 8192)
    r = subprocess.run([sys.executable, "-m", "diskimg", "convert", "-O", "qcow2", "-o",
                        "data_file=old.raw", str(src), str(tmp_path / "out.qcow2")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert not (tmp_path / "out.qcow2").exists()
    assert (tmp_path / "old.raw").exists()  # it was there before: not ours to remove
