"""Reads of a qemu-made sparse vmdk through every read path of the image, byte for byte
against ``qemu-img convert -O raw``: the monolithic fast path (one extent, no backing file:
holes zero-filled, a run covering the whole request read into the caller's view), the
multi-extent path (twoGbMaxExtentSparse) and the backing-file fill of a delta disk.

The image has data grains, holes, zeroed grains (``zeroed_grain=on``), host-contiguous and
host-scattered grains, a last partial grain (the size is not a grain multiple), and the
requests straddle grain-table boundaries (a table maps 512 grains: 32 MiB), start and end
inside grains, and go into bytearrays, ``diskimg.aligned_buffer`` views and views at odd
offsets (the kernel's copy into them differs: see hostio.file.preadinto)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

pytestmark = pytest.mark.qemu
MiB = 1 << 20
GT_SPAN = 512 * 64 * 1024            # guest bytes one grain table maps (64 KiB grains)
SIZE = 2 * GT_SPAN + 3 * MiB + 5 * 512   # the last grain is partial (5 sectors past 3 MiB)


def _writes(base: int) -> list[str]:
    """qemu-io commands: data on both sides of each grain-table boundary, zeroed grains,
    grains written out of order (not host-contiguous), the partial last grain."""
    g = 64 * 1024
    return [
        f"write -P 0x11 {base} 1M",
        f"write -P 0x22 {base + GT_SPAN - 3 * g} {5 * g}",      # straddles table 0 -> 1
        f"write -P 0x33 {base + 2 * GT_SPAN + MiB} 256k",       # host after 0x44 below
        f"write -P 0x44 {base + 2 * GT_SPAN - g} {2 * g}",      # straddles table 1 -> 2
        f"write -z {base + 5 * g} {3 * g}",                    # zeroed grains
        f"write -P 0x55 {base + 7 * MiB + 4096} 8k",            # inside one grain
        f"write -P 0x66 {base + 2 * GT_SPAN + 3 * MiB} {5 * 512}",  # the partial last grain
        f"write -P 0x77 {base + 20 * MiB} 3M",
        f"write -z {base + 21 * MiB} 1M",                       # zeroes over data
    ]


def _first_diff(got: bytes | memoryview, want: bytes) -> int:
    """The first offset where ``got`` differs from ``want`` (-1 when equal): a failure names
    it instead of pytest diffing megabytes."""
    got = bytes(got)
    if got == want:
        return -1
    n = min(len(got), len(want))
    return next((i for i in range(n) if got[i] != want[i]), n)


def _requests(size: int) -> list[tuple[int, int]]:
    """(offset, length): sequential 1 MiB reads, then reads crossing grain and table
    boundaries at odd offsets, then the tail."""
    reqs = [(o, min(MiB, size - o)) for o in range(0, size, MiB)]
    for b in (GT_SPAN, 2 * GT_SPAN):
        reqs += [(b - 3 * 64 * 1024 - 7, 5 * 64 * 1024 + 11), (b - 1, 2), (b - MiB, 2 * MiB),
                 (b - 100, 4 * MiB + 200)]
    reqs += [(5 * 64 * 1024 - 1, 3 * 64 * 1024 + 2), (7 * MiB + 4095, 8194),
             (size - 5 * 512 - 1, 5 * 512 + 1), (size - 3 * MiB - 17, 3 * MiB + 17)]
    return [(o, min(n, size - o)) for o, n in reqs]


def _buffers(n: int) -> list[memoryview]:
    """The views a caller reads into: a bytearray, an aligned buffer, and views at odd
    offsets of each."""
    ba = bytearray(n + 4096)
    al = diskimg.aligned_buffer(n + 4096)
    return [memoryview(ba)[:n], memoryview(al)[:n], memoryview(ba)[16:16 + n],
            memoryview(al)[4080:4080 + n], memoryview(al)[33:33 + n]]


def _check_reads(img: Path, want: bytes) -> None:
    with diskimg.open(img, format="vmdk") as dev:
        assert dev.size == len(want)
        for off, n in _requests(dev.size):
            for i, mv in enumerate(_buffers(n)):
                mv[:] = b"\xee" * n            # stale bytes the read must replace
                dev.readinto(off, mv)
                assert _first_diff(mv, want[off:off + n]) == -1, (off, n, i)
        # the whole disk in one request, and the bytes API
        assert _first_diff(dev.read(0, dev.size), want) == -1


@pytest.mark.parametrize("zeroed_grain", ["off", "on"])
def test_monolithic_sparse_reads_equal_qemu(tmp_path: Path, zeroed_grain: str) -> None:
    img = tmp_path / "m.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", "-o", f"zeroed_grain={zeroed_grain}", img,
             str(SIZE))
    QEMU.io(img, *_writes(0), fmt="vmdk")
    want = QEMU.raw_bytes(img, "vmdk")
    assert any(want) and want.count(0) > len(want) // 2   # holes and data
    _check_reads(img, want)


def test_two_extent_reads_equal_qemu(tmp_path: Path) -> None:
    """twoGbMaxExtentSparse: requests that cross the extent boundary at 2 GiB, against
    the bytes qemu-io reads there (``read -P`` verifies each pattern)."""
    img = tmp_path / "t.vmdk"
    size = (2 << 30) + 3 * MiB
    QEMU.img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img,
             str(size))
    base = (2 << 30) - 2 * MiB
    QEMU.io(img, f"write -P 0x5a {base} 3M", f"write -P 0x6b {base + 3 * MiB + 4096} 64k",
            fmt="vmdk")
    QEMU.io(img, f"read -P 0x5a {base} 3M", f"read -P 0 {base + 3 * MiB} 4k",
            f"read -P 0x6b {base + 3 * MiB + 4096} 64k",
            f"read -P 0 {base + 3 * MiB + 4096 + 65536} {MiB - 4096 - 65536}",
            f"read -P 0 {base - MiB} 1M", fmt="vmdk", read_only=True)
    want = (bytes(MiB) + b"\x5a" * (3 * MiB) + bytes(4096) + b"\x6b" * 65536
            + bytes(MiB - 4096 - 65536))
    start = base - MiB
    with diskimg.open(img, format="vmdk") as dev:
        assert dev.size >= start + len(want)
        for off, n in [(0, 5 * MiB), (MiB + 7, 3 * MiB), (3 * MiB - 1, 2), (4 * MiB, MiB),
                       (2 * MiB + 3, 3 * MiB - 3)]:
            for mv in _buffers(n):
                mv[:] = b"\xee" * n
                dev.readinto(start + off, mv)
                assert _first_diff(mv, want[off:off + n]) == -1, (off, n)


def test_delta_disk_reads_its_parent_where_unallocated(tmp_path: Path) -> None:
    """A child's unallocated grains read the parent's bytes (the fill path), allocated
    ones its own; a hole in both reads zeros."""
    parent, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", parent, str(SIZE))
    QEMU.io(parent, *_writes(0), fmt="vmdk")
    QEMU.img("create", "-q", "-f", "vmdk", "-b", parent.name, "-F", "vmdk", child,
             cwd=tmp_path)
    QEMU.io(child, "write -P 0x99 512k 1M", f"write -P 0x98 {GT_SPAN - 4096} 8k",
            fmt="vmdk")
    want = QEMU.raw_bytes(child, "vmdk")
    assert want[:5 * 65536] == b"\x11" * (5 * 65536)      # the parent's bytes
    assert want[512 * 1024:(512 + 1024) * 1024] == b"\x99" * MiB   # the child's own
    _check_reads(child, want)
