"""The convert copy loop's fast paths give qemu-img's result: the zero scan of each data
chunk runs on the read-ahead thread (overlapping the writes) with the target offset of
the chunk, so concatenated sources whose boundaries are not cluster aligned are split
into holes exactly where qemu-img splits them.  Clock-free: speed is benchmarks/' job."""

from __future__ import annotations

import hashlib
import os
import _thread
import random
import threading
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.ops import copier

MiB = 1 << 20
SECTOR = 512


def _sources(tmp_path: Path) -> list[Path]:
    """Raw sources whose sizes are odd sector counts, with data, written zeros and holes
    at every alignment around their ends (so each target chunk starts at another
    alignment than its source chunk)."""
    rng = random.Random(20)
    paths = []
    for i, size in enumerate((MiB + 3 * SECTOR, 3 * MiB - 5 * SECTOR, 2 * MiB + SECTOR)):
        p = tmp_path / f"s{i}.raw"
        with open(p, "wb") as f:
            f.truncate(size)
            for _ in range(24):
                at = rng.randrange(0, size - 8192) // SECTOR * SECTOR
                ln = rng.choice([SECTOR, 3 * SECTOR, 4096, 9 * SECTOR, 65536 + SECTOR])
                f.seek(at)
                f.write(rng.randbytes(ln) if rng.random() < 0.7 else bytes(ln))
            f.seek(size - SECTOR)
            f.write(b"\x01" * SECTOR)  # a data sector right at the end
        paths.append(p)
    return paths


def _scan_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """``(ident, name)`` of the threads that run the copier's zero scan
    (``sparse_runs``), one per call, from now on."""
    threads: list[tuple[int, str]] = []
    real = copier.sparse_runs

    def spy(*a: Any) -> Any:
        threads.append((_thread.get_ident(), threading.current_thread().name))
        return real(*a)

    monkeypatch.setattr(copier, "sparse_runs", spy)
    return threads


