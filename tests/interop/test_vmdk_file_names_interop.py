"""File names a vmdk descriptor holds (extents, the parent) are the files' bytes, as in
QEMU, whatever the image is called: UTF-8 (``café``, ``日本``) or not UTF-8 at all.
diskimg used to read them as latin-1 characters (so it could not open qemu's images so
named), write them so (qemu could not open diskimg's), and fail with an internal error,
leaving an extent file behind, for a name outside latin-1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                 reason="qemu-img/qemu-io absent")]

NAMES = ["café", "日本", os.fsdecode(b"v\xffx")]
SUBFORMATS = ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
SIZE = 3 * 65536 + 1536


def _info(tool: list[str], img: Path) -> bytes:
    return subprocess.run([*tool, "info", img.name], capture_output=True, check=True,
                          cwd=img.parent).stdout


@pytest.mark.parametrize("maker", ["qemu-img", "diskimg"])
@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_extents_named_by_bytes(tmp_path: Path, maker: str, sub: str, name: str,
                                turns_at_the_edges: Callable[[Path, str, int], None]) -> None:
    img = tmp_path / f"{name}.vmdk"
    if maker == "qemu-img":
        QEMU.img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", img, str(SIZE))
    else:
        diskimg.create(img, "vmdk", SIZE, options={"subformat": sub})
    turns_at_the_edges(img, "vmdk", SIZE)
    assert _info([sys.executable, "-m", "diskimg"], img) == _info(["qemu-img"], img)
    QEMU.check_clean(img, "-f", "vmdk")


@pytest.mark.parametrize("name", NAMES)
def test_parent_named_by_bytes(tmp_path: Path, name: str) -> None:
    base = tmp_path / f"{name}.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", base, "1M")
    QEMU.io(base, "write -P 0x44 0 64k", fmt="vmdk")
    for maker in ("qemu-img", "diskimg"):
        top = tmp_path / f"top-{maker}.vmdk"
        if maker == "qemu-img":
            QEMU.img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", top)
        else:
            diskimg.create(top, "vmdk", None, backing_file=base.name, backing_fmt="vmdk")
        assert _info([sys.executable, "-m", "diskimg"], top) == _info(["qemu-img"], top)
        with diskimg.open(top) as d:
            assert d.read(0, 65536) == b"\x44" * 65536
        QEMU.io(top, "read -P 0x44 0 64k", fmt="vmdk")
