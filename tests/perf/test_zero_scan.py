"""The zero primitives of the copy loop give the answers of a plain reference on every
buffer type the copy hands them (bytes, bytearray, mmap, memoryview slices at unaligned
offsets): ``all_zero`` and ``_nonzero_at`` compare views without copying them,
``zero_fill`` uses memset for large buffers.  Clock-free: speed is benchmarks/' job."""

from __future__ import annotations

import mmap
import random
from collections.abc import Callable
from typing import Any

import pytest

from diskimg.hostio import aligned_buffer, all_zero, zero_fill
from diskimg.hostio import file as hostfile
from diskimg.ops.common import CHUNK
from diskimg.ops import zero as zero_mod
from diskimg.ops.zero import _first_zero_head, _nonzero_at, sparse_runs

MAKERS: dict[str, Callable[[bytes], Any]] = {
    "bytes": bytes,
    "bytearray": bytearray,
    "mmap": lambda b: _mm(b),
    "memoryview": lambda b: memoryview(bytearray(b)),
}


def _mm(data: bytes) -> mmap.mmap:
    m = aligned_buffer(len(data))
    m[: len(data)] = data
    return m


def _ref_nonzero(data: bytes, pos: int, end: int) -> int:
    piece = data[pos:end]
    return pos + len(piece) - len(piece.lstrip(b"\0"))


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("size", [1, 511, 512, 4096, 65536 + 7, CHUNK + 4097])
def test_nonzero_at_and_all_zero_match_a_plain_scan(kind: str, size: int) -> None:
    rng = random.Random(size)
    positions = sorted({0, size - 1, size // 2, 511 % size, 65536 % size, 65535 % size,
                        *(rng.randrange(size) for _ in range(3))})
    zero = MAKERS[kind](bytes(size))
    assert all_zero(zero)
    assert _nonzero_at(zero, 0, size) == size
    for at in positions:
        data = bytearray(size)
        data[at] = rng.randrange(1, 256)
        buf = MAKERS[kind](bytes(data))
        assert not all_zero(buf), (kind, size, at)
        for pos, end in ((0, size), (at, size), (min(at + 1, size), size),
                         (max(0, at - 600), min(size, at + 3)), (0, at)):
            assert _nonzero_at(buf, pos, end) == _ref_nonzero(bytes(data), pos, end), \
                (kind, size, at, pos, end)


def test_all_zero_on_views_of_other_formats_and_offsets() -> None:
    data = bytearray(3 * (1 << 20) + 24)
    base = memoryview(data)
    assert all_zero(base[8:].cast("B"))
    assert all_zero(base[: 1 << 20].cast("Q"))
    data[2 * (1 << 20) + 5] = 1
    assert not all_zero(base[3:])
    assert not all_zero(base[:-8].cast("Q"))
    assert all_zero(base[2 * (1 << 20) + 6 :])


@pytest.mark.parametrize("n", [1, 100, hostfile._MEMSET_MIN - 1, hostfile._MEMSET_MIN,
                               (1 << 20) + 3, 3 * (1 << 20) + 17])
@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_zero_fill_clears_exactly_the_view(n: int, kind: str) -> None:
    """Unaligned slices of every length: the view becomes zeros, the bytes on either side
    keep their values."""
    rng = random.Random(n)
    full = rng.randbytes(n + 13)
    buf = bytearray(full) if kind == "bytearray" else _mm(full)
    zero_fill(memoryview(buf)[5 : 5 + n])
    got = bytes(buf[: n + 13])
    assert got[:5] == full[:5]
    assert got[5 : 5 + n] == bytes(n)
    assert got[5 + n :] == full[5 + n :]