def _started_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the ``threading`` threads started from now on (the worker pools';
    the read-ahead reader is a ``_thread`` thread, seen by the ``readers`` fixture)."""
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


@pytest.mark.qemu
@pytest.mark.parametrize("ofmt", ["raw", "qcow2"])
def test_concatenated_sources_same_map_and_bytes_as_qemu(tmp_path: Path, qemu: Any,
                                                         ofmt: str) -> None:
    srcs = _sources(tmp_path)
    q_out, d_out = tmp_path / f"q.{ofmt}", tmp_path / f"d.{ofmt}"
    qemu.img("convert", "-f", "raw", "-O", ofmt, *srcs, q_out)
    diskimg.convert([str(s) for s in srcs], str(d_out), ofmt, format="raw")
    want = b"".join(s.read_bytes() for s in srcs)
    assert qemu.raw_bytes(d_out, ofmt) == want
    assert qemu.map(d_out, ofmt) == qemu.map(q_out, ofmt)
    if ofmt == "qcow2":
        qemu.check_clean(d_out)


def test_zero_scan_runs_on_the_readahead_thread(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                readers: list[Any]) -> None:
    """Every data chunk of a pipelined copy is scanned once, on the read-ahead thread,
    and the target is the source's bytes (sources this small are copied inline unless
    the threshold is lowered: see the next test)."""
    srcs = _sources(tmp_path)
    scans = _scan_threads(monkeypatch)
    monkeypatch.setattr(copier, "_INLINE_MAX", 0)
    out = tmp_path / "o.qcow2"
    diskimg.convert([str(s) for s in srcs], str(out), "qcow2", format="raw")
    assert len(readers) == len(srcs)  # a reader per source, none running now
    assert not any(r.running.locked() for r in readers)
    threads = [ident for ident, _ in scans]
    assert threads and set(threads) <= {r.ident for r in readers}
    assert _thread.get_ident() not in threads
    with diskimg.open(out) as img:
        got = hashlib.sha256(img.read(0, img.size)).hexdigest()
    assert got == hashlib.sha256(b"".join(s.read_bytes() for s in srcs)).hexdigest()


def test_small_sources_are_copied_inline_with_the_bytes_of_a_pipelined_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readers: list[Any]) -> None:
    """Sources of at most ``_INLINE_MAX`` bytes are copied on the caller's thread: no
    read-ahead thread is started, every chunk is scanned on the caller's thread, and
    the target holds every byte (and every hole) that the pipelined copy writes."""
    srcs = _sources(tmp_path)
    assert all(s.stat().st_size <= copier._INLINE_MAX for s in srcs)
    scans = _scan_threads(monkeypatch)
    started = _started_threads(monkeypatch)
    inline = tmp_path / "inline.qcow2"
    diskimg.convert([str(s) for s in srcs], str(inline), "qcow2", format="raw")
    assert started == [] and readers == []
    assert scans and {ident for ident, _ in scans} == {_thread.get_ident()}
    monkeypatch.setattr(copier, "_INLINE_MAX", 0)
    piped = tmp_path / "piped.qcow2"
    diskimg.convert([str(s) for s in srcs], str(piped), "qcow2", format="raw")
    assert readers and all(r.ident is not None for r in readers)
    assert inline.read_bytes() == piped.read_bytes()  # same clusters, same holes
    with diskimg.open(inline) as img:
        got = hashlib.sha256(img.read(0, img.size)).hexdigest()
    assert got == hashlib.sha256(b"".join(s.read_bytes() for s in srcs)).hexdigest()


def test_zero_chunks_of_a_raw_source_leave_the_readahead_ring_at_once(
        tmp_path: Path) -> None:
    """A data chunk (a raw file's written zeros) that the zero scan finds all zero is
    handed over without its buffer, which goes back to the ring at once: a run of zero
    chunks longer than the ring does not wait for the writes of the data before it.
    The copy is still the source's bytes."""
    from diskimg.ops import readahead
    from diskimg.ops.common import CHUNK
    from diskimg.plan import RunKind

    src = tmp_path / "z.raw"
    n_zero = readahead._BUFFERS + 3
    rng = random.Random(3)
    head, tail = rng.randbytes(CHUNK), rng.randbytes(CHUNK)
    src.write_bytes(head + bytes(n_zero * CHUNK) + tail)
    with diskimg.open(src, format="raw") as s:
        cp = copier._Copier(s, zero_init=True, target_backing=False, backing_end=None,
                            min_sparse=4096, alignment=8, compress=False, total=s.size)
        items = []
        with readahead._ReadAhead(s, cp._plan(s, 0), cp._scan(0)) as ahead:
            for kind, pos, n, item, runs in ahead:
                items.append((kind, pos, n, item is None, runs))
                ahead.release(item)
    assert [(k, p, n, none) for k, p, n, none, _ in items] == (
        [(RunKind.DATA, 0, CHUNK, False)]
        + [(RunKind.DATA, (1 + i) * CHUNK, CHUNK, True) for i in range(n_zero)]
        + [(RunKind.DATA, (1 + n_zero) * CHUNK, CHUNK, False)])
    assert all(runs == [(0, CHUNK, False)] for _, _, _, none, runs in items if none)
    out = tmp_path / "z.qcow2"
    diskimg.convert(src, out, "qcow2", format="raw")
    with diskimg.open(out) as img:
        assert img.read(0, img.size) == src.read_bytes()
        assert [(e.start, e.length) for e in img.map() if e.data] == [
            (0, CHUNK), ((1 + n_zero) * CHUNK, CHUNK)]


def test_copy_into_a_new_qcow2_skips_the_per_cluster_write_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole clusters none of which is allocated (every data chunk of a convert into a
    new image) are written without the general path's per-cluster steps (no old entry to
    drop), with the bytes and layout the general path gives: a partial cluster and an
    allocated one still go through it."""
    from diskimg.qcow2 import cluster

    dropped: list[int] = []
    real = cluster.free_entry

    def spy(img: Any, ent: int, punch: bool = False) -> None:
        dropped.append(ent)
        real(img, ent, punch)

    monkeypatch.setattr(cluster, "free_entry", spy)
    src, out = tmp_path / "n.raw", tmp_path / "n.qcow2"
    data = random.Random(5).randbytes(4 * MiB)
    with open(src, "wb") as f:
        f.write(data)
        f.truncate(6 * MiB)  # a hole at the end
    diskimg.convert(src, out, "qcow2", format="raw")
    assert dropped == []  # 64 whole new clusters: no per-cluster entry work
    # a partial cluster in the hole: the general path (copy-on-write of zeros)
    with diskimg.open(out, "r+", "qcow2") as img:
        img.write(5 * MiB + 100, b"\x07" * 700)
        img.write(0, data[:65536])  # in place
    assert dropped == [0]
    want = bytearray(data + bytes(2 * MiB))
    want[5 * MiB + 100 : 5 * MiB + 800] = b"\x07" * 700
    with diskimg.open(out) as img:
        assert hashlib.sha256(img.read(0, img.size)).digest() == hashlib.sha256(want).digest()
        assert [(e.start, e.length) for e in img.map() if e.data] == [
            (0, 4 * MiB), (5 * MiB, 65536)]
        assert img.check().exit_code == 0  # type: ignore[attr-defined]


def test_a_long_data_run_is_cut_into_chunks_from_one_status_query(tmp_path: Path) -> None:
    """The plan cuts a data run longer than CHUNK into CHUNK pieces itself: asking the
    source again at each piece would only find the rest of the same run.  Same plan
    as one query per piece, and the copy is the source's bytes."""
    from diskimg.ops.common import CHUNK
    from diskimg.plan import RunKind

    src = tmp_path / "long.raw"
    data = random.Random(9).randbytes(8 * CHUNK + 4096)
    with open(src, "wb") as f:
        f.write(data)
        f.truncate(12 * CHUNK)
    with diskimg.open(src, format="raw") as s:
        calls: list[int] = []
        real = s.block_status

        def counted(pos: int, n: int, **kw: Any) -> Any:
            calls.append(pos)
            return real(pos, n, **kw)

        s.block_status = counted  # type: ignore[method-assign]
        cp = copier._Copier(s, zero_init=True, target_backing=False, backing_end=None,
                            min_sparse=4096, alignment=8, compress=False, total=s.size)
        plan = [(k, p, n) for k, p, n, _ in cp._plan(s, 0)]
    assert plan == ([(RunKind.DATA, i * CHUNK, CHUNK) for i in range(8)]
                    + [(RunKind.DATA, 8 * CHUNK, 4096),
                       (RunKind.ZERO, 8 * CHUNK + 4096, 4 * CHUNK - 4096)])
    assert len(calls) == 2  # the data run and the hole
    out = tmp_path / "long.qcow2"
    diskimg.convert(src, out, "qcow2", format="raw")
    with diskimg.open(out) as img:
        assert img.read(0, img.size) == data + bytes(4 * CHUNK - 4096)


