"""``dd`` against qemu-img dd: the output size (rounded as qemu rounds it) and the
allocation ``qemu-img map`` shows, for bs/count/skip combinations whose byte counts are no
multiple of the cluster size, over a source with zero ranges longer than a copy chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import make_raw, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

MIB = 1 << 20


@pytest.fixture
def src(tmp_path: Path) -> Path:
    # data, then 4 MiB of zeros (more than a 2 MiB copy chunk), then data again
    return make_raw(tmp_path / "src.raw", 4 * MIB + 512 * 1024,
                    [(100000, b"A" * 3000), (4 * MIB + 12345, b"B" * 70000)])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("ops", [["bs=1000", "count=333"], ["bs=1M"],
                                 ["bs=30000", "count=150", "skip=7"],
                                 ["bs=65536", "count=70", "skip=3"],
                                 ["bs=512", "count=3", "skip=4"]])
def test_dd_size_and_map_match_qemu(di, src: Path, fmt: str, ops: list[str]) -> None:
    d = src.parent
    mine = di("dd", "-f", "raw", "-O", fmt, *ops, "if=src.raw", f"of=mine.{fmt}", cwd=d)
    ref = qemu("dd", "-f", "raw", "-O", fmt, *ops, "if=src.raw", f"of=ref.{fmt}", cwd=d)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert mine.rc == 0
    a, b = d / f"mine.{fmt}", d / f"ref.{fmt}"
    assert QEMU.info(a)["virtual-size"] == QEMU.info(b)["virtual-size"]
    assert QEMU.map(a, fmt) == QEMU.map(b, fmt)
    if fmt == "raw":
        assert a.read_bytes() == b.read_bytes()
    else:
        assert QEMU.compare(a, b) == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
@pytest.mark.parametrize("target", ["missing/out.img", "dir.img"])
def test_an_output_that_cannot_be_created_is_worded_as_qemu_words_it(
        di, src: Path, fmt: str, target: str) -> None:
    """qemu-img dd prefixes every failure to create its output with ``OUT: error while
    creating output image:`` and words a file that would not open as "Could not create";
    diskimg printed the bare open error.  Exit code and stderr are qemu's, for a missing
    directory and for a directory in the output's place, and no file is made."""
    d = src.parent
    (d / "dir.img").mkdir()
    before = sorted(p.name for p in d.iterdir())
    args = ("dd", "-f", "raw", "-O", fmt, "bs=64k", "if=src.raw", f"of={target}")
    mine, ref = di(*args, cwd=d), qemu(*args, cwd=d)
    assert ref.rc == 1 and "error while creating output image: " in ref.err, ref.err
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert sorted(p.name for p in d.iterdir()) == before