def test_zero_fill_large_uses_one_memset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large fill is one memset of the view's own address and length (no copy loop),
    libc's memset made from the _ctypes extension module (hostio.cmem, not the ctypes
    package)."""
    import ctypes

    from diskimg.hostio import cmem

    calls: list[tuple[int, int]] = []
    real = cmem.memset_zero

    def spy(buf: memoryview, n: int) -> None:
        calls.append((cmem.address(buf), n))
        real(buf, n)

    monkeypatch.setattr(cmem, "memset_zero", spy)
    m = aligned_buffer(4 << 20)
    m[:] = b"\xff" * (4 << 20)
    view = memoryview(m)[4096 + 3 : (3 << 20) + 1]
    zero_fill(view)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    assert calls == [(addr, len(view))]
    assert bytes(m[: 4096 + 3]) == b"\xff" * (4096 + 3)
    assert bytes(view) == bytes(len(view))
    assert bytes(m[(3 << 20) + 1 :]) == b"\xff" * ((4 << 20) - (3 << 20) - 1)


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_sparse_runs_same_on_bytearray_and_mmap(kind: str) -> None:
    """The -S splitting of one chunk (zero runs at every alignment, single non-zero bytes
    at sector edges) is the same whatever buffer the copy reads into."""
    rng = random.Random(5)
    data = bytearray(CHUNK)
    for _ in range(40):
        at = rng.randrange(0, CHUNK - 70000)
        ln = rng.choice([1, 511, 512, 513, 4095, 4096, 65536])
        data[at : at + ln] = rng.randbytes(ln)
    for at in (0, 511, 512, CHUNK - 1):
        data[at] = 7
    ref = sparse_runs(bytes(data), CHUNK, 4096, 0)
    buf = bytearray(data) if kind == "bytearray" else _mm(bytes(data))
    assert sparse_runs(buf, CHUNK, 4096, 0) == ref
    # runs tile the chunk; data runs hold every non-zero byte
    assert sum(ln for _, ln, _ in ref) == CHUNK
    for s, ln, is_data in ref:
        if not is_data:
            assert bytes(data[s : s + ln]) == bytes(ln)


def test_zero_fill_of_a_wider_format_view_clears_every_byte() -> None:
    m = aligned_buffer(1 << 20)
    m[:] = b"\xaa" * (1 << 20)
    zero_fill(memoryview(m)[8:].cast("Q"))  # 131071 items, 8 bytes each
    assert bytes(m[:8]) == b"\xaa" * 8 and bytes(m[8:]) == bytes((1 << 20) - 8)


def test_the_first_zero_scan_of_a_process_maps_few_pages_of_the_zero_buffer() -> None:
    """The zero comparand (``ops.common._ZEROS``, CHUNK bytes of calloc'd memory) has its
    pages mapped by the kernel one fault per 4 KiB page when first read: the scan compares
    at most ``_ZERO_RUN`` bytes at once, so the first all-zero chunk of a fresh process
    maps 64 of its pages, not all 512 (counted by the kernel, no clock); the answer is
    that of the reference."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import diskimg

    code = (
        "import resource\n"
        "from diskimg.hostio import aligned_buffer\n"
        "from diskimg.ops.zero import sparse_runs\n"
        "b = aligned_buffer(2 << 20, fill=True)\n"
        "b[(2 << 20) - 1] = 1\n"  # one data sector at the very end
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "runs = sparse_runs(b, 2 << 20, 4096, 0, 8)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f, runs)\n")
    src = str(Path(diskimg.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": src}, check=True)
    faults, runs = r.stdout.split(" ", 1)
    # the last sector's 4 KiB cluster (alignment 8 sectors) is data, the rest a hole
    assert runs.strip() == str([(0, (2 << 20) - 4096, False), ((2 << 20) - 4096, 4096, True)])
    assert int(faults) < 128, faults  # (512 and more when whole chunks were compared)


def _ref_zero_head(data: bytes, pos: int, end: int) -> int:
    """The first sector start in [pos, end), aligned to pos, whole sector inside, whose
    first 8 bytes are zero."""
    for s in range(pos, end - 511, 512):
        if data[s : s + 8] == bytes(8):
            return s
    return end


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("pattern", ["random", "few zero heads", "zero first bytes",
                                     "many zero heads"])
def test_first_zero_head_matches_a_plain_scan(kind: str, pattern: str) -> None:
    """The sector-head test (the first byte of each sector by an extended slice, then
    the 8-byte head of the few candidates; one strided word copy when they are many)
    finds the sector a plain scan finds: heads that are zero only in their first bytes,
    zero runs straddling two heads, buffers where every sector starts with a zero byte
    (more candidates than ``_FEW_ZERO_BYTES``), unaligned starts and partial ends."""
    rng = random.Random(f"{kind}/{pattern}")
    for size in (512, 4096 + 100, 65536, CHUNK):
        data = bytearray(rng.randbytes(size))
        nsec = size // 512
        if pattern == "few zero heads":
            for _ in range(3):  # zero runs of 7 bytes (no head), 8, and across a head
                s = rng.randrange(nsec) * 512
                k = min(rng.choice([7, 8, 600]), size - s)
                data[s : s + k] = bytes(k)
        elif pattern == "zero first bytes":  # candidates that are not zero heads
            for s in range(0, size, 512):
                data[s : s + 7] = bytes(7)
                data[s + 7] = 1
        elif pattern == "many zero heads":
            for s in range(0, size, 512):
                data[s] = 0
            for _ in range(5):
                s = rng.randrange(nsec) * 512
                data[s : s + 8] = bytes(8)
        frozen = bytes(data)
        assert len(frozen) == size
        buf = MAKERS[kind](frozen)
        for pos, end in ((0, size), (3, size), (512, size - 1), (100, size // 2 + 5)):
            assert _first_zero_head(buf, pos, end) == _ref_zero_head(frozen, pos, end), \
                (size, pos, end)
    assert zero_mod._FEW_ZERO_BYTES < 4096 // 512 * 8  # ("many" exceeds it)