def test_a_compressed_run_moves_a_mid_sized_copy_to_the_pool_with_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readers: list[Any]) -> None:
    """A qcow2 source above ``_DECODE_SWITCH_MIN`` (and at most ``_INLINE_MAX``) is copied
    inline while it has no compressed cluster: without one no thread starts; at its first
    compressed run the rest goes to the read-ahead thread and the decoding pool.  Either
    way the target holds every byte of the source."""
    size = copier._DECODE_SWITCH_MIN + 4 * MiB
    rng = random.Random(7)
    raw = tmp_path / "s.raw"
    data = bytearray(size)
    for at in range(0, size, MiB):
        if rng.random() < 0.7:
            data[at : at + MiB] = rng.randbytes(4096) * 256  # compressible
    raw.write_bytes(bytes(data))
    plain, packed = tmp_path / "p.qcow2", tmp_path / "c.qcow2"
    diskimg.convert(raw, plain, "qcow2", format="raw")
    diskimg.convert(raw, packed, "qcow2", format="raw", compress=True)
    head = rng.randbytes(3 * MiB)
    with diskimg.open(packed, "r+") as img:  # an uncompressed head: copied inline first
        img.write(0, head)
    data[: len(head)] = head
    started = _started_threads(monkeypatch)
    out = tmp_path / "p.raw"
    diskimg.convert(plain, out, "raw", format="qcow2")
    assert started == [] and readers == []
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(raw.read_bytes()).digest()
    out2 = tmp_path / "c.raw"
    diskimg.convert(packed, out2, "raw", format="qcow2")
    assert len(readers) == 1 and readers[0].ident is not None
    if (os.cpu_count() or 1) >= 2:
        assert any(n.startswith("diskimg-dec") for n in started)
    assert out2.read_bytes() == bytes(data)


