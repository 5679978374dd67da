"""Host-file I/O: positional reads/writes, sparse files, preallocation, refusing non-files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskimg.errors import DiskImgError, ImageLockedError, UsageError
from diskimg.hostio import open_host_file

MiB = 1 << 20


def _blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _sparse_file(path: Path, size: int, data_at: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in data_at:
            f.seek(off)
            f.write(data)


def test_pwrite_then_pread_roundtrip_and_short_read_at_eof(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    with open_host_file(p, True, lock_mode=False) as hf:
        hf.pwrite(4096, b"hello")
        hf.pwrite(0, memoryview(b"ab"))
        assert hf.size() == 4101
        assert hf.pread(0, 2) == b"ab"
        assert hf.pread(2, 4094) == bytes(4094)  # the gap reads as zeros
        assert hf.pread(4096, 100) == b"hello"  # short only at end of file
        assert hf.pread(5000, 10) == b""
    assert p.read_bytes()[4096:] == b"hello"


def test_preadinto_zero_fills_past_end_of_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    buf = bytearray(b"\xee" * 1024)
    with open_host_file(p, lock_mode=False) as hf:
        assert hf.preadinto(0, memoryview(buf)) == 1024
    assert buf == b"x" * 1000 + bytes(24)


_HOLES = """\
import sys
sys.path.insert(0, sys.argv[1])
import diskimg
out = []
for path in sys.argv[2:]:
    with diskimg.open(path) as img:
        for at, n in ((0, 1 << 20), (3 * 65536 + 512, (1 << 20) + 4096)):
            buf = bytearray(b"\\xee" * (n + 2))  # one byte either side must stay
            img.readinto(at, memoryview(buf)[1 : n + 1])
            out.append(buf.hex(" ", 65536))
