"""diskimg snapshot against qemu-img snapshot (needs the lead's snapshot API)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.qcow2.image import Qcow2Image

from .conftest import needs_qemu, qemu
from .lifecycle_helpers import create

pytestmark = [pytest.mark.qemu, needs_qemu,
              pytest.mark.skipif(not hasattr(Qcow2Image, "snapshot_view"),
                                 reason="snapshot API not landed")]


def build(d: Path) -> None:
    create(d, "s.qcow2", "10M")
    QEMU.io("s.qcow2", "write -P 1 0 64k", fmt=None, cwd=d)
    QEMU.img("snapshot", "-c", "s1", "s.qcow2", cwd=d)
    QEMU.io("s.qcow2", "write -P 2 0 64k", fmt=None, cwd=d)
    QEMU.img("snapshot", "-c", "s1", "s.qcow2", cwd=d)
    QEMU.img("snapshot", "-c", "s2", "s.qcow2", cwd=d)
    create(d, "e.qcow2", "1M")


@pytest.mark.parametrize("args", [
    ["-l", "s.qcow2"], ["-l", "-U", "s.qcow2"], ["s.qcow2"], ["-l", "e.qcow2"],
    ["-a", "nope", "s.qcow2"], ["-d", "nope", "s.qcow2"], ["-d", "1", "s.qcow2"],
    ["-a", "s1", "-d", "s2", "s.qcow2"], ["-c", "x", "-U", "s.qcow2"], ["-l"],
    ["-f", "qcow2", "-l", "s.qcow2"],
])
def test_snapshot_readonly_and_errors(di, tmp_path: Path, args: list[str]) -> None:
    build(tmp_path)
    mine = di("snapshot", *args, cwd=tmp_path)
    ref = qemu("snapshot", *args, cwd=tmp_path)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)


@pytest.mark.parametrize("args", [["-a", "1"], ["-a", "s2"], ["-d", "s1"], ["-d", "s2"],
                                  ["-c", "s3"], ["-q", "-c", "s3"]])
def test_snapshot_mutations(di, twin_dirs: tuple[Path, Path], args: list[str]) -> None:
    q, m = twin_dirs
    build(q)
    build(m)
    ref = qemu("snapshot", *args, "s.qcow2", cwd=q)
    mine = di("snapshot", *args, "s.qcow2", cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    QEMU.check_clean("s.qcow2", cwd=m)
    assert QEMU.img("compare", "s.qcow2", str(q / "s.qcow2"), cwd=m).returncode == 0
    names = lambda d: [ln.split()[1] for ln in  # noqa: E731
                       QEMU.img("snapshot", "-l", "s.qcow2", cwd=d).stdout.splitlines()[2:]]
    assert names(m) == names(q)


@pytest.mark.parametrize("name", ["nope", "s1", "1"])
def test_apply_with_a_persistent_bitmap_refused_first_like_qemu(
        di, tmp_path: Path, name: str) -> None:
    """qemu refuses a revert of an image with a persistent bitmap before it looks the
    snapshot up: a missing one says "Device has active dirty bitmaps" too (diskimg said
    "Failed to load snapshot: No such file or directory").  Nothing changes."""
    import hashlib

    build(tmp_path)
    QEMU.img("bitmap", "--add", "s.qcow2", "b0", cwd=tmp_path)
    img = tmp_path / "s.qcow2"
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    mine = di("snapshot", "-a", name, "s.qcow2", cwd=tmp_path)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    ref = qemu("snapshot", "-a", name, "s.qcow2", cwd=tmp_path)  # (rewrites bitmap tables)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert "Device has active dirty bitmaps" in mine.err
