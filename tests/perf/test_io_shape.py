"""Performance shape, without clocks: how many system calls and block-status queries a job
issues, which threads do the work, and that every fast path gives the same bytes as the
plain one.  Wall-clock ratios live in benchmarks/bench.py, never here."""

from __future__ import annotations

import itertools
import os
import random
import threading
import zlib
from array import array
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg import operations as ops
from diskimg.hostio import aligned_buffer, open_host_file
from diskimg.hostio import cmem
from diskimg.hostio import file as hostfile
from diskimg.plan import RunKind
from diskimg.vmdk import markers as M

MiB = 1 << 20


def _workload(path: Path, size: int, seed: int = 7) -> int:
    """Sparse raw file: 1 MiB chunks of random, text, written zeros or holes; returns
    the bytes of data written (random + text)."""
    rng = random.Random(seed)
    data = 0
    line = b"disk image cluster refcount sector guest host offset\n"
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            kind = rng.choice(("random", "text", "zeros", "hole", "hole"))
            f.seek(off)
            if kind == "random":
                f.write(rng.randbytes(MiB))
                data += MiB
            elif kind == "text":
                f.write((line * (MiB // len(line) + 1))[:MiB])
                data += MiB
            elif kind == "zeros":
                f.write(bytes(MiB))
    return data


class _Counter:
    """Counts calls of ``os`` functions (from any thread) while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: dict[str, list[tuple[Any, ...]]] = {n: [] for n in names}
        self.lock = threading.Lock()
        for n in names:
            real = getattr(os, n)

            def wrapper(*a: Any, _real: Any = real, _n: str = n) -> Any:
                with self.lock:
                    self.calls[_n].append(a)
                return _real(*a)

            monkeypatch.setattr(os, n, wrapper)

    def count(self, name: str, fd: int | None = None) -> int:
        return sum(1 for a in self.calls[name] if fd is None or a[0] == fd)


def _read_all(path: Path, fmt: str) -> bytes:
    with diskimg.open(path, format=fmt) as d:
        return d.read(0, d.size)


def test_convert_raw_to_qcow2_issues_chunk_sized_io(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    data = _workload(src, 32 * MiB)
    c = _Counter(monkeypatch, "pwrite", "preadv")
    diskimg.convert(src, dst, "qcow2", format="raw")
    monkeypatch.undo()
    chunks = data // ops.CHUNK + 1
    # one read per data chunk (plus headers), one data write per chunk plus metadata
    assert c.count("preadv") <= chunks + 8
    assert c.count("pwrite") <= 2 * chunks + 16
    assert _read_all(dst, "qcow2") == src.read_bytes()


def test_pipelined_and_plain_copy_write_the_same_image(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    _workload(src, 24 * MiB, seed=11)
    outs = []
    for pipelined in (True, False):
        out = tmp_path / f"out-{pipelined}.qcow2"
        diskimg.create(out, "qcow2", 24 * MiB)
        with diskimg.open(src, format="raw") as s, diskimg.open(out, "r+", "qcow2") as t:
            cp = ops._Copier(t, zero_init=True, target_backing=False, backing_end=None,
                             min_sparse=4096, alignment=8, compress=False, total=s.size)
            cp.copy(s, 0, pipelined)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_compressed_source_is_decoded_on_worker_threads_and_written_in_big_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, zq, out = tmp_path / "src.raw", tmp_path / "z.qcow2", tmp_path / "out.raw"
    data = _workload(src, 16 * MiB, seed=3)
    diskimg.convert(src, zq, "qcow2", format="raw", compress=True)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the decode pool needs two CPUs")
    from diskimg.qcow2 import compress as qc

    threads: set[str] = set()
    real = qc.decompress

    def spy(*a: Any) -> bytes:
        threads.add(threading.current_thread().name)
        return real(*a)

    monkeypatch.setattr(qc, "decompress", spy)
    c = _Counter(monkeypatch, "pwrite")
    diskimg.convert(zq, out, "raw", format="qcow2")
    monkeypatch.undo()
    assert threads and all(t.startswith("diskimg-dec") for t in threads)
    # 64 KiB clusters arrive one by one; they reach the target gathered (2 MiB writes)
    assert c.count("pwrite") <= 2 * (data // ops.CHUNK) + 8
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.qemu
def test_convert_outputs_match_qemu_img_byte_for_byte(tmp_path: Path, qemu_img: str,
                                                     run: Any) -> None:
    src = tmp_path / "src.raw"
    _workload(src, 24 * MiB, seed=5)
    zq = tmp_path / "z.qcow2"
    run([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(zq)])
    for s, sfmt in ((src, "raw"), (zq, "qcow2")):
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        for p in (ours, theirs):
            p.unlink(missing_ok=True)
        diskimg.convert(s, ours, "qcow2", format=sfmt)
        run([qemu_img, "convert", "-f", sfmt, "-O", "qcow2", str(s), str(theirs)])
        assert ours.read_bytes() == theirs.read_bytes()


def test_block_status_cost_follows_allocated_data_not_virtual_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "big.qcow2", tmp_path / "out.qcow2"
    diskimg.create(src, "qcow2", 16 << 40)
    with diskimg.open(src, "r+", "qcow2") as d:
        d.write(5 << 40, os.urandom(3 * MiB))
    calls = [0]
    from diskimg.qcow2.image import Qcow2Image

    real = Qcow2Image._status

    def counting(self: Any, off: int, n: int) -> Any:
        calls[0] += 1
        return real(self, off, n)

    monkeypatch.setattr(Qcow2Image, "_status", counting)
    diskimg.convert(src, dst, "qcow2", format="qcow2")
    monkeypatch.undo()
    # 16 TiB in CHUNK steps would be 8M queries, one per L2 table 32768 (qemu-img's
    # way); empty L1 entries are skipped in one query, so a handful remain
    convert_calls = calls[0]
    assert convert_calls < 50
    with diskimg.open(src, format="qcow2") as a, diskimg.open(dst, format="qcow2") as b:
        assert a.read(5 << 40, 3 * MiB) == b.read(5 << 40, 3 * MiB)
        calls[0] = 0
        monkeypatch.setattr(Qcow2Image, "_status", counting)
        entries = list(a.map())
        assert calls[0] < 50
        assert [(e.start, e.length, e.data) for e in entries] == [
            (0, 5 << 40, False), (5 << 40, 3 * MiB, True),
            ((5 << 40) + 3 * MiB, (11 << 40) - 3 * MiB, False)]


class _Failing(diskimg.BlockDevice):
    format = "raw"

    def __init__(self, size: int, fail_at: int) -> None:
        self.size, self.fail_at = size, fail_at

    def _readinto(self, offset: int, buf: memoryview) -> None:
        if offset >= self.fail_at:
            raise OSError(5, "Input/output error")
        buf[:] = b"\x01" * len(buf)




def test_reader_thread_errors_reach_the_caller_and_the_thread_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readers: list[Any]) -> None:
    from diskimg.ops import copier

    monkeypatch.setattr(copier, "_INLINE_MAX", 0)  # (a source this small is copied inline)
    with pytest.raises(OSError, match="Input/output error"):
        diskimg.convert(_Failing(16 * MiB, 6 * MiB), tmp_path / "o.raw", "raw")
    assert len(readers) == 1 and readers[0].ident is not None
    assert not readers[0].running.locked()  # the reader has returned


def test_writer_errors_stop_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       readers: list[Any]) -> None:
    from diskimg.ops import copier

    monkeypatch.setattr(copier, "_INLINE_MAX", 0)  # (a source this small is copied inline)

    class Tgt(diskimg.BlockDevice):
        format, size, read_only = "raw", 32 * MiB, False

        def _write(self, offset: int, data: memoryview) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        diskimg.convert(_Failing(32 * MiB, 1 << 62), Tgt(), "raw", target_exists=True)
    assert len(readers) == 1 and readers[0].ident is not None
    assert not readers[0].running.locked()  # the reader has returned


@pytest.mark.parametrize("shift", [0, 1, 16, 33, 4080])
@pytest.mark.parametrize("offset", [5, 4096, 4107])
def test_large_reads_are_copied_at_a_fast_skew(tmp_path: Path, shift: int, offset: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel copies every large read at a skew (destination address - file offset,
    mod 4096) of 0 or at least 32 (1-31 is 4K aliasing: several times slower), into the
    caller's buffer itself (no bounce buffer), and the bytes are those of the file, zeros
    past its end.  A read that would be at a slow skew is made at skew 48, not 0: the
    memmove that puts it in place is then short (one of 4080 bytes 4K-aliases itself)."""
    p = tmp_path / "f"
    payload = os.urandom(3 * MiB + 123)
    p.write_bytes(payload)
    h = open_host_file(p)
    try:
        store = bytearray(4 * MiB + 8192)
        for end in (3 * MiB + 4096, 2 * MiB + 17):     # past EOF; inside the file
            dst = memoryview(store)[shift : shift + end]
            dst[:] = b"\xee" * end
            c = _Counter(monkeypatch, "preadv")
            h.preadinto(offset, dst)
            monkeypatch.undo()
            inside = min(end, len(payload) - offset)
            assert bytes(dst[:inside]) == payload[offset:offset + inside]
            assert not any(dst[inside:])
            for _fd, bufs, at in c.calls["preadv"]:
                assert bufs[0].obj is store
                if len(bufs[0]) >= 64 << 10:
                    skew = (cmem.address(bufs[0]) - at) % 4096
                    assert skew == 0 or skew >= 32, (skew, at)
                    natural = (cmem.address(dst) - offset) % 4096
                    if 0 < natural < 32 and at == offset:
                        assert skew == 48, (natural, skew)
            assert c.count("preadv") <= 4
    finally:
        h.close()


def test_aligned_buffer_is_aligned() -> None:
    buf = aligned_buffer(ops.CHUNK)
    assert hostfile._page_offset(memoryview(buf)) == 0 and len(buf) == ops.CHUNK


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_reads_into_diskimg_aligned_buffer_skip_the_bounce(tmp_path: Path, fmt: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """``diskimg.aligned_buffer`` is the copy-free way to read: the kernel fills it
    directly, and the bytes are those a bytearray (bounced) gets."""
    src = tmp_path / "s.raw"
    _workload(src, 8 * MiB)
    img = tmp_path / f"i.{fmt}"
    diskimg.convert(src, img, fmt)
    want = src.read_bytes()
    mm = diskimg.aligned_buffer(MiB)
    c = _Counter(monkeypatch, "preadv")
    with diskimg.open(img) as dev:
        got = bytearray()
        for off in range(0, dev.size, MiB):
            dev.readinto(off, mm)
            got += mm
    monkeypatch.undo()
    assert got == want
    big = [args[1][0] for args in c.calls["preadv"] if len(args[1][0]) >= 64 << 10]
    assert big and all(hostfile._page_offset(b) % hostfile._ALIGN == 0 for b in big)
    assert all(b.obj is mm for b in big)  # the caller's buffer, not the bounce buffer


def test_incompressible_grains_are_stored_and_still_valid_zlib() -> None:
    rnd = os.urandom(65536)
    text = (b"guest host sector\n" * 4000)[:65536]
    head_random = rnd[:8192] + bytes(65536 - 8192)
    assert M.looks_incompressible(rnd)
    assert not M.looks_incompressible(text)
    assert not M.looks_incompressible(head_random)
    for g in (rnd, text, head_random):
        out = M.compress_grain(g)
        assert zlib.decompress(out) == g
    assert len(M.compress_grain(text)) < 4096
    assert len(M.compress_grain(head_random)) < 16384


def test_stream_optimized_output_roundtrips(tmp_path: Path) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "s.vmdk"
    _workload(src, 8 * MiB, seed=9)
    diskimg.convert(src, out, "vmdk", format="raw",
                    options={"subformat": "streamOptimized"})
    assert _read_all(out, "vmdk") == src.read_bytes()


def test_pwritev_writes_all_pieces_in_one_call(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    h = open_host_file(tmp_path / "f", True, create=True)
    try:
        parts = [os.urandom(65536) for _ in range(32)] + [b"", bytearray(b"tail")]
        c = _Counter(monkeypatch, "pwritev")
        h.pwritev(4096, parts)
        monkeypatch.undo()
        assert c.count("pwritev") == 1
        assert h.pread(4096, 32 * 65536 + 4) == b"".join(parts)
    finally:
        h.close()


# --- qcow2 run allocation: one refcount update per run, one data write per host run -----


def _data_writes(c: _Counter, fd: int, min_len: int) -> int:
    """pwrite/pwritev calls on ``fd`` carrying at least ``min_len`` bytes (guest data;
    metadata writes are smaller or go out at flush)."""
    n = sum(1 for a in c.calls["pwrite"] if a[0] == fd and len(a[1]) >= min_len)
    return n + sum(1 for a in c.calls["pwritev"]
                   if a[0] == fd and sum(len(memoryview(b)) for b in a[1]) >= min_len)


def test_large_write_allocates_one_run_and_writes_it_with_one_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "a.qcow2"
    diskimg.create(img, "qcow2", 64 * MiB)
    payload = os.urandom(8 * MiB)
    with diskimg.open(img, "r+", "qcow2") as d:
        fd = d.host.fd  # type: ignore[attr-defined]
        c = _Counter(monkeypatch, "pwrite", "pwritev")
        d.write(MiB, payload)
        monkeypatch.undo()
        # 128 new clusters, one host-contiguous run: one data write, nothing else yet
        assert _data_writes(c, fd, 64 << 10) == 1
        assert c.count("pwrite", fd) + c.count("pwritev", fd) == 1
    with diskimg.open(img, format="qcow2") as d:
        assert d.read(MiB, 8 * MiB) == payload
        offs = [e.offset for e in d.map() if e.data]
    assert len(offs) == 1  # one extent, host contiguous


def test_run_allocation_is_per_l2_table_range(tmp_path: Path) -> None:
    """4 KiB clusters: a 12 MiB write crosses L2 tables (2 MiB of guest each) and refcount
    blocks (8 MiB of host each).  Like qemu, the allocation unit is the part of a request
    inside one L2 table: one write gives the layout of the same bytes written one table
    range at a time, and new refcount blocks land after the run being allocated."""
    payload = os.urandom(12 * MiB)
    start = 3 * MiB
    maps = []
    for split in (False, True):
        img = tmp_path / f"s{split}.qcow2"
        diskimg.create(img, "qcow2", 32 * MiB, options={"cluster_size": "4096"})
        with diskimg.open(img, "r+", "qcow2") as d:
            if split:
                bounds = [start, *range(4 * MiB, start + len(payload), 2 * MiB),
                          start + len(payload)]
                for lo, hi in itertools.pairwise(bounds):
                    d.write(lo, payload[lo - start : hi - start])
            else:
                d.write(start, payload)
        with diskimg.open(img, format="qcow2") as d:
            assert d.read(start, len(payload)) == payload
            maps.append([e.to_json() for e in d.map()])
            assert d.check().exit_code == 0  # type: ignore[attr-defined]
    assert maps[0] == maps[1]


@pytest.mark.qemu
@pytest.mark.parametrize("refcount_bits", [1, 16, 64])
def test_run_allocation_puts_clusters_where_qemu_does(tmp_path: Path, qemu_img: str,
                                                      qemu_io: str, run: Any,
                                                      refcount_bits: int) -> None:
    """Runs crossing L2 tables and (64-bit refcounts: every 2 MiB of host) refcount
    blocks, sub-byte refcounts included: the same host offsets as qemu."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    writes = [(3 * MiB, 12 * MiB), (100 << 10, 5000), (20 * MiB, 3 * MiB)]
    for p in (ours, theirs):
        run([qemu_img, "create", "-f", "qcow2", "-o",
             f"cluster_size=4096,refcount_bits={refcount_bits}", p, "32M"])
    run([qemu_io, "-f", "qcow2", *[a for off, n in writes
                                   for a in ("-c", f"write -P 0x5a {off} {n}")], theirs])
    with diskimg.open(ours, "r+", "qcow2") as d:
        for off, n in writes:
            d.write(off, b"\x5a" * n)
    maps = [run([qemu_img, "map", "--output=json", "-f", "qcow2", p]).stdout
            for p in (ours, theirs)]
    assert maps[0] == maps[1]
    run([qemu_img, "check", ours])


def test_convert_compressed_writes_runs_of_clusters_not_single_clusters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    _workload(src, 16 * MiB, seed=13)
    c = _Counter(monkeypatch, "pwrite", "pwritev")
    diskimg.convert(src, dst, "qcow2", format="raw", compress=True,
                    options={"compression_type": "zstd"})
    monkeypatch.undo()
    with diskimg.open(dst, format="qcow2") as d:
        entries = list(d.map())
        clusters = sum(e.length for e in entries if e.data) // (64 << 10)
        assert d.read(0, d.size) == src.read_bytes()
    assert clusters > 64
    # a chunk of consecutive clusters goes out with one call (plus metadata), not one each
    assert c.count("pwrite") + c.count("pwritev") < clusters // 4


@pytest.mark.parametrize("size", [16 * MiB, 16 * MiB - 3 * 512])
def test_batched_compressed_convert_equals_cluster_by_cluster_writes(
        tmp_path: Path, size: int) -> None:
    """convert -c (batched writes) gives the bytes write_compressed() one cluster at a
    time gives: same allocations in the same order, incompressible clusters stored
    plain, zero clusters skipped, the disk's partial last cluster handled."""
    src = tmp_path / "src.raw"
    _workload(src, 16 * MiB, seed=21)
    with open(src, "r+b") as f:
        f.truncate(size)
        f.seek(size - 1000)
        f.write(os.urandom(1000))  # the last (partial) cluster does not compress
    data = src.read_bytes()
    batched, single = tmp_path / "b.qcow2", tmp_path / "s.qcow2"
    diskimg.convert(src, batched, "qcow2", format="raw", compress=True)
    cs = 64 << 10
    diskimg.create(single, "qcow2", len(data))
    with diskimg.open(single, "r+", "qcow2") as d:
        for off in range(0, len(data), cs):
            piece = data[off : off + cs]
            if any(piece):
                d.write_compressed(off, piece)  # type: ignore[attr-defined]
    assert batched.read_bytes() == single.read_bytes()
    with diskimg.open(batched, format="qcow2") as d:
        assert d.read(0, d.size) == data
        assert d.check().exit_code == 0  # type: ignore[attr-defined]


def test_compressed_convert_into_existing_image_keeps_guest_order(tmp_path: Path) -> None:
    """-n into an image with data: zero chunks and zero clusters of the source overwrite
    the old contents in guest order, between the compressed runs."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    _workload(src, 8 * MiB, seed=5)
    diskimg.create(dst, "qcow2", 8 * MiB)
    with diskimg.open(dst, "r+", "qcow2") as d:
        d.write(0, b"\xee" * (8 * MiB))
    diskimg.convert(src, dst, "qcow2", format="raw", compress=True, target_exists=True)
    with diskimg.open(dst, format="qcow2") as d:
        assert d.read(0, d.size) == src.read_bytes()
        assert d.check().exit_code == 0  # type: ignore[attr-defined]


def test_l2_runs_are_found_with_few_table_comparisons(tmp_path: Path) -> None:
    """A fully allocated, host-contiguous L2 table maps as one extent, and a table with
    an interruption every few clusters still maps exactly (the slice comparison falls
    back to entry by entry)."""
    from diskimg.qcow2.mapper import progression_end as _progression_end

    ents = array("Q", range(1 << 63 | 0x50000, (1 << 63 | 0x50000) + 100 * 65536, 65536))
    assert _progression_end(ents, 1, 100, ents[1], 65536) == 100
    ents[57] = 0
    assert _progression_end(ents, 1, 100, ents[1], 65536) == 57
    assert _progression_end(ents, 1, 40, ents[1], 65536) == 40
    zeros = array("Q", bytes(8 * 300))
    zeros[299] = 1
    assert _progression_end(zeros, 0, 300, 0, 0) == 299
    # hostile entries whose progression would overflow 64 bits: no fast path, no error
    top = array("Q", [(1 << 64) - 65536, (1 << 64) - 1])
    assert _progression_end(top, 0, 2, top[0], 65536) == 0


@pytest.mark.qemu
@pytest.mark.parametrize("sparse", [4096, 65536])
def test_decoded_compressed_runs_leave_the_holes_qemu_leaves(
        tmp_path: Path, qemu_img: str, run: Any, sparse: int) -> None:
    """Compressed clusters are decoded a chunk at a time, but zero runs inside them still
    become holes exactly where qemu-img's per-cluster runs put them (-S 4k and 64k)."""
    src, zq = tmp_path / "src.raw", tmp_path / "z.qcow2"
    rng = random.Random(sparse)
    cs = 64 << 10
    with open(src, "wb") as f:
        for c in range(96):
            lead = rng.choice((0, 0, 4096, 8192, 32768, cs - 512))
            f.write(bytes(lead) + (b"guest sector %d " % c * 6000)[: cs - lead])
    run([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2", src, zq])
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    diskimg.convert(zq, ours, "raw", format="qcow2", sparse_size=sparse)
    run([qemu_img, "convert", "-S", str(sparse), "-f", "qcow2", "-O", "raw", zq, theirs])
    assert ours.read_bytes() == src.read_bytes()
    maps = [run([qemu_img, "map", "--output=json", "-f", "raw", p]).stdout
            for p in (ours, theirs)]
    assert maps[0] == maps[1]


def test_encrypted_run_is_encrypted_in_pieces_and_written_with_one_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LUKS: a 2 MiB write into new clusters is encrypted 64 KiB at a time (small
    temporaries) and still reaches the file with one pwritev; it reads back."""
    img = tmp_path / "l.qcow2"
    kw: dict[str, Any] = {"secrets": {"s": b"pw"}}
    diskimg.create(img, "qcow2", 16 * MiB, options={
        "encrypt.format": "luks", "encrypt.key-secret": "s", "encrypt.iter-time": "10"}, **kw)
    payload = os.urandom(2 * MiB)
    with diskimg.open(img, "r+", "qcow2", options={"encrypt.key-secret": "s"}, **kw) as d:
        fd = d.host.fd  # type: ignore[attr-defined]
        c = _Counter(monkeypatch, "pwrite", "pwritev")
        d.write(4 * MiB, payload)
        monkeypatch.undo()
        assert _data_writes(c, fd, 64 << 10) == 1
        assert c.count("pwritev", fd) == 1
    assert payload[:4096] not in img.read_bytes()  # no plaintext reached the file
    with diskimg.open(img, format="qcow2", options={"encrypt.key-secret": "s"}, **kw) as d:
        assert d.read(4 * MiB, 2 * MiB) == payload
        assert d.read(4 * MiB + 1000, 70000) == payload[1000:71000]


def _reference_next_zero_sector(buf: bytes, pos: int, end: int) -> int:
    """Sector by sector: the first whole zero sector (aligned to ``pos``) in [pos, end)."""
    for s in range(pos, end - 511, 512):
        if not any(buf[s : s + 512]):
            return s
    return end


@pytest.mark.parametrize("seed", range(6))
def test_zero_sector_search_skips_by_sector_heads_and_finds_what_a_full_scan_finds(
        seed: int) -> None:
    """The sparse detection of convert rules sectors out by their first 8 bytes (read
    strided, in C) before scanning: zero heads on data sectors, zero words straddling two
    heads, zero sectors at any place and buffers of odd length find the same sector as a
    byte-by-byte scan, so the hole layout (compared with qemu-img elsewhere) is kept."""
    rng = random.Random(seed)
    n = 64 * 512 + rng.choice((0, 100, 511))
    buf = bytearray(rng.randbytes(n))
    for s in rng.sample(range(0, n - 512, 512), 10):
        buf[s : s + 8] = bytes(8)  # zero head, data after it: not a zero sector
    for s in rng.sample(range(0, n - 512, 512), 6):
        buf[s + 4 : s + 12] = bytes(8)  # zero word across two heads' bytes
    for s in rng.sample(range(512, n - 512, 512), rng.randrange(3)):
        buf[s : s + 512] = bytes(512)  # whole zero sectors
    mm = aligned_buffer(n)
    mm[:n] = buf
    for pos in (0, 512, 3 * 512, rng.randrange(0, n // 2)):
        for end in (n, n - n % 512, rng.randrange(pos, n + 1)):
            want = _reference_next_zero_sector(bytes(buf), pos, end)
            assert ops._next_zero_sector(buf, pos, end) == want
            assert ops._next_zero_sector(mm, pos, end) == want
    ref = [(s, ln, d) for s, ln, d in ops.sparse_runs(buf, n, 4096, 0)]
    assert ops.sparse_runs(mm, n, 4096, 0) == ref
    assert sum(ln for _, ln, _ in ref) == n


def test_uncompressed_qcow2_convert_starts_no_decoder_threads(tmp_path: Path) -> None:
    """A qcow2 source without compressed clusters is copied by the reader thread alone:
    the decompression pool (and its import) is only started by a compressed cluster."""
    src = tmp_path / "s.qcow2"
    diskimg.create(src, "qcow2", 4 * MiB)
    with diskimg.open(src, "r+") as img:
        img.write(MiB, os.urandom(MiB))
    seen: list[str] = []
    orig = ops._ClusterDecoder.decode_into

    def spy(self: Any, batch: Any, buf: Any) -> Any:
        seen.append("decode")
        return orig(self, batch, buf)

    ops._ClusterDecoder.decode_into = spy  # type: ignore[method-assign]
    try:
        plan = iter([(RunKind.DATA, MiB, MiB, None)])
        with diskimg.open(src) as dev, ops._ReadAhead(dev, plan) as ahead:
            items = list(ahead)
            assert ahead.decoder is None or ahead.decoder.pool is None
        assert not seen
        assert [k for k, *_ in items] == [RunKind.DATA]
    finally:
        ops._ClusterDecoder.decode_into = orig  # type: ignore[method-assign]
    out = tmp_path / "o.raw"
    diskimg.convert(src, out, "raw")
    with diskimg.open(src) as dev:
        assert out.read_bytes() == dev.read(0, 4 * MiB)
