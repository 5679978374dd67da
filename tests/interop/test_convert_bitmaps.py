"""``convert --bitmaps`` / ``--skip-broken-bitmaps`` against qemu-img 7.2: the same
bitmaps (qemu-img info), the same dirty extents (qemu-nbd + nbdinfo), clean images, and
the same refusals, each made before any target file exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd")
                                      and shutil.which("nbdinfo")),
                                 reason="qemu-img/qemu-nbd/nbdinfo absent")]


def _ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskimg", "convert", *map(str, args)],
                          capture_output=True, text=True, check=False)


def _words(text: str) -> str:
    """The text with each program's own name (its prefix, and the commands it suggests:
    ``use 'qemu-img bitmap --remove'``) replaced, as each names itself."""
    return re.sub(r"\b(qemu-img|diskimg)\b", "PROG", text)


def test_convert_bitmaps_like_qemu(tmp_path: Path, bitmaps_image: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    QEMU.img("convert", "--bitmaps", "-O", "qcow2", bitmaps_image, theirs)
    res = _ours("--bitmaps", "-O", "qcow2", bitmaps_image, ours)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    QEMU.check_clean(ours)
    assert QEMU.compare(ours, bitmaps_image) == 0
    assert QEMU.info(ours)["format-specific"] == QEMU.info(theirs)["format-specific"]
    with diskimg.open(ours) as d:
        for name in ("b", "c", "f"):
            got = list(d.dirty_extents(name))
            assert got and got == QEMU.dirty_map(theirs, name) == QEMU.dirty_map(ours, name)


def test_convert_skip_broken_bitmaps_like_qemu(tmp_path: Path, bitmaps_image: Path) -> None:
    src = tmp_path / "src.qcow2"
    shutil.copyfile(bitmaps_image, src)
    with diskimg.open(src, "r+") as d:
        d.write(0, b"x")
        broken = tmp_path / "broken.qcow2"
        shutil.copyfile(src, broken)  # b and f flagged in use, as a crash leaves them
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    want = QEMU.img("convert", "--bitmaps", "-O", "qcow2", broken, theirs, ok=(1,))
    got = _ours("--bitmaps", "-O", "qcow2", broken, ours)
    assert got.returncode == 1 and _words(got.stderr) == _words(want.stderr)
    assert not ours.exists() and not theirs.exists()
    want = QEMU.img("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", broken,
                    theirs)
    got = _ours("--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", broken, ours)
    assert got.returncode == 0 and _words(got.stderr) == _words(want.stderr)
    QEMU.check_clean(ours)
    assert QEMU.info(ours)["format-specific"] == QEMU.info(theirs)["format-specific"]
    assert QEMU.dirty_map(ours, "c") == QEMU.dirty_map(theirs, "c")


@pytest.mark.parametrize("args", [
    ["--skip-broken-bitmaps", "-O", "qcow2", "SRC"],
    ["--bitmaps", "-O", "raw", "SRC"],
    ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "SRC"],
    ["--bitmaps", "-O", "qcow2", "SRC", "SRC"],
    ["--bitmaps", "-O", "qcow2", "RAW"],
], ids=["skip-without-bitmaps", "raw-target", "v2-target", "two-sources", "raw-source"])
def test_convert_bitmaps_refusals_like_qemu(tmp_path: Path, bitmaps_image: Path,
                                            args: list[str]) -> None:
    raw = tmp_path / "r.raw"
    QEMU.img("create", "-q", "-f", "raw", raw, "10M")
    argv = [str(bitmaps_image) if a == "SRC" else str(raw) if a == "RAW" else a for a in args]
    want = QEMU.img("convert", *argv, tmp_path / "theirs.img", ok=(1,))
    got = _ours(*argv, tmp_path / "ours.img")
    assert got.returncode == 1 and _words(got.stderr) == _words(want.stderr)
    assert not (tmp_path / "ours.img").exists()  # refused before the target exists
