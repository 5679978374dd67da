"""qemu-img convert's copy loop (:class:`_Copier`): writes each run of the merged plan
to the target, zero runs left unwritten on a zero-initialised target, data runs split by
``-S`` into sparse holes.  Invariant: the target ends with exactly the guest bytes of the
sources."""

from __future__ import annotations

from diskimg.device import BlockDevice
from diskimg.errors import FormatError
from diskimg.hostio import aligned_buffer

from diskimg.hostio import all_zero
from diskimg.ops import _ZEROS, CHUNK, SECTOR, ProgressFn, _next_zero_sector, sparse_runs
from diskimg.plan import RunKind

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    from collections.abc import Callable, Iterator, Sequence
    from diskimg.hostio.workers import Job
    from diskimg.ops.copy_options import Salvage
    from diskimg.ops.readahead import _Decoded
    from typing import Any, TypeAlias

    #: an item of :meth:`_Copier._plan`: (kind, position, length, merged run lengths)
    _PlanItem: TypeAlias = tuple[RunKind, int, int, list[int] | None]

_DATA, _ZERO, _BACKING = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED

#: data pieces shorter than this are gathered into one write (:meth:`_Copier.write`)
_COMBINE_BELOW = 256 << 10

#: the errors of a source that ``--salvage`` reads past (a corrupt or unreadable range);
#: a usage error (a bug) or an interrupt still ends the copy
READ_ERRORS = (FormatError, OSError)


#: sources up to this size are copied without the read-ahead thread (:meth:`_Copier.copy`):
#: the thread's start and handoffs cost more than the overlap saves on a small copy, while
#: at 256 MiB the overlap wins in wall time on a quiet machine (bench.py --size 256M
#: --baseline, 7 rounds: raw->qcow2 0.10 s threaded vs 0.11 inline, qcow2->qcow2 0.11 vs
#: 0.13, vmdk->raw 0.084 vs 0.099; the inline copy used less CPU)
_INLINE_MAX = 16 << 20
#: ... except that one larger than this moves to the thread and its decoding pool at its
#: first compressed run (up to this size it never starts a thread)
_DECODE_SWITCH_MIN = 4 * CHUNK


