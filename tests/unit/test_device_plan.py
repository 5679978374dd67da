"""BlockDevice.plan() (one layer's typed run) and block_status(top_only=True) (one
layer's block status): public, checked, and what convert -B and its progress consume."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.plan import Run, RunKind, check_plan

MiB = 1 << 20


def test_raw_plan_is_one_identity_data_run_and_calls_are_checked(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\x01" * 8192)
    before = raw.read_bytes()
    with diskimg.open(raw, format="raw") as dev:
        assert dev.plan(100, 50) == Run(100, 50, RunKind.DATA, 100, filename=str(raw))
        assert not dev.parallel_compressed_reads
        with pytest.raises(UnsupportedFeatureError):
            dev.read_compressed(Run(0, 512, RunKind.COMPRESSED), memoryview(bytearray(512)))
        for off, n in ((0, 0), (8000, 500), (-1, 2)):
            with pytest.raises(UsageError):
                dev.plan(off, n)
    assert raw.read_bytes() == before
    with pytest.raises(diskimg.ClosedImageError):
        dev.plan(0, 1)


@pytest.mark.qemu
def test_qcow2_plan_of_an_empty_image(tmp_path: Path, qemu_img: str,
                                      run: Callable[..., Any]) -> None:
    q = tmp_path / "a.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", q, "1M"])
    with diskimg.open(q) as dev:
        assert dev.parallel_compressed_reads
        assert dev.plan(5, MiB - 5) == Run(5, MiB - 5, RunKind.UNALLOCATED)


@pytest.fixture
def vmdk_child(tmp_path: Path, qemu_img: str, qemu_io: str,
               run: Callable[..., Any]) -> Path:
    """A sparse vmdk whose parent holds data everywhere; the child one grain."""
    base = tmp_path / "base.vmdk"
    child = tmp_path / "child.vmdk"
    run([qemu_img, "create", "-q", "-f", "vmdk", base, "4M"])
    run([qemu_io, "-f", "vmdk", "-c", "write -P 0x5a 0 4M", base])
    run([qemu_img, "create", "-q", "-f", "vmdk", "-b", base, "-F", "vmdk", child, "4M"])
    run([qemu_io, "-f", "vmdk", "-c", "write -P 0x11 1M 64k", child])
    return child


@pytest.mark.qemu
def test_vmdk_unallocated_grains_over_a_parent_are_not_zeros(vmdk_child: Path) -> None:
    with diskimg.open(vmdk_child) as dev:
        assert dev.plan(0, MiB).kind is RunKind.UNALLOCATED
        st, depth = dev.block_status(0, MiB, top_only=True)
        assert (st.allocated, st.zero, depth) == (False, False, 0)
        st, depth = dev.block_status(0, MiB)  # through the chain: the parent's data
        assert (st.allocated, st.data, depth) == (True, True, 1)


@pytest.mark.qemu
@pytest.mark.parametrize("sparse", ["4k", "0"])
def test_convert_B_of_a_vmdk_child_leaves_the_parents_data_to_the_backing_file(
        vmdk_child: Path, sparse: str, qemu_img: str, run: Callable[..., Any]) -> None:
    """Regression: the vmdk's unallocated grains were copied as zeros over the target's
    backing file, so the target no longer read the parent's data there."""
    d = vmdk_child.parent
    args = ["convert", "-p", "-S", sparse, "-B", "base.vmdk", "-F", "vmdk", "-O", "qcow2",
            "child.vmdk"]
    ref = run([qemu_img, *args, "q.qcow2"], cwd=d)
    got = run([sys.executable, "-m", "diskimg", *args, "d.qcow2"], cwd=d)
    assert got.stdout == ref.stdout  # the progress qemu-img prints
    run([qemu_img, "compare", "child.vmdk", "d.qcow2"], cwd=d)
    maps = [run([qemu_img, "map", "--output=json", n], cwd=d).stdout
            for n in ("q.qcow2", "d.qcow2")]
    assert maps[0] == maps[1]


def test_raw_status_is_its_plan_refined_by_the_files_holes(tmp_path: Path) -> None:
    p = tmp_path / "h.raw"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x07" * 65536)
    with diskimg.open(p, format="raw") as dev:
        assert dev.plan(0, dev.size) == Run(0, dev.size, RunKind.DATA, 0, filename=str(p))
        pos, got = 0, bytearray()
        while pos < dev.size:
            st, depth = dev.block_status(pos, dev.size - pos, top_only=True)
            assert (st.allocated, st.offset, depth) == (True, pos, 0)
            assert st.data != st.zero  # a hole: zero and not data
            piece = dev.read(pos, st.length)
            assert st.data or not any(piece)
            got += piece
            pos += st.length
    assert bytes(got) == p.read_bytes()


@pytest.mark.qemu
def test_vmdk_plan_across_extents_is_in_guest_offsets(tmp_path: Path, qemu_img: str,
                                                       qemu_io: str,
                                                       run: Callable[..., Any]) -> None:
    img = tmp_path / "split.vmdk"
    run([qemu_img, "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
         img, "3G"])
    g2 = 2 << 30
    run([qemu_io, "-f", "vmdk", "-c", f"write -P 0x42 {g2 + 65536} 65536",
         "-c", f"write -P 0x43 {g2 - 65536} 65536", img])
    with diskimg.open(img) as dev:
        runs, pos = [], g2 - MiB
        while pos < g2 + MiB:
            r = dev.plan(pos, g2 + MiB - pos)
            assert r.offset == pos and r.length > 0, r  # guest offsets, progress
            runs.append(r)
            pos = r.end
        check_plan(runs, g2 - MiB, g2 + MiB, dev.size)
        assert all(r.end <= g2 or r.offset >= g2 for r in runs)  # never across extents
        data = [r for r in runs if r.kind is RunKind.DATA]
        assert [(r.offset, r.length) for r in data] == [(g2 - 65536, 65536),
                                                        (g2 + 65536, 65536)]
        assert data[0].filename != data[1].filename
        for r in data:
            assert r.host is not None and r.filename is not None
            with open(r.filename, "rb") as f:
                assert os.pread(f.fileno(), r.length, r.host) == dev.read(r.offset, r.length)
        assert dev.read(g2 + 65536, 65536) == b"\x42" * 65536
