"""The read side of a copy: block-status runs of the sources (:func:`_top_status`,
:class:`_ClusterKinds`), a background reader into a ring of CHUNK buffers
(:class:`_ReadAhead`) and compressed-cluster decoding on the shared pool.  Invariant: runs
are yielded in plan order and a buffer is reused only after its consumer released it.

Kinds of a copy plan are :class:`~diskimg.plan.RunKind`: DATA (read from the sources),
ZERO, and UNALLOCATED (left to the target's backing file, ``-B``)."""

from __future__ import annotations

import os

from diskimg.device import BlockDevice
from diskimg.hostio import aligned_buffer
from diskimg.plan import Run, RunKind

from diskimg.ops import CHUNK

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    from collections.abc import Callable, Iterator, Sequence
    from diskimg.hostio.workers import Job, WorkerPool
    from typing import Any, TypeAlias


_DATA, _ZERO, _BACKING = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED


def _top_status(src: BlockDevice, pos: int, n: int) -> tuple[RunKind, int]:
    """The kind and length of the run at ``pos`` of ``src``'s own layer, as qemu-img
    convert -B sees it (block status above the source's backing file): ZERO, DATA, or
    UNALLOCATED where the source shows its backing file.  An unallocated range reads as
    zeros, not as backing, when the source has no backing file or the range lies past
    the end of a shorter one."""
    st, _ = src.block_status(pos, n, coarse=True, top_only=True)
    n = min(n, st.length)
    if st.zero:
        return _ZERO, n
    if st.allocated and st.data:
        return _DATA, n
    if st.allocated:
        return _BACKING, n
    b = src.backing
    if b is None or pos >= b.size:
        return _ZERO, n
    return _BACKING, min(n, b.size - pos)