print("ctypes" in sys.modules)
print("\\n".join(out))
"""


def test_holes_of_large_reads_are_zero_filled_without_the_ctypes_package(
        tmp_path: Path) -> None:
    """Reads of holes of a sparse vmdk and of unallocated qcow2 clusters fill the
    caller's buffer with zeros (large ones by memset): exactly the range asked for,
    every byte, and without importing the ctypes package (about 3 ms of start-up)."""
    import diskimg

    data = bytes(range(1, 256)) * 257  # 65535 bytes of data at 2 MiB, the rest holes
    raw = tmp_path / "s.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(2 * MiB)
        f.write(data)
    images = []
    for fmt in ("vmdk", "qcow2"):
        img = tmp_path / f"s.{fmt}"
        diskimg.convert(raw, img, fmt, format="raw")
        images.append(str(img))
    src = str(Path(diskimg.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-S", "-c", _HOLES, src, *images],
                       capture_output=True, text=True, check=True)
    loaded, *dumps = r.stdout.splitlines()
    assert loaded == "False"
    want = []
    for at, n in ((0, MiB), (3 * 65536 + 512, MiB + 4096)):
        want.append((b"\xee" + bytes(n) + b"\xee").hex(" ", 65536))
    assert dumps == want * 2


def test_pread_exact_names_the_structure_and_offset(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(100))
    with open_host_file(p, lock_mode=False) as hf, pytest.raises(DiskImgError) as ei:
        hf.pread_exact(64, 64, "L1 table")
    assert "L1 table" in str(ei.value) and "0x40" in str(ei.value)


def test_read_only_host_file_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(512))
    with open_host_file(p, False, lock_mode=False) as hf:
        with pytest.raises(UsageError):
            hf.pwrite(0, b"x")
        with pytest.raises(UsageError):
            hf.truncate(0)
    assert p.read_bytes() == bytes(512)


def test_punch_hole_frees_blocks_and_reads_zeros(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(4 * MiB))
    before = _blocks(p)
    assert before >= 4 * MiB
    with open_host_file(p, True, lock_mode=False) as hf:
        assert hf.punch_hole(MiB, 2 * MiB) is True
        assert hf.size() == 4 * MiB  # KEEP_SIZE
        assert hf.pread(MiB, 2 * MiB) == bytes(2 * MiB)
    assert before - _blocks(p) >= 2 * MiB - 8192


def test_zero_range_reads_zeros_keeps_size(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(MiB)
    p.write_bytes(data)
    with open_host_file(p, True, lock_mode=False) as hf:
        hf.zero_range(4096, 8192)
        assert hf.size() == MiB
    got = p.read_bytes()
    assert got[:4096] == data[:4096]
    assert got[4096:12288] == bytes(8192)
    assert got[12288:] == data[12288:]


def test_data_extents_on_a_sparse_file_cover_the_range(tmp_path: Path) -> None:
    p = tmp_path / "f"
    _sparse_file(p, 8 * MiB, [(MiB, b"a" * 65536), (5 * MiB, b"b" * 4096)])
    with open_host_file(p, lock_mode=False) as hf:
        runs = list(hf.data_extents(0, 10 * MiB))  # asks past EOF too
    # runs are contiguous and cover exactly the request
    assert runs[0][0] == 0
    for (s, n, _), (s2, _, _) in zip(runs, runs[1:], strict=False):
        assert s + n == s2
    assert runs[-1][0] + runs[-1][1] == 10 * MiB
    data = [(s, n) for s, n, d in runs if d]
    assert data == [(MiB, 65536), (5 * MiB, 4096)]
    # past EOF is a hole
    assert runs[-1][2] is False and runs[-1][0] <= 8 * MiB


def test_data_extents_of_a_window_inside_data(tmp_path: Path) -> None:
    p = tmp_path / "f"
    _sparse_file(p, 2 * MiB, [(0, b"z" * MiB)])
    with open_host_file(p, lock_mode=False) as hf:
        assert list(hf.data_extents(4096, 8192)) == [(4096, 8192, True)]
        assert list(hf.data_extents(MiB + 4096, 4096)) == [(MiB + 4096, 4096, False)]


def test_preallocate_allocates_blocks_and_reads_zeros(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    with open_host_file(p, True, lock_mode=False) as hf:
        hf.truncate(4 * MiB)
        assert hf.allocated_size() == 0
        hf.preallocate(0, 4 * MiB)
        assert hf.allocated_size() >= 4 * MiB
        assert hf.pread(0, 4 * MiB) == bytes(4 * MiB)
        hf.write_zeros(4 * MiB, 4096)
        assert hf.size() == 4 * MiB + 4096


def test_allocated_size_is_st_blocks(tmp_path: Path) -> None:
    p = tmp_path / "f"
    _sparse_file(p, 16 * MiB, [(0, b"q" * 65536)])
    with open_host_file(p, lock_mode=False) as hf:
        assert hf.allocated_size() == os.stat(p).st_blocks * 512
        assert hf.allocated_size() < MiB


def test_directory_fifo_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DiskImgError, match="Is a directory"):
        open_host_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DiskImgError, match="not a regular file"):
        open_host_file(fifo)  # must not block waiting for a writer
    with pytest.raises(DiskImgError, match="No such file or directory"):
        open_host_file(tmp_path / "missing")


def test_char_device_is_refused() -> None:
    with pytest.raises(DiskImgError, match="not a regular file"):
        open_host_file("/dev/zero")


def test_create_truncates_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old content")
    with open_host_file(p, True, create=True, lock_mode=False) as hf:
        assert hf.size() == 0


def test_close_is_idempotent_and_releases_lock(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(512))
    hf = open_host_file(p, True)
    hf.close()
    hf.close()
    # a second writer can now take the same locks
    with open_host_file(p, True):
        pass


def test_two_writers_in_one_process_conflict(tmp_path: Path) -> None:
    # OFD locks belong to the open file description, so this works within one process too
    p = tmp_path / "img"
    p.write_bytes(bytes(512))
    with open_host_file(p, True), pytest.raises(ImageLockedError):
        open_host_file(p, True)


def test_every_call_after_close_raises_and_never_reuses_the_fd_number(tmp_path: Path) -> None:
    """After close the fd number can belong to another file: a late pwrite once wrote into
    it.  Every method raises ClosedImageError and the other file keeps its bytes."""
    from diskimg.errors import ClosedImageError

    p, q = tmp_path / "p", tmp_path / "q"
    p.write_bytes(b"p" * 4096)
    q.write_bytes(b"q" * 4096)
    hf = open_host_file(p, True, lock_mode=False)
    hf.close()
    with open(q, "r+b") as other:
        assert other.fileno() >= 0
        calls = [
            lambda: hf.pwrite(0, b"XX"),
            lambda: hf.pwritev(0, [b"X", b"Y"]),
            lambda: hf.pread(0, 2),
            lambda: hf.pread(0, 0),
            lambda: hf.pread_exact(0, 2, "header"),
            lambda: hf.preadinto(0, memoryview(bytearray(2))),
            lambda: hf.preadinto(0, memoryview(bytearray(0))),
            lambda: hf.size(),
            lambda: hf.allocated_size(),
            lambda: hf.truncate(0),
            lambda: hf.empty(),
            lambda: list(hf.data_extents(0, 4096)),
            lambda: hf.punch_hole(0, 4096),
            lambda: hf.zero_range(0, 4096),
            lambda: hf.preallocate(0, 8192),
            lambda: hf.write_zeros(0, 4096),
            lambda: hf.flush(),
            lambda: hf.lock(True),
            lambda: hf.fd,
        ]
        for call in calls:
            with pytest.raises(ClosedImageError):
                call()
        hf.close()  # still idempotent
    assert q.read_bytes() == b"q" * 4096
    assert p.read_bytes() == b"p" * 4096


@pytest.mark.parametrize("data", [b"", b"\0", b"\0" * 9, b"a", b"a\0", b"\0a\0\0",
                                  b"\x80" + bytes(70), bytes(64 << 10) + b"\1",
                                  b"\1" + bytes(64 << 10), bytes(range(256)) * 3],
                         ids=lambda d: f"{len(d)}-bytes-{d[:2].hex()}-{d[-2:].hex()}")
def test_trailing_zeros_counts_the_zero_bytes_at_the_end(data: bytes) -> None:
    """What check uses to stop a table walk after its last non-zero entry."""
    from diskimg.hostio.file import trailing_zeros

    assert trailing_zeros(data) == len(data) - len(data.rstrip(b"\0"))


@given(st.integers(0, 5000), st.binary(max_size=40), st.integers(0, 5000),
       st.sampled_from([1, 2, 4, 8]))
def test_zero_run_counts_the_zero_bytes_at_either_end(head: int, body: bytes, tail: int,
                                                      word: int) -> None:
    """zero_run, the binary search the table codec and the L1 walk use to pass over a zero
    head (and trailing_zeros over a zero tail), counts what lstrip/rstrip count, in whole
    words."""
    from diskimg.hostio.file import zero_run

    data = bytes(head) + body + bytes(tail)
    mv = memoryview(data)
    lead, trail = len(data) - len(data.lstrip(b"\0")), len(data) - len(data.rstrip(b"\0"))
    assert zero_run(mv, word=word) == lead // word * word
    assert zero_run(mv, tail=True, word=word) == trail // word * word


def test_page_offset_matches_ctypes_at_every_offset() -> None:
    """hostio.file's page offset (the ctypes extension module alone, start-up) gives
    ctypes' own address: every offset into a bytearray and an aligned buffer."""
    import ctypes

    from diskimg.hostio.file import _ALIGN, _page_offset, aligned_buffer

    def is_aligned(view: memoryview) -> bool:
        return _page_offset(view) % _ALIGN == 0

    for store in (bytearray(1 << 17), aligned_buffer(1 << 17)):
        for off in range(0, 2 * _ALIGN + 3):
            view = memoryview(store)[off:]
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            assert is_aligned(view) == (address % _ALIGN == 0), off
    assert is_aligned(memoryview(aligned_buffer(4096)))