def test_the_readahead_ring_makes_only_the_buffers_a_copy_needs(tmp_path: Path) -> None:
    """The ring's buffers are made by the reader when none is free, up to ``_BUFFERS``
    (each populated whole: it is filled whole): a source with one data chunk among holes
    makes one, a source of data chunks at most ``_BUFFERS``; the items are the source's
    bytes either way."""  # (a sparse 256 MiB image made 4 x 2 MiB before, populated or not)
    from diskimg.ops import readahead
    from diskimg.ops.common import CHUNK

    rng = random.Random(11)
    sparse, dense = tmp_path / "sparse.raw", tmp_path / "dense.raw"
    one = rng.randbytes(CHUNK)
    with open(sparse, "wb") as f:
        f.seek(5 * CHUNK)
        f.write(one)
        f.truncate(12 * CHUNK)
    data = rng.randbytes(3 * readahead._BUFFERS * CHUNK)
    dense.write_bytes(data)
    for path, want in ((sparse, bytes(5 * CHUNK) + one + bytes(6 * CHUNK)), (dense, data)):
        got = bytearray(len(want))
        with diskimg.open(path, format="raw") as s:
            cp = copier._Copier(s, zero_init=True, target_backing=False, backing_end=None,
                                min_sparse=4096, alignment=8, compress=False, total=s.size)
            with readahead._ReadAhead(s, cp._plan(s, 0)) as ahead:
                for kind, pos, n, item, _ in ahead:
                    if item is not None and kind is copier._DATA:
                        got[pos : pos + n] = memoryview(item)[:n]
                    ahead.release(item if kind is copier._DATA else None)
                made = ahead.made
        assert bytes(got) == want
        if path == sparse:
            assert made == 1
        else:  # (how many depends on how far the reader gets ahead: never more)
            assert 1 <= made <= readahead._BUFFERS


@pytest.mark.qemu
def test_decoded_clusters_are_scanned_on_the_pool_with_qemus_holes(
        tmp_path: Path, qemu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero scan of decoded compressed clusters runs on the decoding workers (the
    thread that writes does not scan them), and the target has qemu-img's bytes and
    holes: clusters with zero runs inside, at their start, at their end, a zero sector
    alone, all-zero and random (stored uncompressed) clusters."""
    cs = 65536
    rng = random.Random(31)
    text = rng.randbytes(512) * 128
    clusters = []
    for i in range(160):
        c = bytearray(text[i * 7 % 512:] + text[: i * 7 % 512])[:cs]
        kind = i % 8
        if kind == 0:
            c[8192:16384] = bytes(8192)  # an inner zero run (>= -S's 4 KiB)
        elif kind == 1:
            c[:4096] = bytes(4096)  # a leading run
        elif kind == 2:
            c[-12288:] = bytes(12288)  # a trailing run
        elif kind == 3:
            c[1024:1536] = bytes(512)  # one zero sector: too short to be a hole
        elif kind == 4:
            c = bytearray(cs)
        elif kind == 5:
            c = bytearray(rng.randbytes(cs))
        clusters.append(bytes(c))
    raw = tmp_path / "s.raw"
    raw.write_bytes(b"".join(clusters))
    src = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, src)
    scans = _scan_threads(monkeypatch)
    monkeypatch.setattr(copier, "_INLINE_MAX", 0)
    d_out, q_out = tmp_path / "d.raw", tmp_path / "q.raw"
    diskimg.convert(src, d_out, "raw", format="qcow2")
    qemu.img("convert", "-f", "qcow2", "-O", "raw", src, q_out)
    assert d_out.read_bytes() == raw.read_bytes()
    assert qemu.map(d_out, "raw") == qemu.map(q_out, "raw")
    assert scans and _thread.get_ident() not in {ident for ident, _ in scans}
    if (os.cpu_count() or 1) >= 2:
        assert any(n.startswith("diskimg-dec") for _, n in scans)
