"""vmdk performance shape, without clocks: how many system calls sequential reads and
converts issue, that compressed grains are inflated on the pool, that memory follows the
batch and not the request, and that every fast path gives the bytes of the plain one.
Wall-clock ratios live in benchmarks/, never here."""

from __future__ import annotations

import os
import random
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.errors import CorruptImageError
from diskimg.hostio import aligned_buffer
from diskimg.vmdk import VmdkImage, write_stream_optimized
from diskimg.vmdk import compressed as E
from diskimg.vmdk import sparse as S

MiB = 1 << 20
GRAIN = 64 << 10


def _workload(path: Path, kinds: str, seed: int = 11) -> int:
    """A raw file of 1 MiB chunks: ``r`` random, ``t`` text, ``z`` written zeros, ``h``
    hole.  Returns the number of data (r/t) chunks."""
    rng = random.Random(seed)
    line = b"vmdk grain table marker footer descriptor extent\n"
    with open(path, "wb") as f:
        f.truncate(len(kinds) * MiB)
        for i, k in enumerate(kinds):
            f.seek(i * MiB)
            if k == "r":
                f.write(rng.randbytes(MiB))
            elif k == "t":
                f.write((line * (MiB // len(line) + 1))[:MiB])
            elif k == "z":
                f.write(bytes(MiB))
    return sum(k in "rt" for k in kinds)


class _Calls:
    """Records ``(name, fd, offset, nbytes)`` of positional I/O from any thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.lock = threading.Lock()
        for n in names:
            real = getattr(os, n)

            def wrap(fd: int, a: Any, b: Any, *rest: Any, _real: Any = real,
                     _n: str = n) -> Any:
                if _n == "pread":            # pread(fd, n, offset)
                    rec = (_n, fd, b, a)
                elif _n == "pwrite":         # pwrite(fd, data, offset)
                    rec = (_n, fd, b, len(memoryview(a).cast("B")))
                else:                        # preadv/pwritev(fd, buffers, offset)
                    rec = (_n, fd, b, sum(len(memoryview(x).cast("B")) for x in a))
                with self.lock:
                    self.calls.append(rec)
                return _real(fd, a, b, *rest)

            monkeypatch.setattr(os, n, wrap)

    def on(self, fd: int, *names: str) -> list[tuple[str, int, int, int]]:
        return [c for c in self.calls if c[1] == fd and (not names or c[0] in names)]


def _open(path: Path) -> VmdkImage:
    img = diskimg.open(path, format="vmdk")
    assert isinstance(img, VmdkImage)
    return img


def _read_seq(img: Any, chunk: int = MiB) -> bytes:
    """The whole image read front to back in ``chunk`` requests into an aligned buffer."""
    buf = aligned_buffer(chunk)
    out = bytearray()
    for off in range(0, img.size, chunk):
        n = min(chunk, img.size - off)
        img.readinto(off, memoryview(buf)[:n])
        out += buf[:n]
    return bytes(out)


def _stream(tmp_path: Path, kinds: str) -> tuple[Path, bytes, int]:
    raw = tmp_path / "src.raw"
    data = _workload(raw, kinds)
    out = tmp_path / "s.vmdk"
    with diskimg.open(raw, format="raw") as src:
        write_stream_optimized(src, out)
    return out, raw.read_bytes(), data


def test_sequential_reads_of_a_sparse_vmdk_issue_one_read_per_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, vmdk = tmp_path / "src.raw", tmp_path / "d.vmdk"
    data = _workload(raw, "rthzrrhtzhhr" * 2)
    diskimg.convert(raw, vmdk, "vmdk", format="raw")
    with _open(vmdk) as img:
        c = _Calls(monkeypatch, "pread", "preadv")
        got = _read_seq(img)
        monkeypatch.undo()
        reads = c.on(img.host.fd)
    assert got == raw.read_bytes()
    # one read per MiB of data plus the one grain table; nothing for holes and zeros
    assert len(reads) <= data + 1, reads


def test_sequential_reads_of_stream_optimized_read_runs_of_grains_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want, data = _stream(tmp_path, "rtthrzrt" * 2)
    with _open(path) as img:
        c = _Calls(monkeypatch, "pread", "preadv")
        got = _read_seq(img)
        monkeypatch.undo()
        reads = c.on(img.host.fd)
    assert got == want
    # 16 grains per MiB: per-grain reads (marker + data) would be 32 per data MiB
    assert len(reads) <= data + 2, reads


def test_compressed_grains_are_inflated_on_the_pool_and_match_grain_by_grain_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want, _ = _stream(tmp_path, "trtrhtz")
    monkeypatch.setattr(E, "_POOL_WORKERS", 1)   # a pool even on a one-CPU machine
    monkeypatch.setattr(E, "_pool", None)
    names: set[str] = set()
    real = zlib.decompressobj

    def spy(*a: Any) -> Any:
        names.add(threading.current_thread().name)
        return real(*a)

    monkeypatch.setattr(zlib, "decompressobj", spy)
    with _open(path) as img:
        fast = _read_seq(img, 2 * MiB)
        assert any(n.startswith("diskimg-inflate") for n in names), names
        # 4 KiB requests never cover a whole grain: the cached grain-by-grain path
        slow = b"".join(img.read(off, 4096) for off in range(0, img.size, 4096))
    assert fast == slow == want


def test_a_large_request_holds_a_bounded_amount_of_compressed_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want, _ = _stream(tmp_path, "r" * 24)
    sizes: list[int] = []
    real = E._scratch

    def spy(n: int) -> memoryview:
        sizes.append(n)
        return real(n)

    monkeypatch.setattr(E, "_scratch", spy)
    with _open(path) as img:
        got = img.read(0, img.size)
    assert got == want
    assert len(sizes) >= 2                      # read in batches, not all at once
    assert max(sizes) <= E._BATCH_BYTES + E._GROUP_MAX + 2 * GRAIN


def _grain_hosts(path: Path) -> tuple[int, list[int]]:
    """(file offset of grain table 0, its entries as byte offsets)."""
    with _open(path) as img:
        ext = img.extents[0]
        t = ext._gt(0)
        return ext.gd[0] * S.SECTOR, [e * S.SECTOR for e in t]


@pytest.mark.parametrize("damage", ["marker-size", "zlib"])
def test_a_corrupt_grain_inside_a_batched_run_names_its_offset(tmp_path: Path,
                                                               damage: str) -> None:
    path, _, _ = _stream(tmp_path, "tttt")
    _, hosts = _grain_hosts(path)
    bad = hosts[30]                    # late in a 2 MiB request: a pool task's share
    with open(path, "r+b") as f:
        if damage == "marker-size":
            f.seek(bad + 8)
            f.write(struct.pack("<I", 0xFFFFFFF0))
        else:
            f.seek(bad + 12)
            f.write(b"\xff" * 16)
    with _open(path) as img, pytest.raises(CorruptImageError) as ei:
        img.readinto(0, memoryview(bytearray(2 * MiB)))
    assert ei.value.offset == bad
    assert f"{bad:#x}" in str(ei.value)


def test_grain_tables_out_of_file_order_read_like_grain_by_grain(tmp_path: Path) -> None:
    path, want, _ = _stream(tmp_path, "rtrt")
    gt_at, hosts = _grain_hosts(path)
    orig = [h // S.SECTOR for h in hosts]
    ents = list(orig)
    # grains 0-15 reversed, 16-19 all pointing at grain 3, 20-23 swapped in pairs
    ents[:16] = orig[:16][::-1]
    ents[16:20] = [orig[3]] * 4
    ents[20:24] = [orig[21], orig[20], orig[23], orig[22]]
    with open(path, "r+b") as f:
        f.seek(gt_at)
        f.write(struct.pack(f"<{len(ents)}I", *ents))
    with _open(path) as img:
        fast = img.read(0, img.size)
        slow = b"".join(img.read(off, 4096) for off in range(0, img.size, 4096))
    assert fast == slow
    assert fast[:GRAIN] == want[15 * GRAIN:16 * GRAIN]
    assert fast[16 * GRAIN:20 * GRAIN] == want[3 * GRAIN:4 * GRAIN] * 4
    assert fast[20 * GRAIN:21 * GRAIN] == want[21 * GRAIN:22 * GRAIN]


def test_monolithic_sparse_convert_writes_grain_tables_with_one_call_per_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, vmdk = tmp_path / "src.raw", tmp_path / "d.vmdk"
    # data in four grain tables (32 MiB each)
    _workload(raw, "rhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh" "thhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh"
                   "rhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh" "thhhhhhhhhhhhhhhhhhhhhhhhhhhhhhr")
    c = _Calls(monkeypatch, "pwrite", "pwritev")
    diskimg.convert(raw, vmdk, "vmdk", format="raw")
    monkeypatch.undo()
    with _open(vmdk) as img:
        h = img.extents[0].header
        assert img.read(0, img.size) == raw.read_bytes()
    first_table = (h.rgd_offset + 1) * S.SECTOR   # one GD sector, then its tables
    tables = [x for x in c.calls if first_table <= x[2] < h.overhead * S.SECTOR
              and x[2] != h.gd_offset * S.SECTOR]
    # four dirty tables in each copy (redundant and primary), each copy back to back
    assert len(tables) == 2, tables
    assert sorted(x[3] for x in tables) == [4 * 2048, 4 * 2048]
    # data: one write per run of grains (five 1 MiB runs), never one per grain
    data = [x for x in c.calls if x[2] >= h.overhead * S.SECTOR]
    assert len(data) == 5, data


def test_stream_optimized_records_are_written_in_large_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "src.raw"
    _workload(raw, "rtrtzhrt")
    out = tmp_path / "s.vmdk"
    c = _Calls(monkeypatch, "pwrite", "pwritev")
    with diskimg.open(raw, format="raw") as src:
        write_stream_optimized(src, out)
    monkeypatch.undo()
    size = out.stat().st_size
    grains = [x for x in c.calls if x[2] >= 128 * S.SECTOR]
    # 96 grains stored: one pwritev per MiB of records, not one pwrite per grain
    assert len(grains) <= size // MiB + 2, len(grains)
    with _open(out) as img:
        assert img.lint() == []
        assert img.read(0, img.size) == raw.read_bytes()


def test_stream_writer_stores_no_all_zero_grain_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "w.vmdk"
    diskimg.create(path, "vmdk", 4 * MiB, options={"subformat": "streamOptimized"})
    rng = random.Random(3)
    data = bytearray(4 * MiB)
    data[:GRAIN] = rng.randbytes(GRAIN)                 # grain 0: data
    # grain 1: zeros written explicitly; grain 2: one byte at its very end
    data[3 * GRAIN - 1] = 7
    data[3 * MiB:3 * MiB + 100] = b"x" * 100            # a partial grain further on
    with diskimg.open(path, "r+", format="vmdk") as img:
        img.write(0, bytes(data[:3 * GRAIN]))           # through StreamWriter.write
        img.write(3 * MiB, bytes(data[3 * MiB:3 * MiB + 100]))
    with _open(path) as img:
        assert img.read(0, img.size) == bytes(data)
        t = img.extents[0]._gt(0)
        stored = [i for i, e in enumerate(t) if e]
        assert img.lint() == []
    assert stored == [0, 2, 3 * MiB // GRAIN]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_inflates_on_a_fresh_pool(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, want, _ = _stream(tmp_path, "tr")
    monkeypatch.setattr(E, "_POOL_WORKERS", 1)
    monkeypatch.setattr(E, "_pool", None)
    with _open(path) as img:
        assert img.read(0, img.size) == want    # the parent's pool now has a thread
    pid = os.fork()
    if pid == 0:                                # the child: its copy of the pool is dead
        ok = False
        try:
            with _open(path) as img:
                ok = img.read(0, img.size) == want
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_runs_of_a_rewritten_grain_table_read_like_the_entries_say(tmp_path: Path) -> None:
    """Runs of host-contiguous grains (the lookup's fast path) stop exactly where an entry
    breaks the sequence: a grain one sector off, a repeated grain, a zeroed-grain entry
    (1), an unallocated one (0); every byte is checked against the file through the
    entries, grain by grain, for requests that start and end inside grains."""
    raw, path = tmp_path / "src.raw", tmp_path / "d.vmdk"
    _workload(raw, "rrtr")
    diskimg.convert(raw, path, "vmdk", format="raw", options={"zeroed_grain": True})
    gt_at, hosts = _grain_hosts(path)
    orig = [h // S.SECTOR for h in hosts[:64]]
    assert orig == list(range(orig[0], orig[0] + 64 * 128, 128))   # 4 MiB laid out in order
    ents = list(orig)
    ents[10] += 1                       # one sector off: not the next grain of the run
    ents[20:23] = [orig[20]] * 3        # the same grain three times
    ents[30], ents[31] = 1, 0           # zeroed, unallocated
    ents[40:44] = orig[44:48]           # a run that jumps ahead, then one that goes back
    ents[44:48] = orig[40:44]
    with open(path, "r+b") as f:
        f.seek(gt_at)
        f.write(struct.pack(f"<{len(ents)}I", *ents))
    file = path.read_bytes()
    want = b"".join(bytes(GRAIN) if e in (0, 1) else file[e * S.SECTOR:e * S.SECTOR + GRAIN]
                    for e in ents)
    with _open(path) as img:
        assert img.read(0, 4 * MiB) == want
        for start, n in ((GRAIN - 512, 3 * GRAIN), (9 * GRAIN + 7, GRAIN + 9),
                         (19 * GRAIN + 100, 13 * GRAIN), (39 * GRAIN, 10 * GRAIN + 1)):
            assert img.read(start, n) == want[start:start + n], (start, n)


READ_PROBE = """\
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import diskimg
buf = bytearray(1 << 20)
h = hashlib.sha256()
with diskimg.open(sys.argv[2], format="vmdk") as img:
    for off in range(0, img.size, len(buf)):
        n = min(len(buf), img.size - off)
        img.readinto(off, memoryview(buf)[:n])
        h.update(memoryview(buf)[:n])
print(h.hexdigest())
print(" ".join(sorted(sys.modules)))
"""


def test_reading_a_monolithic_sparse_vmdk_loads_no_codec_of_other_subformats(
        tmp_path: Path) -> None:
    """Issue 20 item 4 (start-up share of a read): grain tables are memoryviews, not
    arrays (whose import loads the collections package); the streamOptimized, seSparse
    and zlib code loads only for such extents; one extent needs no bisect."""
    import hashlib
    import subprocess
    import sys

    raw, path = tmp_path / "src.raw", tmp_path / "d.vmdk"
    _workload(raw, "rthzr")
    diskimg.convert(raw, path, "vmdk", format="raw")
    src = str(Path(diskimg.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-S", "-c", READ_PROBE, src, str(path)],
                       capture_output=True, text=True, check=True)
    digest, modules = r.stdout.splitlines()
    assert digest == hashlib.sha256(raw.read_bytes()).hexdigest()
    loaded = set(modules.split())
    assert "diskimg.vmdk.sparse_extent" in loaded
    assert loaded & {"array", "collections", "zlib", "bisect", "diskimg.vmdk.compressed",
                     "diskimg.vmdk.stream", "diskimg.vmdk.sesparse"} == set()


#: what reading a sparse vmdk (read-only) loads of diskimg.vmdk, and what a separate
#: descriptor file adds: the write side, check, and the records of other subformats load
#: on first use (issue 20 item 4)
VMDK_READ_SIDE = {"diskimg.vmdk", "diskimg.vmdk.descriptor", "diskimg.vmdk.image",
                  "diskimg.vmdk.sparse", "diskimg.vmdk.sparse_extent"}
DESCRIPTOR_FILE = {"diskimg.vmdk.descfile", "diskimg.vmdk.extent_line", "diskimg.vmdk.flat"}
WRITE_SIDE = {"diskimg.vmdk.image_write"}    # + sparse_write for a sparse extent

READ_THEN_WRITE_PROBE = """\
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import diskimg
def vmdk_modules():
    return " ".join(sorted(m for m in sys.modules if m.startswith("diskimg.vmdk")
                           or m in ("pathlib", "re")))
with diskimg.open(sys.argv[2], format="vmdk") as img:
    print(hashlib.sha256(img.read(0, img.size)).hexdigest())
print(vmdk_modules())
with diskimg.open(sys.argv[2], "r+", format="vmdk") as img:
    img.write(int(sys.argv[3]), b"w" * 70000)
print(vmdk_modules())
"""


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_a_read_loads_only_the_read_side_and_a_write_then_loads_the_write_side(
        tmp_path: Path, subformat: str) -> None:
    """Issue 20 item 4 (the fixed cost of a read): a read-only open and a whole read load
    the read side of the vmdk package only (no grain allocation, table write-back, CID
    rewrite, check, extent protocol module; a monolithic file no descriptor-file opener);
    the first write loads the write side, and the image then holds the source's bytes
    with the written ones (every byte compared).  No subformat loads pathlib or re (a
    descriptor file's extents are resolved over names: OpenPolicy.resolve_name)."""
    import hashlib
    import subprocess
    import sys

    raw, path = tmp_path / "src.raw", tmp_path / "d.vmdk"
    _workload(raw, "rthzr")
    diskimg.convert(raw, path, "vmdk", format="raw", options={"subformat": subformat})
    src = str(Path(diskimg.__file__).resolve().parents[1])
    at = 2 * MiB - 1000                    # across a grain into a hole
    r = subprocess.run([sys.executable, "-S", "-c", READ_THEN_WRITE_PROBE, src, str(path),
                        str(at)], capture_output=True, text=True, check=True)
    digest, reading, writing = r.stdout.splitlines()
    want = bytearray(raw.read_bytes())
    assert digest == hashlib.sha256(want).hexdigest()
    read_side = VMDK_READ_SIDE | (DESCRIPTOR_FILE if subformat != "monolithicSparse" else
                                  set())
    assert set(reading.split()) == read_side
    sparse_write = {"diskimg.vmdk.sparse_write"} if "Sparse" in subformat else set()
    assert set(writing.split()) == read_side | WRITE_SIDE | sparse_write
    want[at:at + 70000] = b"w" * 70000
    with diskimg.open(path, format="vmdk") as img:
        assert img.read(0, img.size) == want


@pytest.mark.parametrize("order", ["little", "big"])
def test_grain_table_views_hold_the_little_endian_values_on_either_byte_order(
        monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """Both branches of the table codec (the host's order is patched: a big-endian
    host swaps through struct) give the entries' values, and pack back to the bytes."""
    monkeypatch.setattr(S.sys, "byteorder", order)
    vals = [0, 1, 128, 0xFFFFFFFF, 0x01020304, 7 << 20]
    raw = struct.pack(f"<{len(vals)}I", *vals)
    t = S.le_u32_array(raw)
    assert (t.format, t.tolist()) == ("I", vals)
    t[2:4] = S.u32_table([5, 6])
    assert S.pack_le_u32_array(t) == struct.pack(f"<{len(vals)}I", 0, 1, 5, 6, *vals[4:])
    assert raw == struct.pack(f"<{len(vals)}I", *vals)      # a private copy