@pytest.mark.parametrize("fill", [False, True])
def test_aligned_buffers_are_private_zeroed_and_filled_ones_fault_no_more(fill: bool) -> None:
    """``aligned_buffer(n, fill=True)`` (the copy's chunk buffers) has its pages made
    when it is mapped: writing every page of it takes no page fault (counted by the
    kernel, no clock), where a plain one takes a fault on first touch; either way it is
    n zero bytes, page aligned, and private (not shared memory)."""
    import ctypes
    import mmap
    import resource

    from diskimg.hostio.file import _page_offset, aligned_buffer

    n = 2 << 20
    buf = aligned_buffer(n, fill=fill)
    assert len(buf) == n and _page_offset(memoryview(buf)) == 0
    assert buf[:] == bytes(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for p in range(0, n, mmap.PAGESIZE):
        buf[p] = 1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if fill:
        assert faults < 16, faults  # (not one per page: 512 of them)
    assert buf[: mmap.PAGESIZE] == b"\x01" + bytes(mmap.PAGESIZE - 1)
    # private memory: the mapping's flags in /proc/self/maps end in "p" (a shared one,
    # as before, is "s": shmem pages, which fault more slowly)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    perms = []
    with open("/proc/self/maps", encoding="ascii") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= start < hi:
                perms.append(line.split()[1])
    assert perms and perms[0][3] == "p", perms