class _Copier:
    """qemu-img convert's copy loop.  ``zero_init``: the target reads as zeros wherever
    nothing is written (a new target without backing file whose format says so, see
    :meth:`BlockDevice.has_zero_init`), so zero runs are left unwritten; otherwise they are
    written as zeroes.  ``target_backing`` (``-B``): only the sources' own layers are
    copied, ranges they leave to their backing files are left to the target's;
    ``backing_end``: the size of a new target's backing file, past which the target reads
    zeros of its own (zero runs there are left to it, as qemu does), None if unknown."""

    # a slotted class with its own __init__ (no dataclasses: the copy path does not
    # import it, see issue 20)
    __slots__ = ("tgt", "zero_init", "target_backing", "backing_end", "min_sparse",
                 "alignment", "compress", "total", "done", "progress", "pend", "pend_off",
                 "pend_len", "limit", "salvage")

    def __init__(self, tgt: BlockDevice, zero_init: bool, target_backing: bool,
                 backing_end: int | None, min_sparse: int, alignment: int, compress: bool,
                 total: int, done: int = 0, progress: ProgressFn | None = None,
                 limit: Callable[[int], None] | None = None,
                 salvage: Salvage | None = None) -> None:
        self.tgt = tgt
        self.zero_init, self.target_backing = zero_init, target_backing
        self.backing_end = backing_end
        self.min_sparse, self.alignment = min_sparse, alignment
        self.compress, self.total, self.done = compress, total, done
        self.progress = progress
        # write combining: small data pieces that follow each other in guest order are
        # gathered here and written with one call (the zero detection is unchanged: it
        # still runs on each block-status run, as qemu-img's does)
        self.pend: bytearray | None = None
        self.pend_off = 0
        self.pend_len = 0
        #: ``-r``: called with the length of each data run before it is read
        self.limit = limit
        #: ``--salvage``: unreadable source ranges become zeros (reads are not pipelined)
        self.salvage = salvage

    def zero(self, off: int, n: int) -> None:
        if self.min_sparse == 0:
            self.flush_pending()
            for p in range(off, off + n, CHUNK):
                self.tgt.write(p, _ZEROS[: min(CHUNK, off + n - p)])
        elif not self.zero_init:
            self.flush_pending()
            self.tgt.write_zeroes(off, n, may_unmap=True)

    def data(self, off: int, buf: Any, n: int,
             runs: list[tuple[int, int, bool]] | None = None) -> None:
        """Write ``buf[:n]`` (bytes, bytearray or mmap) at ``off``, sparsely: ``runs`` are
        its sparse runs when already found (:meth:`_scan`, on the read-ahead thread); a
        buffer found all zero there is None."""
        if self.compress:
            self._write_compressed(off, buf, n)
            return
        if self.min_sparse == 0:
            self.write(off, memoryview(buf)[:n])
            return
        if runs is None:
            runs = sparse_runs(buf, n, self.min_sparse, off, self.alignment)
        for s, ln, is_data in runs:
            if is_data:
                self.write(off + s, memoryview(buf)[s : s + ln])
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
        ``write_compressed_clusters`` call."""
        tgt = self.tgt
        # declared by the format (BlockDevice.supports_compressed_write): qcow2 compresses,
        # vmdk stores each cluster (its first extent's grain) as it is, as qemu's vmdk
        # does; raw, and a vmdk without grains, raise UnsupportedFeatureError here
        from diskimg.ops.readahead import _ClusterKinds, _Concat, _kind_runs

        cs = tgt.compressed_cluster_size()
        compress = tgt.compress_cluster
        step = max(cs, CHUNK // cs * cs)
        reader = _Concat(devs)
        kinds = _ClusterKinds(self._concat_runs(devs), cs, self.total,
                              zero_as_data=self.min_sparse == 0)
        skip_zero = self.min_sparse != 0  # -S 0: zero clusters are compressed as well
        # chunks in flight (each holds a CHUNK buffer): bounded, so memory is too
        window = max(2, min(2 * workers, 6))
        Result = list[bytes | bool | RunKind | None]
        from collections import deque  # (here: a plain copy does not load collections)

        pending: deque[tuple[int, int, Any, Job[Result] | list[RunKind]]] = deque()
        spare: list[Any] = []

        def work(buf: Any, n: int, ks: list[RunKind]) -> Result:
            """Per cluster of ``buf[:n]``: its kind when not 'data' (nothing was read),
            False (reads as zeros), None (does not shrink: stored as a normal cluster, as
            qemu does) or the compressed bytes."""
            mv = memoryview(buf)[:n]  # the buffer may be longer (the last chunk)
            out: Result = []
            for k, p in zip(ks, range(0, n, cs), strict=True):
                piece = mv[p : p + cs]
                if k is not _DATA:
                    out.append(k)
                elif skip_zero and all_zero(piece):
                    out.append(False)
                else:
                    out.append(compress(piece))
            return out

        def put(off: int, run: list[tuple[bytes | bytearray | memoryview, bytes | None]]) -> None:
            tgt.write_compressed_clusters(off, run)

        def skip(off: int, n: int, kind: RunKind | bool) -> None:
            """A cluster (or run of clusters) not written as data: zeros or backing."""
            if kind is not _BACKING and not self.zero_init:
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
                run: list[tuple[bytes | bytearray | memoryview, bytes | None]] = []
                run_off = start
                for k, r in enumerate(fut.result()):
                    p = k * cs
                    if r is False or isinstance(r, RunKind):
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

        from diskimg.hostio.workers import worker_pool  # (a plain copy starts no pool)

        with worker_pool(workers, "compress") as pool:
            for start in range(0, self.total, step):
                n = min(step, self.total - start)
                ks = kinds.of_chunk(start, n)
                if _DATA not in ks:
                    pending.append((start, n, None, ks))
                else:
                    buf = spare.pop() if spare else aligned_buffer(step, fill=True)
                    self._read(reader.readinto, start, memoryview(buf)[:n])
                    pending.append((start, n, buf, pool.submit(work, buf, n, ks)))
                drain(window)
            drain(0)
        tgt.align_compressed_end()

    def _read(self, read: Callable[[int, memoryview], Any], pos: int,
              buf: memoryview) -> None:
        """Read a data run of the sources in the caller's thread: after its turn under
        ``-r``, and with ``--salvage`` unreadable sectors become zeros."""
        if self.limit is not None:
            self.limit(len(buf))
        if self.salvage is not None:
            self.salvage.readinto(read, pos, buf)
        else:
            read(pos, buf)

    def _concat_runs(self, devs: Sequence[BlockDevice]
                     ) -> Iterator[tuple[RunKind, int, int]]:
        """The status runs of the concatenated sources, in target offsets, consecutive
        runs of a kind merged within one source and on one side of a new target's
        backing end (qemu's runs cross neither)."""
        base = 0
        for d in devs:
            kind_m, pos_m, n_m = _DATA, 0, 0
            for kind, pos, n in self._status_runs(d, base):
                if n_m and kind is kind_m and base + pos != self.backing_end:
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
              base: int) -> Iterator[tuple[RunKind, int, int, list[int] | None]]:
        """(kind, position, length, runs) of ``src``: DATA runs at most CHUNK long
        (``runs`` None), and ZERO or UNALLOCATED (backing) runs, consecutive ones of a
        kind merged into one item (``runs`` lists the lengths merged, progress is ticked
        per run)."""
        kind_m, pos_m = _DATA, 0
        runs_m: list[int] = []
        for kind, pos, n in self._status_runs(src, base):
            if kind is _DATA or (kind is _ZERO and self.min_sparse == 0):
                if runs_m:
                    yield kind_m, pos_m, sum(runs_m), runs_m
                    runs_m = []
                yield kind, pos, n, None
            elif runs_m and kind is kind_m:
                runs_m.append(n)
            else:
                if runs_m:
                    yield kind_m, pos_m, sum(runs_m), runs_m
                kind_m, pos_m, runs_m = kind, pos, [n]
        if runs_m:
            yield kind_m, pos_m, sum(runs_m), runs_m

    def _status_runs(self, src: BlockDevice,
                     base: int) -> Iterator[tuple[RunKind, int, int]]:
        """(kind, position, length) runs of ``src`` (copied to target offset ``base``), at
        most CHUNK long for data: ZERO, DATA or UNALLOCATED (left to the target's backing
        file), from the source's public block status."""
        pos, size = 0, src.size
        while pos < size:
            # ask for the rest of the disk (qemu-img asks for 2 GiB at most: that cuts the
            # runs differently, not what they are); zero and backing runs are taken whole,
            # data runs are cut at CHUNK
            n = size - pos
            try:
                kind, n = self._kind_at(src, base, pos, n)
            except READ_ERRORS:
                if self.salvage is None:
                    raise
                self.salvage.status_failed(pos)
                kind, n = _DATA, min(n, SECTOR)  # read it (the read reports it too)
            if kind is _DATA or (kind is _ZERO and self.min_sparse == 0):
                # cut at CHUNK here: asking again at each CHUNK of a longer run would
                # only find the rest of the same run
                end = pos + n
                while end - pos > CHUNK:
                    yield kind, pos, CHUNK
                    pos += CHUNK
                n = end - pos
            yield kind, pos, n
            pos += n

    def survey(self, devs: Sequence[BlockDevice]) -> None:
        """qemu-img convert's first pass over the sources' block status (it counts the
        sectors to copy): with ``--salvage`` each status that cannot be read is reported
        there too, before the copy reports it again."""
        base = 0
        for d in devs:
            for _ in self._status_runs(d, base):
                pass
            base += d.size

    def _kind_at(self, src: BlockDevice, base: int, pos: int,
                 n: int) -> tuple[RunKind, int]:
        """The kind and length of the status run of ``src`` at ``pos`` (at most ``n``)."""
        if self.target_backing:
            from diskimg.ops.readahead import _top_status

            # top layer only: the rest is the target's backing
            kind, n = _top_status(src, pos, n)
            end = self.backing_end
            if end is not None:
                # qemu's status runs break at the end of a new target's backing file
                # (which decides the kind of a compressed cluster across it); past it
                # the target reads zeros of its own: zero runs there are left unwritten
                if base + pos < end < base + pos + n:
                    n = end - base - pos
                elif base + pos >= end and kind is _ZERO:
                    kind = _BACKING
            return kind, n
        st, _ = src.block_status(pos, n, coarse=True)
        n = min(n, st.length)
        return (_ZERO if st.zero or (not st.allocated and not st.data) else _DATA), n

    def copy(self, src: BlockDevice, base: int, pipelined: bool = True) -> None:
        """Copy ``src`` to the target at ``base``.  With ``pipelined`` a source larger
        than ``_INLINE_MAX`` is planned and read on a second thread, up to ``_BUFFERS - 1``
        chunks ahead of the writes (both sides spend their time in system calls that
        release the GIL); a smaller one is copied on this thread, with the same reads and
        writes: for a copy that small, starting the thread and the hand-offs cost more
        than the overlap saves (at 256 MiB the overlap wins in wall time: see
        ``_INLINE_MAX``).  A source of this size whose compressed
        clusters the pool can decode (:class:`_ClusterDecoder`) moves to the thread and
        its pool at its first compressed run when it is larger than
        ``_DECODE_SWITCH_MIN``."""
        plan = self._plan(src, base)
        if pipelined and self.salvage is None and src.size > _INLINE_MAX:
            self._pipelined(src, base, plan)
            return
        dec = None
        if pipelined and self.salvage is None and src.size > _DECODE_SWITCH_MIN:
            # (the read-ahead module is imported only by a copy that may use it: a small
            # image's is not, start-up, issue 20)
            from diskimg.ops.readahead import _ClusterDecoder

            dec = _ClusterDecoder.for_device(src)
        buf = aligned_buffer(min(CHUNK, src.size), fill=True)  # (every run fits)
        for item in plan:
            kind, pos, n, runs = item
            if kind is _DATA:
                if dec is not None and dec.entry(pos, n) is not None:
                    # compressed clusters: decoded on the pool from here on
                    self.flush_pending()
                    self._pipelined(src, base, _then(item, plan))
                    return
                self._read(src.readinto, pos, memoryview(buf)[:n])
            self._put(kind, base + pos, buf if kind is _DATA else runs, n)
        self.flush_pending()

    def _pipelined(self, src: BlockDevice, base: int,
                   plan: Iterator[tuple[RunKind, int, int, list[int] | None]]) -> None:
        """Copy the rest of ``plan`` of ``src`` with the read-ahead thread."""
        from diskimg.ops.readahead import _Decoded, _ReadAhead

        with _ReadAhead(src, plan, self._scan(base), self._scan_decoded(base)) as ahead:
            for kind, pos, n, item, runs in ahead:
                if isinstance(item, _Decoded):  # compressed clusters decoded by the pool
                    writes = item.future.result()
                    if self.limit is not None:
                        self.limit(n)
                    self._put_decoded(base + pos, item, n, writes)
                    ahead.release(item.buf)
                    continue
                if kind is _DATA and self.limit is not None:
                    self.limit(n)
                self._put(kind, base + pos, item, n, runs)
                if kind is _DATA:
                    ahead.release(item)
            self.flush_pending()

    def _scan(self, base: int) -> Callable[[Any, int, int], list[tuple[int, int, bool]]] | None:
        """The zero scan of a data buffer of the source copied to ``base``, for the
        read-ahead thread to run (the same :func:`sparse_runs` :meth:`data` would run,
        with the same target offset): None when :meth:`data` does not scan."""
        if self.compress or self.min_sparse == 0:
            return None
        min_sparse, alignment = self.min_sparse, self.alignment

        def scan(buf: Any, n: int, pos: int) -> list[tuple[int, int, bool]]:
            return sparse_runs(buf, n, min_sparse, base + pos, alignment)

        return scan

    def _scan_decoded(self, base: int) -> Callable[[Any, int, list[tuple[int, int]]],
                                                   list[tuple[int, Any, int, Any]]] | None:
        """The zero scan of decoded compressed clusters of the source copied to ``base``,
        for the decoding worker to run right after it decoded them (None when
        :meth:`data` does not scan): the writes of :meth:`_put_decoded`, ``(offset in
        the buffer, data, length, sparse runs)``.  Sparse detection works per
        block-status run (one cluster each), as qemu-img's does; when the buffer holds no
        zero sector at all that is the same as one run for all."""
        if self.compress or self.min_sparse == 0:
            return None
        min_sparse, alignment = self.min_sparse, self.alignment

        def scan(buf: Any, n: int, pieces: list[tuple[int, int]]
                 ) -> list[tuple[int, Any, int, Any]]:
            if _next_zero_sector(buf, 0, n) >= n:
                return [(0, buf, n, sparse_runs(buf, n, min_sparse, base + pieces[0][0],
                                                alignment))]
            out = []
            at = 0
            for pos, k in pieces:
                piece = buf[at : at + k]
                out.append((at, piece, k, sparse_runs(piece, k, min_sparse, base + pos,
                                                      alignment)))
                at += k
            return out

        return scan

    def _put_decoded(self, off: int, item: _Decoded, n: int,
                     writes: list[tuple[int, Any, int, Any]] | None = None) -> None:
        """Write decoded compressed clusters gathered in ``item.buf[:n]``: the ``writes``
        :meth:`_scan_decoded` found on the decoding worker; None (no sparse detection,
        ``-S 0``): the whole buffer."""
        if writes is None:
            self._put(_DATA, off, item.buf, n)
            return
        for at, data, k, runs in writes:
            self._put(_DATA, off + at, data, k, runs)

    def _put(self, kind: RunKind, off: int, item: Any, n: int,
             runs: list[tuple[int, int, bool]] | None = None) -> None:
        """Write one plan item: ``item`` is the buffer of a data run (``runs`` its sparse
        runs, when scanned already), or the list of the merged status runs of a zero or
        backing run (None: one run)."""
        if kind is _DATA:
            self.data(off, item, n, runs)
            self.tick(n)
            return
        for k in item or (n,):
            if kind is _ZERO:
                # one call per block-status run, as qemu-img: a target that cannot zero
                # part of a cluster writes zeros there, whatever the next run holds
                self.zero(off, k)
                off += k
            self.tick(k)


def _then(first: _PlanItem, rest: Iterator[_PlanItem]) -> Iterator[_PlanItem]:
    """``first``, then the items of ``rest`` (``itertools.chain``, which a copy does not
    import: start-up, issue 20)."""
    yield first
    yield from rest