class _ClusterKinds:
    """The kind of each target cluster for a compressed copy, from the merged status
    runs: the kind of the run that covers it whole, else DATA (read from the sources);
    a partial last cluster is always DATA.  ``zero_as_data`` (``-S 0``): zero runs are
    read too."""

    def __init__(self, runs: Iterator[tuple[RunKind, int, int]], cs: int, total: int,
                 zero_as_data: bool) -> None:
        self.runs, self.cs, self.total = runs, cs, total
        self.zero_as_data = zero_as_data
        self.cur: tuple[RunKind, int, int] = (_DATA, 0, 0)

    def _run_at(self, p: int) -> tuple[RunKind, int, int]:
        while self.cur[1] + self.cur[2] <= p:
            self.cur = next(self.runs, (_DATA, p, self.total - p))
        return self.cur

    def of_chunk(self, start: int, n: int) -> list[RunKind]:
        """Kinds of the clusters of [start, start + n) (``start`` cluster-aligned)."""
        kind, rs, rn = self._run_at(start)
        if rs + rn >= start + n and n % self.cs == 0:
            # fast path: one run covers the chunk (of whole clusters)
            k = _DATA if kind is _ZERO and self.zero_as_data else kind
            return [k] * (-(-n // self.cs))
        out = []
        for p in range(start, start + n, self.cs):
            e = p + self.cs
            kind, rs, rn = self._run_at(p)
            if e > self.total or kind is _DATA or (kind is _ZERO and self.zero_as_data):
                out.append(_DATA)
                continue
            # a cluster that runs of this kind cover whole (merged runs are maximal)
            out.append(kind if rs + rn >= e else _DATA)
        return out


def _kind_runs(kinds: list[RunKind], cs: int,
               n: int) -> Iterator[tuple[RunKind, int, int]]:
    """(kind, offset, length) of the runs of equal kinds in a chunk of ``n`` bytes."""
    p = 0
    while p < n:
        k = kinds[p // cs]
        q = p + cs
        while q < n and kinds[q // cs] == k:
            q += cs
        yield k, p, min(q, n) - p
        p = q


#: what :class:`_ReadAhead` yields: (kind, pos, n, item, scanned)
_Item: TypeAlias = "tuple[RunKind, int, int, Any, Any]"

_BUFFERS = 4  # chunk buffers of a pipelined copy (one being written, the rest read ahead)
_AHEAD = 4 * _BUFFERS  # plan items the reader may queue ahead of the writer


class _Decoded:
    """Consecutive compressed clusters being decoded into ``buf`` by the pool: ``pieces``
    are their block-status runs (guest position, length), in order."""

    __slots__ = ("future", "buf", "pieces")

    def __init__(self, future: Job[Any], buf: Any, pieces: list[tuple[int, int]]) -> None:
        self.future, self.buf, self.pieces = future, buf, pieces


#: what a ``scan`` of :class:`_ReadAhead` returns for a data buffer (the copier's sparse
#: runs), handed to the consumer with the buffer
Scan: TypeAlias = "Callable[[Any, int, int], Any]"
#: ``scan_decoded(buf, n, pieces)``: the same for compressed clusters decoded into
#: ``buf[:n]`` (``pieces``: their (guest position, length)), run by the decoding worker
#: right after it decoded them; what it returns is the result of :attr:`_Decoded.future`
ScanDecoded: TypeAlias = "Callable[[Any, int, list[tuple[int, int]]], Any]"


class _ReadAhead:
    """Reads the data runs of a plan on a background thread into a small ring of CHUNK
    buffers; iterating yields ``(kind, pos, n, item, scanned)`` in plan order, ``item``
    being the buffer (data), the lengths of the runs merged (zero, backing) or, for a run
    of whole compressed clusters (up to CHUNK bytes, several plan runs), a
    :class:`_Decoded`.  ``scan(buf, n, pos)``, when given, runs on the reader thread on each
    data buffer just read, and ``scanned`` is its result (None otherwise): the copier's
    zero scan overlaps the writes instead of delaying them; a data run the scan finds all
    zero comes with item None (its buffer is reused at once).  Return each buffer with
    :meth:`release` once written.  ``scan_decoded``, when given, does the same for the
    decoded compressed clusters, on the decoding pool (the zero scan is then off the
    consumer's thread, which is the one that writes).  Errors of the reader (and of
    ``scan``) are raised by the iteration; leaving the ``with`` block stops the reader
    and waits for its end.  The reader is a ``_thread`` thread fed through
    ``_queue.SimpleQueue`` (both C): a copy imports neither queue nor threading (about
    2 ms of CPU with the functools, heapq ... they load: issue 20), and an item is handed
    over without queue.Queue's Condition, which is Python code."""

    def __init__(self, src: BlockDevice,
                 plan: Iterator[tuple[RunKind, int, int, list[int] | None]],
                 scan: Scan | None = None, scan_decoded: ScanDecoded | None = None) -> None:
        import _queue
        import _thread

        self.src, self.plan, self.scan = src, plan, scan
        self.scan_decoded = scan_decoded
        self.decoder = _ClusterDecoder.for_device(src)
        #: the ring: buffers written and given back; up to _BUFFERS are made, by the
        #: reader, when it finds none free (a sparse source with little data makes one)
        self.free: _queue.SimpleQueue[Any] = _queue.SimpleQueue()
        self.made = 0
        self._empty = _queue.Empty
        self.ready: _queue.SimpleQueue[_Item | BaseException | None] = _queue.SimpleQueue()
        #: a token per item the reader may queue ahead of the consumer, given back as the
        #: consumer takes one: zero and backing runs hold no buffer, this bounds them
        self.slots: _queue.SimpleQueue[bool] = _queue.SimpleQueue()
        for _ in range(_AHEAD):
            self.slots.put(True)
        self.stop = False
        #: held while the reader runs: acquiring it is the join
        self.running = _thread.allocate_lock()
        self._start_thread = _thread.start_new_thread
        #: the reader's ``_thread.get_ident()``, once started
        self.ident: int | None = None

    def __enter__(self) -> _ReadAhead:
        self.running.acquire()
        try:
            self.ident = self._start_thread(self._main, ())
        except BaseException:
            self.running.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.free.put(None)  # wakes a reader waiting for a buffer
        self.slots.put(True)  # ... or for a slot
        with self.running:  # the reader has ended
            pass
        if self.decoder is not None:
            self.decoder.close()

    def _main(self) -> None:
        try:
            self._run()
        finally:
            self.running.release()

    def _buffer(self) -> Any:
        """A free buffer of the ring, made (its pages populated: it is filled whole or
        reused) while fewer than _BUFFERS exist; else the next one the consumer gives
        back (None: stop)."""
        try:
            return self.free.get_nowait()
        except self._empty:
            if self.made < _BUFFERS:
                self.made += 1
                return aligned_buffer(CHUNK, fill=True)
        return self.free.get()

    def _send(self, item: _Item | BaseException | None) -> bool:
        """Queue ``item`` for the consumer (once it has a slot); False when the consumer
        has gone."""
        if self.stop:
            return False
        self.slots.get()
        if self.stop:
            return False
        self.ready.put(item)
        return True

    def _flush_batch(self, batch: list[tuple[int, int, Run]]) -> bool:
        """Hand the gathered compressed clusters to the decoder; False when stopping."""
        if not batch:
            return True
        assert self.decoder is not None
        buf = self._buffer()
        if buf is None or self.stop:
            return False
        pieces = [(pos, n) for pos, n, _ in batch]
        fut = self.decoder.decode_into(list(batch), buf, self.scan_decoded)
        total = sum(n for _, n in pieces)
        batch.clear()
        return self._send((_DATA, pieces[0][0], total, _Decoded(fut, buf, pieces), None))

    def _run(self) -> None:
        try:
            dec = self.decoder
            batch: list[tuple[int, int, Run]] = []  # (pos, n, run), guest-contiguous
            size = 0
            for kind, pos, n, runs in self.plan:
                if kind is _DATA and dec is not None:
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
                scanned = None
                if kind is _DATA:
                    buf = self._buffer()
                    if buf is None or self.stop:
                        return
                    self.src.readinto(pos, memoryview(buf)[:n])
                    if self.scan is not None:
                        scanned = self.scan(buf, n, pos)
                        if not any(is_data for _s, _n, is_data in scanned):
                            # (the copier's sparse runs: start, length, is_data)
                            # all zero: the consumer writes none of it, so the
                            # buffer goes back to the ring at once (item None) and the
                            # reader is not held up by writes of the data before it
                            self.free.put(buf)
                            buf = None
                if not self._send((kind, pos, n, buf, scanned)):
                    return
            if self._flush_batch(batch):
                self._send(None)
        except BaseException as e:  # handed to the consumer, raised there
            self._send(e)

    def __iter__(self) -> Iterator[_Item]:
        while True:
            item = self.ready.get()
            self.slots.put(True)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.free.put(buf)


class _ClusterDecoder:
    """Decodes the COMPRESSED runs of a source on a thread pool (zlib and zstandard
    release the GIL), so a convert of a compressed image uses every core like qemu-img's:
    for a source that declares :attr:`BlockDevice.parallel_compressed_reads` (qcow2
    without encryption); other sources are read as usual."""

    def __init__(self, src: BlockDevice, workers: int) -> None:
        self.src = src
        self.workers = workers
        # started on the first compressed cluster: a source without any costs no threads
        self.pool: WorkerPool | None = None

    @classmethod
    def for_device(cls, src: BlockDevice) -> _ClusterDecoder | None:
        workers = min(8, os.cpu_count() or 1)
        if workers < 2 or not src.parallel_compressed_reads:
            return None
        return cls(src, workers)

    def entry(self, pos: int, n: int) -> Run | None:
        """The COMPRESSED run of the source when [pos, pos+n) lies in one, else None
        (read it normally)."""
        run = self.src.plan(pos, n)
        if run.kind is not RunKind.COMPRESSED or run.length < n:
            return None
        return run

    def decode_into(self, batch: list[tuple[int, int, Run]], buf: Any,
                    scan: ScanDecoded | None = None) -> Job[Any]:
        """Decode the ``(pos, n, run)`` pieces back to back into ``buf`` on the pool; the
        job's result is ``scan(buf, total, pieces)`` when ``scan`` is given, else None."""
        if self.pool is None:
            from diskimg.hostio.workers import worker_pool

            self.pool = worker_pool(self.workers, "dec")
        return self.pool.submit(self._decode_batch, batch, buf, scan)

    def _decode_batch(self, batch: list[tuple[int, int, Run]], buf: Any,
                      scan: ScanDecoded | None) -> Any:
        mv = memoryview(buf)
        at = 0
        for _pos, n, run in batch:
            self.src.read_compressed(run, mv[at : at + n])
            at += n
        return None if scan is None else scan(buf, at, [(p, n) for p, n, _ in batch])

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
