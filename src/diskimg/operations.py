"""Library side of ``convert``, ``compare`` and ``dd``: copy/compare guest bytes between
images, skipping what block status says is zero and writing sparse output like qemu-img.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.errors import (CorruptImageError, DiskImgError, ImageLockedError,
                            UnsupportedFeatureError, UsageError)
from diskimg.hostio import HostFile, aligned_buffer

if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    from concurrent.futures import Future, ThreadPoolExecutor

CHUNK = 2 << 20  # qemu-img convert's buffer: 4096 sectors
SECTOR = 512
_ZERO_SECTOR = bytes(SECTOR)
_ZERO_WORD = bytes(8)
_NONZERO = re.compile(rb"[^\x00]")
_ZEROS = bytes(CHUNK)

Source = str | os.PathLike[str] | BlockDevice
ProgressFn = Callable[[float], None]


def _nonzero_at(buf: bytes | bytearray, pos: int, end: int) -> int:
    """First index in [pos, end) of a non-zero byte, else ``end``.

    Skips zero blocks with slice comparisons (memcmp speed) and only runs the regex on
    the one 512-byte block that holds the answer."""
    p = pos
    for step in (65536, SECTOR):
        while p < end:
            q = min(end, p + step)
            if buf[p:q] != _ZEROS[: q - p]:
                break
            p = q
        else:
            return end
    m = _NONZERO.search(buf, p, min(end, p + SECTOR))
    return m.start() if m else end


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """True if every byte of ``buf`` is zero (C-speed comparison)."""
    mv = memoryview(buf).cast("B")
    # bytes == bytes is a memcmp; memoryview == bytes compares item by item
    return all(mv[p : p + CHUNK].tobytes() == _ZEROS[: min(CHUNK, len(mv) - p)]
               for p in range(0, len(mv), CHUNK))


def _first_zero_head(buf: Any, pos: int, end: int) -> int:
    """Start of the first whole sector in [pos, end) (aligned to ``pos``) whose first 8
    bytes are zero, else ``end``.  Reads one word per sector (a strided copy in C), so
    data without zero sectors is ruled out without touching most of its bytes."""
    m = (end - pos) // SECTOR
    if m <= 0:
        return end
    heads = memoryview(buf)[pos : pos + m * SECTOR].cast("Q")[:: SECTOR // 8].tobytes()
    p = heads.find(_ZERO_WORD)
    while p > 0 and p % 8:  # a zero run straddling two heads: not a zero head
        p = heads.find(_ZERO_WORD, p + 8 - p % 8)
    return end if p < 0 else pos + p // 8 * SECTOR


def _next_zero_sector(buf: bytearray, pos: int, end: int) -> int:
    """Start of the first fully zero 512-byte sector at or after ``pos`` (sector aligned)."""
    pos = _first_zero_head(buf, pos, end)  # no zero sector before the first zero head
    i = pos
    while i < end:
        p = buf.find(_ZERO_SECTOR, i, end)
        if p < 0:
            return end
        s = pos + -(-(p - pos) // SECTOR) * SECTOR
        if s + SECTOR > end:
            return end
        nz = _nonzero_at(buf, s, s + SECTOR)
        if nz >= s + SECTOR:
            return s
        i = nz
    return end


def _allocated_sectors(buf: bytearray, pos: int, end: int, sector: int,
                       alignment: int) -> tuple[bool, int]:
    """qemu's ``is_allocated_sectors``: (is data, run length in sectors) at ``pos``."""
    n = -(-(end - pos) // SECTOR)
    first_zero = _nonzero_at(buf, pos, min(end, pos + SECTOR)) >= min(end, pos + SECTOR)
    if first_zero:
        i = (_nonzero_at(buf, pos, end) - pos) // SECTOR
    else:
        i = -(-(_next_zero_sector(buf, pos, end) - pos) // SECTOR)
    if i >= n:
        return not first_zero, n
    data = not first_zero
    tail = (sector + i) & (alignment - 1)
    if tail:
        if not data and i <= tail:
            data = True
        if data:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return data, i


def sparse_runs(buf: bytearray, length: int, min_sparse: int, offset: int,
                alignment: int = 8) -> list[tuple[int, int, bool]]:
    """Split ``buf[:length]`` into (start, length, is_data) runs like qemu-img convert -S:
    zero runs at the start count as holes, inner zero runs need ``min_sparse`` bytes.
    ``offset`` is the guest offset of ``buf[0]``; ``alignment`` is in sectors."""
    out: list[tuple[int, int, bool]] = []
    pos = 0
    min_sec = max(1, min_sparse // SECTOR)
    while pos < length:
        sector = (offset + pos) // SECTOR
        total = -(-(length - pos) // SECTOR)
        mn = min(min_sec, total)
        data, cnt = _allocated_sectors(buf, pos, length, sector, alignment)
        if data:
            used = checked = cnt
            while checked < total:
                p = pos + checked * SECTOR
                d2, c2 = _allocated_sectors(buf, p, length, sector + checked, alignment)
                checked += max(c2, 1)  # always progress
                if d2:
                    used = checked
                elif c2 >= mn:
                    break
            cnt = used
        run = min(max(cnt, 1) * SECTOR, length - pos)  # always progress (tail < 1 sector)
        if out and out[-1][2] == data:
            s, ln, _ = out[-1]
            out[-1] = (s, ln + run, data)
        else:
            out.append((pos, run, data))
        pos += run
    return out


def _open(src: Source, fmt: str | None, kw: Mapping[str, Any]) -> tuple[BlockDevice, bool]:
    if isinstance(src, BlockDevice):
        return src, False
    return api.open(src, "r", fmt, **kw), True


@dataclass(slots=True)
class _Copier:
    """qemu-img convert's copy loop.  ``zero_init``: the target reads as zeros wherever
    nothing is written (a new target without backing file whose format says so, see
    :meth:`BlockDevice.has_zero_init`), so zero runs are left unwritten; otherwise they are
    written as zeroes.  ``target_backing`` (``-B``): only the sources' own layers are
    copied, ranges they leave to their backing files are left to the target's;
    ``backing_end``: the size of a new target's backing file, past which the target reads
    zeros of its own (zero runs there are left to it, as qemu does), None if unknown."""

    tgt: BlockDevice
    zero_init: bool
    target_backing: bool
    backing_end: int | None
    min_sparse: int
    alignment: int
    compress: bool
    total: int
    done: int = 0
    progress: ProgressFn | None = None
    # write combining: small data pieces that follow each other in guest order are
    # gathered here and written with one call (the zero detection is unchanged: it still
    # runs on each block-status run, as qemu-img's does)
    pend: bytearray | None = None
    pend_off: int = 0
    pend_len: int = 0

    def zero(self, off: int, n: int) -> None:
        if self.min_sparse == 0:
            self.flush_pending()
            for p in range(off, off + n, CHUNK):
                self.tgt.write(p, _ZEROS[: min(CHUNK, off + n - p)])
        elif not self.zero_init:
            self.flush_pending()
            self.tgt.write_zeroes(off, n, may_unmap=True)

    def data(self, off: int, buf: Any, n: int) -> None:
        """Write ``buf[:n]`` (bytes, bytearray or mmap) at ``off``, sparsely."""
        if self.compress:
            self._write_compressed(off, buf, n)
            return
        mv = memoryview(buf)
        if self.min_sparse == 0:
            self.write(off, mv[:n])
            return
        for s, ln, is_data in sparse_runs(buf, n, self.min_sparse, off, self.alignment):
            if is_data:
                self.write(off + s, mv[s : s + ln])
            else:
                self.zero(off + s, ln)

    def write(self, off: int, mv: memoryview) -> None:
        """Write ``mv`` at ``off`` now (large pieces) or gathered with its neighbours."""
        n = len(mv)
        if self.pend_len and (n >= _COMBINE_BELOW or off != self.pend_off + self.pend_len
                              or self.pend_len + n > CHUNK):
            self.flush_pending()
        if n >= _COMBINE_BELOW:
            self.tgt.write(off, mv)
            return
        if self.pend is None:
            self.pend = bytearray(CHUNK)
        if not self.pend_len:
            self.pend_off = off
        self.pend[self.pend_len : self.pend_len + n] = mv
        self.pend_len += n

    def flush_pending(self) -> None:
        if self.pend_len:
            assert self.pend is not None
            n, self.pend_len = self.pend_len, 0
            self.tgt.write(self.pend_off, memoryview(self.pend)[:n])

    def _write_compressed(self, off: int, buf: bytearray, n: int) -> None:
        raise AssertionError("compressed copies go through copy_compressed")

    def copy_compressed(self, devs: Sequence[BlockDevice], workers: int) -> None:
        """``convert -c``: the sources (concatenated) go to the target one whole cluster at a
        time, as qemu-img's do: a cluster that one block-status run of a kind covers whole
        is of that kind ('zero': written as zeroes unless the target has zero-init;
        'backing' (``-B``): left to the target's backing file), every other cluster
        (partial ones included) is read from the sources; one that reads as zeros takes
        the zero path (unless ``-S 0``), the others are compressed in a pool of
        ``workers`` threads and written in guest order (qemu-img without ``-W``).

        Work is handed out a chunk (CHUNK bytes) at a time: a worker finds the zero
        clusters of the chunk and compresses the others; the main thread reads ahead and
        writes finished chunks in order, each run of non-zero clusters with one
        ``write_compressed_clusters`` call where the target has it."""
        tgt: Any = self.tgt
        native = hasattr(tgt, "write_compressed")
        compress: Callable[[memoryview], bytes | None]
        if native:
            cs = getattr(tgt, "cluster_size", None) or 65536
            compress = tgt.compress_cluster
        elif tgt.format == "vmdk":
            # qemu's vmdk takes compressed writes as ordinary ones (a streamOptimized extent
            # compresses every grain anyway); the cluster is the first extent's grain, a
            # flat extent has none
            cs = tgt.info().cluster_size or 0
            if not cs:
                raise UnsupportedFeatureError("invalid cluster size")

            def compress(piece: memoryview) -> bytes | None:
                return None  # stored as it is
        else:
            raise UnsupportedFeatureError("Compression not supported for this file format")
        step = max(cs, CHUNK // cs * cs)
        reader = _Concat(devs)
        kinds = _ClusterKinds(self._concat_runs(devs), cs, self.total,
                              zero_as_data=self.min_sparse == 0)
        batch = getattr(tgt, "write_compressed_clusters", None)
        zeros = bytes(cs)
        skip_zero = self.min_sparse != 0  # -S 0: zero clusters are compressed as well
        # chunks in flight (each holds a CHUNK buffer): bounded, so memory is too
        window = max(2, min(2 * workers, 6))
        Result = list[bytes | bool | str | None]
        pending: deque[tuple[int, int, Any, Future[Result] | list[str]]] = deque()
        spare: list[Any] = []

        def work(buf: Any, n: int, ks: list[str]) -> Result:
            """Per cluster of ``buf[:n]``: its kind when not 'data' (nothing was read),
            False (reads as zeros), None (does not shrink: stored as a normal cluster, as
            qemu does) or the compressed bytes."""
            mv = memoryview(buf)[:n]  # the buffer may be longer (the last chunk)
            out: Result = []
            for k, p in zip(ks, range(0, n, cs), strict=True):
                piece = mv[p : p + cs]
                if k != "data":
                    out.append(k)
                elif skip_zero and not piece[0] and piece.tobytes() == zeros[: len(piece)]:
                    out.append(False)
                else:
                    out.append(compress(piece))
            return out

        def put(off: int, run: list[tuple[memoryview, bytes | None]]) -> None:
            if batch is not None:
                batch(off, run)
                return
            for k, (piece, packed) in enumerate(run):
                if packed is None:
                    tgt.write(off + k * cs, piece)
                else:
                    tgt.write_compressed(off + k * cs, piece, compressed=packed)

        def skip(off: int, n: int, kind: str | bool) -> None:
            """A cluster (or run of clusters) not written as data: zeros or backing."""
            if kind != "backing" and not self.zero_init:
                self.zero(off, n)

        def drain(limit: int) -> None:
            while len(pending) > limit:
                start, n, buf, fut = pending.popleft()
                if isinstance(fut, list):  # no cluster of the chunk is read
                    for kind, p, k in _kind_runs(fut, cs, n):
                        skip(start + p, k, kind)
                    self.tick(n)
                    continue
                mv = memoryview(buf)[:n]
                run: list[tuple[memoryview, bytes | None]] = []
                run_off = start
                for k, r in enumerate(fut.result()):
                    p = k * cs
                    if r is False or isinstance(r, str):
                        if run:
                            put(run_off, run)
                            run = []
                        skip(start + p, min(cs, n - p), r)
                        continue
                    if not run:
                        run_off = start + p
                    run.append((mv[p : p + cs], r if isinstance(r, bytes) else None))
                if run:
                    put(run_off, run)
                self.tick(n)
                spare.append(buf)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, workers),
                                thread_name_prefix="diskimg-compress") as pool:
            for start in range(0, self.total, step):
                n = min(step, self.total - start)
                ks = kinds.of_chunk(start, n)
                if "data" not in ks:
                    pending.append((start, n, None, ks))
                else:
                    buf = spare.pop() if spare else aligned_buffer(step)
                    reader.readinto(start, memoryview(buf)[:n])
                    pending.append((start, n, buf, pool.submit(work, buf, n, ks)))
                drain(window)
            drain(0)
        align = getattr(tgt, "align_compressed_end", None)
        if align is not None:
            align()

    def _concat_runs(self, devs: Sequence[BlockDevice]) -> Iterator[tuple[str, int, int]]:
        """The status runs of the concatenated sources, in target offsets, consecutive
        runs of a kind merged within one source (qemu's runs never cross sources)."""
        base = 0
        for d in devs:
            kind_m, pos_m, n_m = "", 0, 0
            for kind, pos, n in self._status_runs(d, base):
                if n_m and kind == kind_m:
                    n_m += n
                    continue
                if n_m:
                    yield kind_m, base + pos_m, n_m
                kind_m, pos_m, n_m = kind, pos, n
            if n_m:
                yield kind_m, base + pos_m, n_m
            base += d.size

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None and self.total:
            self.progress(self.done * 100.0 / self.total)

    def _plan(self, src: BlockDevice,
              base: int) -> Iterator[tuple[str, int, int, list[int] | None]]:
        """(kind, position, length, runs) of ``src``: 'data' runs at most CHUNK long
        (``runs`` None), and 'zero' or 'backing' runs, consecutive ones of a kind merged
        into one item (``runs`` lists the lengths merged, progress is ticked per run)."""
        kind_m, pos_m = "", 0
        runs_m: list[int] = []
        for kind, pos, n in self._status_runs(src, base):
            if kind == "data" or (kind == "zero" and self.min_sparse == 0):
                if runs_m:
                    yield kind_m, pos_m, sum(runs_m), runs_m
                    runs_m = []
                yield kind, pos, n, None
            elif runs_m and kind == kind_m:
                runs_m.append(n)
            else:
                if runs_m:
                    yield kind_m, pos_m, sum(runs_m), runs_m
                kind_m, pos_m, runs_m = kind, pos, [n]
        if runs_m:
            yield kind_m, pos_m, sum(runs_m), runs_m

    def _status_runs(self, src: BlockDevice, base: int) -> Iterator[tuple[str, int, int]]:
        """(kind, position, length) runs of ``src`` (copied to target offset ``base``), at
        most CHUNK long for data: 'zero', 'data' or 'backing' (left to the target's
        backing file)."""
        pos, size = 0, src.size
        while pos < size:
            # ask for the rest of the disk (qemu-img asks for 2 GiB at most: that cuts the
            # runs differently, not what they are); zero and backing runs are taken whole,
            # data runs are cut at CHUNK
            n = size - pos
            if self.target_backing:
                # top layer only: the rest is the target's backing
                kind, n = _top_status(src, pos, n)
                end = self.backing_end
                if end is not None and kind == "zero":
                    # past the end of a new target's backing file the target reads zeros
                    # of its own: qemu leaves zero runs there unwritten
                    if base + pos >= end:
                        kind = "backing"
                    elif base + pos + n > end:
                        n = end - base - pos
            else:
                st, _ = src.block_status(pos, n, coarse=True)
                n = min(n, st.length)
                kind = "zero" if st.zero or (not st.allocated and not st.data) else "data"
            if kind == "data" or (kind == "zero" and self.min_sparse == 0):
                n = min(n, CHUNK)
            yield kind, pos, n
            pos += n

    def copy(self, src: BlockDevice, base: int, pipelined: bool = True) -> None:
        """Copy ``src`` to the target at ``base``.  With ``pipelined`` the source is
        planned and read on a second thread, up to ``_BUFFERS - 1`` chunks ahead of the
        writes (both sides spend their time in system calls that release the GIL)."""
        if not pipelined:
            buf = aligned_buffer(CHUNK)
            for kind, pos, n, runs in self._plan(src, base):
                if kind == "data":
                    src.readinto(pos, memoryview(buf)[:n])
                self._put(kind, base + pos, buf if kind == "data" else runs, n)
            self.flush_pending()
            return
        with _ReadAhead(src, self._plan(src, base)) as ahead:
            for kind, pos, n, item in ahead:
                if isinstance(item, _Decoded):  # compressed clusters decoded by the pool
                    item.future.result()
                    self._put_decoded(base + pos, item, n)
                    ahead.release(item.buf)
                    continue
                self._put(kind, base + pos, item, n)
                if kind == "data":
                    ahead.release(item)
            self.flush_pending()

    def _put_decoded(self, off: int, item: _Decoded, n: int) -> None:
        """Write decoded compressed clusters gathered in ``item.buf[:n]``.  Sparse
        detection works per block-status run (one cluster each), as qemu-img's does; when
        the buffer holds no zero sector at all that is the same as one run for all."""
        buf = item.buf
        if self.min_sparse == 0 or _next_zero_sector(buf, 0, n) >= n:
            self._put("data", off, buf, n)
            return
        at = 0
        for _pos, k in item.pieces:
            self._put("data", off + at, buf[at : at + k], k)
            at += k

    def _put(self, kind: str, off: int, item: Any, n: int) -> None:
        """Write one plan item: ``item`` is the buffer of a data run, or the list of the
        merged status runs of a zero or backing run (None: one run)."""
        if kind == "data":
            assert item is not None
            self.data(off, item, n)
            self.tick(n)
            return
        for k in item or (n,):
            if kind == "zero":
                # one call per block-status run, as qemu-img: a target that cannot zero
                # part of a cluster writes zeros there, whatever the next run holds
                self.zero(off, k)
                off += k
            self.tick(k)


def _top_status(src: BlockDevice, pos: int, n: int) -> tuple[str, int]:
    """The kind and length of the run at ``pos`` of ``src``'s own layer, as qemu-img
    convert -B sees it (block status above the source's backing file): 'zero', 'data',
    or 'backing' where the source shows its backing file.  An unallocated range reads as
    zeros, not as backing, when the source has no backing file or the range lies past
    the end of a shorter one."""
    st = src._status_coarse(pos, n)
    n = min(n, st.length)
    if st.zero:
        return "zero", n
    if st.allocated and st.data:
        return "data", n
    if st.allocated:
        return "backing", n
    b = src.backing
    if b is None or pos >= b.size:
        return "zero", n
    return "backing", min(n, b.size - pos)


class _ClusterKinds:
    """The kind of each target cluster for a compressed copy, from the merged status
    runs: the kind of the run that covers it whole, else 'data' (read from the sources);
    a partial last cluster is always 'data'.  ``zero_as_data`` (``-S 0``): zero runs are
    read too."""

    def __init__(self, runs: Iterator[tuple[str, int, int]], cs: int, total: int,
                 zero_as_data: bool) -> None:
        self.runs, self.cs, self.total = runs, cs, total
        self.zero_as_data = zero_as_data
        self.cur: tuple[str, int, int] = ("data", 0, 0)

    def _run_at(self, p: int) -> tuple[str, int, int]:
        while self.cur[1] + self.cur[2] <= p:
            self.cur = next(self.runs, ("data", p, self.total - p))
        return self.cur

    def of_chunk(self, start: int, n: int) -> list[str]:
        """Kinds of the clusters of [start, start + n) (``start`` cluster-aligned)."""
        kind, rs, rn = self._run_at(start)
        if rs + rn >= start + n and n % self.cs == 0:
            # fast path: one run covers the chunk (of whole clusters)
            k = "data" if kind == "zero" and self.zero_as_data else kind
            return [k] * (-(-n // self.cs))
        out = []
        for p in range(start, start + n, self.cs):
            e = p + self.cs
            kind, rs, rn = self._run_at(p)
            if e > self.total or kind == "data" or (kind == "zero" and self.zero_as_data):
                out.append("data")
                continue
            # a cluster that runs of this kind cover whole (merged runs are maximal)
            out.append(kind if rs + rn >= e else "data")
        return out


def _kind_runs(kinds: list[str], cs: int, n: int) -> Iterator[tuple[str, int, int]]:
    """(kind, offset, length) of the runs of equal kinds in a chunk of ``n`` bytes."""
    p = 0
    while p < n:
        k = kinds[p // cs]
        q = p + cs
        while q < n and kinds[q // cs] == k:
            q += cs
        yield k, p, min(q, n) - p
        p = q


_COMBINE_BELOW = 256 << 10  # data pieces shorter than this are gathered into one write
_BUFFERS = 4  # chunk buffers of a pipelined copy (one being written, the rest read ahead)


@dataclass(slots=True)
class _Decoded:
    """Consecutive compressed clusters being decoded into ``buf`` by the pool: ``pieces``
    are their block-status runs (guest position, length), in order."""

    future: Future[None]
    buf: Any
    pieces: list[tuple[int, int]]


class _ReadAhead:
    """Reads the data runs of a plan on a background thread into a small ring of CHUNK
    buffers; iterating yields ``(kind, pos, n, item)`` in plan order, ``item`` being the
    buffer (data), the lengths of the runs merged (zero, backing) or, for a run of whole
    compressed clusters (up to CHUNK bytes, several plan runs), a :class:`_Decoded`.
    Return each buffer with :meth:`release` once written.  Errors of the reader are raised
    by the iteration; leaving the ``with`` block stops the reader."""

    def __init__(self, src: BlockDevice,
                 plan: Iterator[tuple[str, int, int, list[int] | None]]) -> None:
        self.src, self.plan = src, plan
        self.decoder = _ClusterDecoder.for_device(src)
        self.free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(_BUFFERS):
            self.free.put(aligned_buffer(CHUNK))
        self.ready: queue.Queue[tuple[str, int, int, Any] | BaseException | None] = \
            queue.Queue(4 * _BUFFERS)
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="diskimg-readahead",
                                       daemon=True)

    def __enter__(self) -> _ReadAhead:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.free.put(None)  # wakes a reader waiting for a buffer
        self.thread.join()
        if self.decoder is not None:
            self.decoder.close()

    def _send(self, item: tuple[str, int, int, Any] | BaseException | None) -> bool:
        """Queue ``item`` for the consumer; False when the consumer has gone."""
        while not self.stop:
            try:
                self.ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _flush_batch(self, batch: list[tuple[int, int, int]]) -> bool:
        """Hand the gathered compressed clusters to the decoder; False when stopping."""
        if not batch:
            return True
        assert self.decoder is not None
        buf = self.free.get()
        if buf is None or self.stop:
            return False
        pieces = [(pos, n) for pos, n, _ in batch]
        fut = self.decoder.decode_into(list(batch), buf)
        total = sum(n for _, n in pieces)
        batch.clear()
        return self._send(("data", pieces[0][0], total, _Decoded(fut, buf, pieces)))

    def _run(self) -> None:
        try:
            dec = self.decoder
            batch: list[tuple[int, int, int]] = []  # (pos, n, L2 entry), guest-contiguous
            size = 0
            for kind, pos, n, runs in self.plan:
                if kind == "data" and dec is not None:
                    ent = dec.entry(pos, n)
                    if ent is not None:
                        if batch and (pos != batch[-1][0] + batch[-1][1] or size + n > CHUNK):
                            if not self._flush_batch(batch):
                                return
                            size = 0
                        batch.append((pos, n, ent))
                        size += n
                        continue
                if not self._flush_batch(batch):
                    return
                size = 0
                buf: Any = runs  # zero and backing runs: what they merge
                if kind == "data":
                    buf = self.free.get()
                    if buf is None or self.stop:
                        return
                    self.src.readinto(pos, memoryview(buf)[:n])
                if not self._send((kind, pos, n, buf)):
                    return
            if self._flush_batch(batch):
                self._send(None)
        except BaseException as e:  # handed to the consumer, raised there
            self._send(e)

    def __iter__(self) -> Iterator[tuple[str, int, int, Any]]:
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.free.put(buf)


class _ClusterDecoder:
    """Decompresses the compressed clusters of a qcow2 source on a thread pool (zlib and
    zstandard release the GIL), so a convert of a compressed image uses every core like
    qemu-img's.  Only for unencrypted qcow2 images; other sources are read as usual."""

    def __init__(self, src: Any, workers: int) -> None:
        from diskimg.qcow2 import entries as E
        from diskimg.qcow2.compress import decompress

        self.src = src
        self._decode_entry = E.decode_compressed
        self._decompress = decompress
        self.fsize = src.data_host.size()
        self.workers = workers
        # started on the first compressed cluster: a source without any costs no threads
        # (nor the concurrent.futures import)
        self.pool: ThreadPoolExecutor | None = None

    @classmethod
    def for_device(cls, src: BlockDevice) -> _ClusterDecoder | None:
        workers = min(8, os.cpu_count() or 1)
        if (workers < 2 or src.format != "qcow2" or not hasattr(src, "_lookup")
                or getattr(getattr(src, "header", None), "crypt_method", True)):
            return None
        return cls(src, workers)

    def entry(self, pos: int, n: int) -> int | None:
        """The L2 entry when [pos, pos+n) lies in one compressed cluster, else None (read
        it normally)."""
        kind, run, _host, ent = self.src._lookup(pos, n)
        if kind != "compressed" or run < n:
            return None
        return int(ent)

    def decode_into(self, batch: list[tuple[int, int, int]], buf: Any) -> Future[None]:
        """Decode the ``(pos, n, entry)`` pieces back to back into ``buf`` on the pool."""
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=self.workers,
                                           thread_name_prefix="diskimg-dec")
        return self.pool.submit(self._decode_batch, batch, buf)

    def _decode_batch(self, batch: list[tuple[int, int, int]], buf: Any) -> None:
        mv = memoryview(buf)
        at = 0
        mask = self.src.cs - 1
        for pos, n, ent in batch:
            data, c_off = self._decode(ent, pos & mask)
            mv[at : at + n] = memoryview(data)[c_off : c_off + n]
            at += n

    def _decode(self, ent: int, c_off: int) -> tuple[bytes, int]:
        # Qcow2Image._decode_compressed without its (single-threaded) cache
        src = self.src
        host, clen = self._decode_entry(ent, src.cb)
        if host >= self.fsize:
            raise CorruptImageError(f"Compressed cluster at host offset {host:#x} lies past "
                                    "the end of the file", offset=host)
        clen = min(clen, self.fsize - host, 2 * src.cs)
        data = self._decompress(src.header.compression_type, src.data_host.pread(host, clen),
                                src.cs, host)
        return data, c_off

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Concat:
    """Several devices read as one (convert's concatenated sources)."""

    def __init__(self, devs: Sequence[BlockDevice]) -> None:
        self.devs = list(devs)
        self.starts = []
        pos = 0
        for d in self.devs:
            self.starts.append(pos)
            pos += d.size

    def _pieces(self, off: int, n: int) -> Iterator[tuple[BlockDevice, int, int, int]]:
        """(device, device offset, length, offset in the request) covering [off, off+n)."""
        done = 0
        for d, s in zip(self.devs, self.starts, strict=True):
            if done >= n:
                return
            lo = off + done
            if lo >= s + d.size:
                continue
            k = min(n - done, s + d.size - lo)
            yield d, lo - s, k, done
            done += k

    def readinto(self, off: int, buf: memoryview) -> None:
        for d, o, k, at in self._pieces(off, len(buf)):
            d.readinto(o, buf[at : at + k])

    def is_zero(self, off: int, n: int) -> bool:
        """True if block status says the whole range reads as zeros (nothing is read)."""
        for d, o, k, _ in self._pieces(off, n):
            end = o + k
            while o < end:
                st, _depth = d.block_status(o, end - o)
                if not (st.zero or (not st.allocated and not st.data)):
                    return False
                o += st.length
        return True


def _snapshot_view(dev: BlockDevice, snapshot: tuple[str | None, str | None]) -> BlockDevice:
    sid, name = snapshot
    loader = getattr(dev, "snapshot_view", None)
    if dev.format == "raw" or loader is None:
        raise UnsupportedFeatureError(
            f"Failed to load snapshot: Block format '{dev.format}' used by device '' does "
            "not support temporarily loading internal snapshots")
    # a bare ``-l X`` (sid == name) is an id or a name: qemu tries the id first
    tries = [(sid, None), (None, name)] if sid is not None and sid == name else [(sid, name)]
    for s, n in tries:
        try:
            view: BlockDevice = loader(snapshot_id=s, name=n)
            return view
        except DiskImgError as e:
            if "find snapshot" not in str(e):
                raise
    raise DiskImgError("Failed to load snapshot: Can't find snapshot")


def convert(
    sources: Source | Sequence[Source],
    dst: str | os.PathLike[str] | BlockDevice,
    out_format: str = "raw",
    *,
    src_format: str | None = None,
    options: Mapping[str, Any] | None = None,
    sparse_size: int = 4096,
    target_exists: bool = False,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    progress: ProgressFn | None = None,
    snapshot: tuple[str | None, str | None] | None = None,
    compress: bool = False,
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    target_options: Mapping[str, str] | None = None,
    workers: int | None = None,
    sync: bool = False,
) -> None:
    """Copy the guest contents of ``sources`` (concatenated) into image ``dst``.

    Holes and zero runs are never read (block status) and never written to a fresh target;
    ``sparse_size`` (``-S``, 0 = fully allocate) turns zero runs in data into holes;
    ``backing_file`` gives the target a backing file and copies only the sources' top layer
    (qemu-img ``-B``); ``target_exists`` writes into an existing image (``-n``; ``dst`` may
    then be an open writable device).  ``progress`` receives percentages.  Sources may be
    paths or open devices.  ``compress`` (``-c``) compresses every cluster in ``workers``
    threads (``-m``; default: the number of CPUs, at most 8).  Like qemu-img convert (whose
    target cache mode defaults to ``unsafe``) the target is not synced to stable storage
    unless ``sync`` is true; everything is written before this returns.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    srcs = [sources] if isinstance(sources, str | os.PathLike | BlockDevice) else list(sources)
    if not srcs:
        raise UsageError("Must specify image file name")
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size > 16 << 20:
        raise UsageError("Invalid buffer size for sparse output specified. Valid sizes are "
                         "multiples of 512 up to 16777216. Select 0 to disable sparse "
                         "detection (fully allocates output).")
    if backing_file is not None and out_format == "raw":
        raise UsageError("Backing file not supported for file format 'raw'")
    if backing_file is not None and backing_fmt is None and not target_exists:
        raise UsageError("Use of backing file requires explicit backing format")
    if compress and out_format == "raw":
        raise UsageError("Compression not supported for this file format")
    if compress and str((options or {}).get("preallocation", "off")) != "off":
        raise UsageError("Compression and preallocation not supported at the same time")
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    opened: list[tuple[BlockDevice, bool]] = []
    try:
        for s in srcs:
            dev, owned = _open(s, src_format, kw)
            opened.append((dev, owned))
        devs = [d for d, _ in opened]
        if snapshot is not None:
            if len(devs) != 1:
                raise UsageError("No support for concatenating multiple snapshot")
            devs = [_snapshot_view(devs[0], snapshot)]
        total = sum(d.size for d in devs)
        if isinstance(dst, BlockDevice):
            if not target_exists:
                raise UsageError("an open target device needs target_exists=True")
            tgt_cm: Any = contextlib.nullcontext(dst)
        else:
            if not target_exists:
                api.create(dst, out_format, total, backing_file=backing_file,
                           backing_fmt=backing_fmt, options=options, secrets=secrets)
            topts = dict(target_options or {})
            key = (options or {}).get("encrypt.key-secret")
            if key is not None and not target_exists:
                topts.setdefault("encrypt.key-secret", str(key))  # the new image's key
            tgt_cm = api.open(dst, "r+", out_format, secrets=dict(secrets or {}),
                              options=topts)
        with tgt_cm as tgt:
            if not sync and not isinstance(dst, BlockDevice):
                for hf in _host_files(tgt):
                    hf.sync = False
            if tgt.size < total:
                raise UsageError("output file is smaller than input file")
            cluster = getattr(tgt, "cluster_size", None) or 0
            align = max(_pow2floor(max(sparse_size, SECTOR) // SECTOR), cluster // SECTOR
                        if compress else 1)
            target_backing = backing_file is not None
            # qemu-img's rule: only a new target without backing file may leave zero runs
            # unwritten, and only if its format says it reads as zeros (not, e.g., an
            # encrypted qcow2 with preallocated clusters)
            zero_init = (not target_exists and not target_backing and sparse_size > 0
                         and tgt.has_zero_init())
            backing_end = tgt.backing.size if (target_backing and not target_exists
                                               and tgt.backing is not None) else None
            cp = _Copier(tgt, zero_init=zero_init, target_backing=target_backing,
                         backing_end=backing_end, min_sparse=sparse_size, alignment=align,
                         compress=compress, total=total, progress=progress)
            if progress is not None:
                progress(0.0)
            if compress:
                cp.copy_compressed(devs, workers)
            else:
                # the reader thread must not share a device with the writer
                pipelined = not any(d is tgt for d in devs)
                base = 0
                for d in devs:
                    cp.copy(d, base, pipelined)
                    base += d.size
            tgt.flush()
    finally:
        for dev, owned in opened:
            if owned:
                dev.close()


def _host_files(dev: BlockDevice) -> list[HostFile]:
    """The writable host files behind ``dev`` (qcow2 image and data file, raw file, vmdk
    descriptor and extents)."""
    out: list[HostFile] = []
    cands = [getattr(dev, "host", None), getattr(dev, "data_host", None)]
    cands += [getattr(e, "host", None) for e in getattr(dev, "extents", None) or ()]
    for h in cands:
        if isinstance(h, HostFile) and h.writable and all(h is not o for o in out):
            out.append(h)
    return out


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 1


# --- compare ------------------------------------------------------------------------


def _first_diff_sector(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Byte offset (sector aligned) of the first 512-byte sector where a and b differ."""
    lo, hi = 0, len(a)
    # binary search on prefix equality: C-speed slices
    while hi - lo > SECTOR:
        mid = lo + max(SECTOR, (hi - lo) // 2 // SECTOR * SECTOR)
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def compare(
    a: Source,
    b: Source,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    progress: ProgressFn | None = None,
    *,
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> tuple[bool, int | None, str]:
    """Compare guest contents like ``qemu-img compare``.

    Returns ``(identical, mismatch_offset, message)``; ``message`` is what qemu-img prints
    (possibly two lines).  Without ``strict`` a longer image whose tail reads as zeros is
    identical (with a size warning); with ``strict`` any size or allocation difference is a
    mismatch.
    """
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    d1, own1 = _open(a, fmt_a, kw)
    try:
        d2, own2 = _open(b, fmt_b, kw)
        try:
            return _compare(d1, d2, strict, progress)
        finally:
            if own2:
                d2.close()
    finally:
        if own1:
            d1.close()


def _compare(d1: BlockDevice, d2: BlockDevice, strict: bool,
             progress: ProgressFn | None) -> tuple[bool, int | None, str]:
    s1, s2 = d1.size, d2.size
    if strict and s1 != s2:
        return False, None, "Strict mode: Image size mismatch!"
    common, total = min(s1, s2), max(s1, s2)
    if progress is not None:
        progress(0.0)
    pos = 0
    while pos < common:
        st1, _ = d1.block_status(pos, common - pos)
        st2, _ = d2.block_status(pos, common - pos)
        n = min(st1.length, st2.length, CHUNK)
        z1 = st1.zero or (not st1.allocated and not st1.data)
        z2 = st2.zero or (not st2.allocated and not st2.data)
        if strict and (st1.allocated, z1) != (st2.allocated, z2):
            return False, pos, f"Strict mode: Offset {pos} block status mismatch!"
        if not (z1 and z2):
            b1 = _ZEROS[:n] if z1 else d1.read(pos, n)
            b2 = _ZEROS[:n] if z2 else d2.read(pos, n)
            if b1 != b2:
                off = pos + _first_diff_sector(b1, b2)
                return False, off, f"Content mismatch at offset {off}!"
        pos += n
        if progress is not None:
            progress(pos * 100.0 / total if total else 100.0)
    msg = ""
    if s1 != s2:
        msg = "Warning: Image size mismatch!\n"
        longer = d1 if s1 > s2 else d2
        while pos < total:
            st, _ = longer.block_status(pos, total - pos)
            n = min(st.length, CHUNK)
            if not (st.zero or (not st.allocated and not st.data)):
                data = longer.read(pos, n)
                nz = _nonzero_at(data, 0, n)
                if nz < n:
                    off = pos + (nz // SECTOR) * SECTOR
                    return False, off, f"{msg}Content mismatch at offset {off}!"
            pos += n
            if progress is not None:
                progress(pos * 100.0 / total)
    return True, None, msg + "Images are identical."


# --- dd -----------------------------------------------------------------------------


def dd(
    src: Source,
    dst: str | os.PathLike[str],
    out_format: str = "raw",
    *,
    src_format: str | None = None,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """``qemu-img dd``: copy ``count`` blocks of ``bs`` bytes after skipping ``skip`` blocks
    into a new image ``dst``.  The output size is ``min(count*bs, size) - skip*bs`` (qemu's
    rule); a skip past that end creates an empty output and calls ``warn``."""
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    dev, owned = _open(src, src_format, kw)
    try:
        size = dev.size
        if count is not None and count * bs < size:
            size = count * bs
        in_pos = skip * bs
        if in_pos > size:
            if warn is not None:
                warn(f"{dev.filename}: cannot skip to specified offset")
            in_pos = size
        try:
            api.create(dst, out_format, size - in_pos)
        except ImageLockedError as e:  # qemu-img dd's words; the file is left as it was
            raise ImageLockedError(f"{os.fspath(dst)}: error while creating output image: "
                                   f"{e}") from e
        with api.open(dst, "r+", out_format) as out:
            step = max(bs, CHUNK // bs * bs)
            buf = bytearray(step)
            out_pos = 0
            while in_pos < size:
                n = min(step, size - in_pos)
                mv = memoryview(buf)[:n]
                dev.readinto(in_pos, mv)
                if not is_zero(mv):
                    out.write(out_pos, mv)
                in_pos += n
                out_pos += n
            out.flush()
    finally:
        if owned:
            dev.close()


# --- commit -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layer:
    path: str
    format: str
    backing_name: str | None  # as written in this image's header


def _chain_layers(path: str | os.PathLike[str], fmt: str | None,
                  kw: Mapping[str, Any]) -> list[_Layer]:
    """Path, format and backing-file name of every image in ``path``'s chain, top first."""
    with api.open(path, "r", fmt, force_share=True, **kw) as dev:  # kw: secrets, options
        out = []
        for d in dev.chain():
            name_fn = getattr(d, "backing_file_name", None)
            name = name_fn()[0] if name_fn is not None else None
            out.append(_Layer(d.filename, d.format, name))
        return out


def find_backing_image(layers: Sequence[_Layer], name: str) -> int | None:
    """Index in ``layers`` of the image ``name`` designates, as qemu's
    ``bdrv_find_backing_image``: ``name`` is taken relative to each image's directory and
    compared (canonical paths) with that image's backing file."""
    for k in range(len(layers) - 1):
        parent = layers[k]
        cand = name if os.path.isabs(name) else os.path.join(
            os.path.dirname(parent.path), name)
        try:
            if os.path.realpath(cand, strict=True) == os.path.realpath(
                    layers[k + 1].path, strict=True):
                return k + 1
        except OSError:
            continue
    return None


def _progress_steps(progress: ProgressFn | None, total: int) -> Callable[[int], None]:
    def step(done: int) -> None:
        if progress is not None:
            progress(done * 100.0 / total if total else 100.0)
    return step


def commit(
    path: str | os.PathLike[str],
    base: str | None = None,
    drop: bool = False,
    progress: ProgressFn | None = None,
    *,
    fmt: str | None = None,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, str] | None = None,
) -> None:
    """``qemu-img commit``: write the data of ``path`` (and of every image between it and
    ``base``) into ``base`` (default: its backing file), then empty ``path`` unless ``drop``.

    As in qemu-img, giving ``base`` implies ``drop`` (intermediate images are never
    emptied), the base grows to the top's size if it is smaller, and no header changes:
    the top keeps naming its backing file.  Zero ranges are written as zeros (unmapped
    where the base allows).  ``options`` are the top's image options; each layer below
    gets them with one more ``backing.`` prefix removed (``encrypt.key-secret`` for an
    encrypted top, ``backing.encrypt.key-secret`` for an encrypted base), so encrypted
    layers are read and written with their own keys."""
    from diskimg.api import backing_options
    from diskimg.hostio import open_host_file
    from diskimg.qcow2.amend import make_empty, read_header

    kw: dict[str, Any] = {"untrusted": untrusted, "secrets": dict(secrets or {}),
                          "options": dict(options or {})}
    path = os.fspath(path)
    if base is not None:
        drop = True
    top_lock = open_host_file(path, not drop)  # qemu's lock on the top for the job
    data_host: HostFile | None = None
    try:
        layers = _chain_layers(path, fmt, kw)
        if len(layers) < 2:
            raise UsageError("Image does not have a backing file")
        if base is None:
            base_idx = 1
        else:
            found = find_backing_image(layers, base)
            if found is None:
                raise UsageError(f"Did not find '{base}' in the backing chain of '{path}'")
            base_idx = found
        if not drop and layers[0].format == "qcow2":
            # the top's external data file: its clusters are deallocated when the top is
            # emptied, as qemu's commit does; locked now, before the base changes
            data_host = _open_data_file(top_lock, path, options, untrusted)
        b = layers[base_idx]
        base_opts = dict(options or {})
        for _ in range(base_idx):
            base_opts = backing_options(base_opts)
        with api.open(b.path, "r+", b.format, **{**kw, "options": base_opts}) as base_dev, \
                api.open(path, "r", fmt, force_share=True, **kw) as top:
            _commit_copy(top, base_dev, base_idx, progress)
            base_dev.flush()
        if not drop and layers[0].format == "qcow2":
            h = read_header(top_lock)
            make_empty(top_lock, h, data_host)
    finally:
        if data_host is not None:
            data_host.close()
        top_lock.close()


def _open_data_file(top: HostFile, path: str, options: Mapping[str, str] | None,
                    untrusted: bool) -> HostFile | None:
    """The external data file of the qcow2 image ``top`` (at ``path``), opened writable
    and locked, or None when it has none."""
    from diskimg.hostio import open_host_file
    from diskimg.policy import OpenPolicy
    from diskimg.qcow2.amend import read_header
    from diskimg.qcow2.layout import QCOW2_INCOMPAT_DATA_FILE

    h = read_header(top)
    if not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
        return None
    name = (options or {}).get("data-file") or h.data_file
    if not name:
        return None
    pol = OpenPolicy(untrusted=untrusted).for_top(Path(path))
    return open_host_file(pol.resolve(name, Path(path), "data file"), True)


def _commit_copy(top: BlockDevice, base: BlockDevice, base_idx: int,
                 progress: ProgressFn | None) -> None:
    size = top.size
    if base.size < size:
        fn = base.resize
        fn(size)
    chain = top.chain()
    step = _progress_steps(progress, size)
    step(0)
    buf = bytearray(CHUNK)
    pos = 0
    while pos < size:
        st, depth = top.block_status(pos, min(CHUNK, size - pos))
        n = st.length
        if st.allocated:
            copy = depth < base_idx
            zero = st.zero or not st.data
        else:
            # past the end of a shorter image above the base: zeros decided there
            nxt = depth + 1
            copy = (nxt < base_idx and nxt < len(chain) and pos >= chain[nxt].size)
            zero = True
        if copy:
            if zero:
                base.write_zeroes(pos, n, may_unmap=True)
                base.flush()  # free unmapped clusters now, so they are reused in order
            else:
                mv = memoryview(buf)[:n]
                top.readinto(pos, mv)
                base.write(pos, mv)
        pos += n
        step(pos)


# --- rebase -------------------------------------------------------------------------


def rebase(
    path: str | os.PathLike[str],
    backing: str | None,
    backing_fmt: str | None = None,
    *,
    unsafe: bool = False,
    fmt: str | None = None,
    progress: ProgressFn | None = None,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    force_share: bool = False,
    options: Mapping[str, str] | None = None,
) -> None:
    """``qemu-img rebase``: make ``path`` use ``backing`` (``None`` or ``""``: no backing
    file) without changing what the guest sees.

    Safe mode reads the old and new backing chains and copies into ``path`` every range
    where they differ and ``path`` does not decide the contents itself; ``unsafe`` only
    rewrites the backing file name and format in the header.  ``backing`` is stored as
    given and resolved, like qemu, relative to ``path``'s directory.  ``options`` are
    ``path``'s image options (``encrypt.key-secret``; ``backing.encrypt.key-secret`` for
    an encrypted old backing file).  As in qemu-img the new backing file is opened with
    no options, so it cannot be encrypted in safe mode."""
    from diskimg.errors import MissingSecretError
    from diskimg.policy import OpenPolicy
    from diskimg.qcow2.amend import set_backing

    kw: dict[str, Any] = {"untrusted": untrusted, "secrets": dict(secrets or {})}
    path = os.fspath(path)
    new_name = backing or None
    with api.open(path, "r+", fmt, backing=not unsafe, force_share=force_share,
                  options=dict(options or {}), **kw) as dev:
        if dev.format != "qcow2":
            raise UnsupportedFeatureError(
                f"Could not change the backing file to '{backing or ''}': Operation not "
                "supported")
        if not unsafe:
            new_dev: BlockDevice | None = None
            try:
                if new_name is not None:
                    pol = OpenPolicy(untrusted=untrusted).for_top(Path(path))
                    bpath = pol.resolve(new_name, Path(path))
                    try:
                        new_dev = api.open(bpath, "r", backing_fmt,
                                           force_share=force_share, **kw)
                        if new_dev.info().encrypted:
                            raise MissingSecretError(
                                "Parameter 'encrypt.key-secret' is required for cipher")
                    except DiskImgError as e:
                        cls = ImageLockedError if isinstance(e, ImageLockedError) \
                            else DiskImgError  # a held file stays an ImageLockedError
                        raise cls(f"Could not open new backing file '{bpath}': {e}") from e
                _rebase_copy(dev, new_dev, progress)
            finally:
                if new_dev is not None:
                    new_dev.close()
        dev.flush()
        host = dev.host  # type: ignore[attr-defined]  # qcow2 only (checked above)
        set_backing(host, new_name, backing_fmt if new_name else None)
        # keep the open device's idea of the header in step, so closing it is harmless
        from diskimg.qcow2.amend import read_header

        dev_header = getattr(dev, "header", None)
        if dev_header is not None:
            new_h = read_header(host)
            dev_header.backing_file = new_h.backing_file
            dev_header.extensions = new_h.extensions


def _rebase_copy(dev: BlockDevice, new: BlockDevice | None,
                 progress: ProgressFn | None) -> None:
    """Copy into ``dev`` every range it does not allocate where its current backing
    chain and ``new`` read differently (qemu's safe rebase)."""
    old = dev.backing
    size = dev.size
    old_size = old.size if old is not None else 0
    new_size = new.size if new is not None else 0
    step = _progress_steps(progress, size)
    step(0)
    pos = 0
    while pos < size:
        st = dev._status(pos, min(CHUNK, size - pos))
        n = st.length
        if not st.allocated:
            a = _read_or_zeros(old, old_size, pos, n)
            b = _read_or_zeros(new, new_size, pos, n)
            if a != b:
                # copy the old contents of the differing sectors into the overlay
                for s, e in _differing_sectors(a, b):
                    dev.write(pos + s, a[s:e])
        pos += n
        step(pos)


def _differing_sectors(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Runs [start, end) of 512-byte sectors where ``a`` and ``b`` differ."""
    runs: list[tuple[int, int]] = []
    n = len(a)
    blk = 65536
    for base in range(0, n, blk):
        top = min(n, base + blk)
        if a[base:top] == b[base:top]:
            continue
        for s in range(base, top, SECTOR):
            e = min(top, s + SECTOR)
            if a[s:e] != b[s:e]:
                if runs and runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], e)
                else:
                    runs.append((s, e))
    return runs


def _read_or_zeros(d: BlockDevice | None, dsize: int, pos: int, n: int) -> bytes:
    if d is None or pos >= dsize:
        return bytes(n)
    k = min(n, dsize - pos)
    data = d.read(pos, k)
    return data if k == n else data + bytes(n - k)
