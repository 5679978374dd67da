"""The one worker-pool factory: every thread pool of the project (compressed copy,
read-ahead decoding, qcow2 decompression, vmdk stream deflate and grain inflate, LUKS
crypt, object fetches, checksums) is made here.

The pool is a small one of our own rather than ``concurrent.futures``: importing that
loads ``logging`` (and with it ``re``, ``traceback``, ``string``...), ~10 ms that a
pipelined copy paid on its critical path, on the read-ahead thread, before the first
compressed cluster could be decoded (issue 20).  It offers the part of
``ThreadPoolExecutor``'s interface the project uses: :meth:`WorkerPool.submit` (a
:class:`Job`, the future, with ``result``/``exception``/``cancel``/``done``),
:meth:`WorkerPool.map`, :meth:`WorkerPool.shutdown` (``wait``, ``cancel_futures``), the
``with`` block, and :func:`wait` for several jobs.

Invariants: a job runs at most once, and never after a successful :meth:`Job.cancel`;
whatever it raises is kept for :meth:`Job.result` and never kills its worker.  The
workers are daemon threads; at interpreter exit (``atexit``, while they still run) every
pool not shut down yet is shut down, its queued jobs done, as ThreadPoolExecutor's are,
so a finalizer that waits for a job never waits for ever, and a later submit (during
finalization) raises RuntimeError.
"""

from __future__ import annotations

import os
import sys
import threading
from _queue import Empty, SimpleQueue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, Generic, TypeVar

    _T = TypeVar("_T")

    class _Generic(Generic[_T]):
        __slots__ = ()
else:
    _T = None

    class _Generic:
        """``Job[...]`` at run time (annotations only): the class itself."""

        __slots__ = ()

        def __class_getitem__(cls, item: object) -> type:
            return cls

__all__ = ["CancelledError", "Job", "WorkerPool", "wait", "worker_pool"]

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)
#: pools not shut down yet, shut down at interpreter exit (:func:`_at_exit`, registered
#: with the first pool)
_LIVE: set[WorkerPool] = set()
_EXIT_HOOK: list[bool] = []


class CancelledError(Exception):
    """:meth:`Job.result` of a job that was cancelled before it ran."""


class Job(_Generic[_T]):
    """One submitted call: pending until a worker takes it, then running, then done (or
    cancelled while still pending)."""

    __slots__ = ("_fn", "_args", "_state", "_value", "_error", "_finished", "_lock")

    def __init__(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> None:
        self._fn: Callable[..., _T] | None = fn
        self._args = args
        self._state = _PENDING
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards _state
        self._finished = threading.Lock()  # held until the job is done or cancelled
        self._finished.acquire()

    def _run(self) -> None:
        with self._lock:
            if self._state != _PENDING:
                return
            self._state = _RUNNING
        fn, args = self._fn, self._args
        self._fn, self._args = None, ()  # drop references to the arguments (buffers)
        assert fn is not None
        try:
            self._value = fn(*args)
        except BaseException as e:  # kept for result(): the worker goes on
            self._error = e
        with self._lock:
            self._state = _DONE
        self._finished.release()

    def cancel(self) -> bool:
        """Cancel the job if no worker took it yet; True when it is (now) cancelled,
        False when it is running or done."""
        with self._lock:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._fn, self._args = None, ()
                self._finished.release()
                return True
            return self._state == _CANCELLED

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        """True once the job finished (or was cancelled)."""
        return self._state in (_DONE, _CANCELLED)

    def _wait(self) -> None:
        if not self.done():
            self._finished.acquire()
            self._finished.release()

    def exception(self) -> BaseException | None:
        """Wait for the job; what it raised (None when it returned)."""
        self._wait()
        if self._state == _CANCELLED:
            raise CancelledError()
        return self._error

    def result(self) -> _T:
        """Wait for the job; its return value, or raise what it raised."""
        self._wait()
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def wait(jobs: Iterable[Job[Any]]) -> None:
    """Wait until every job of ``jobs`` is done or cancelled (raises nothing)."""
    for j in jobs:
        j._wait()


class WorkerPool:
    """Up to ``max_workers`` daemon threads named ``diskimg-NAME_i``, started one per
    submitted job until there are that many, taking jobs in submission order.  In a
    forked child (which has none of the parent's threads) the first submit starts over
    with new threads and an empty queue."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._max_workers = max(1, max_workers)
        self._prefix = f"diskimg-{name}"
        self._queue: SimpleQueue[Job[Any] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        if not _EXIT_HOOK:
            import atexit  # built in: costs nothing

            atexit.register(_at_exit)
            _EXIT_HOOK.append(True)
        _LIVE.add(self)

    def submit(self, fn: Callable[..., _T], *args: Any) -> Job[_T]:
        """Run ``fn(*args)`` on a worker; raises RuntimeError after :meth:`shutdown` and
        once the interpreter is finalizing (its daemon workers no longer run: a job
        queued then would be waited for for ever), as ThreadPoolExecutor does at exit."""
        job = Job(fn, args)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            if sys.is_finalizing():
                raise RuntimeError("cannot schedule new jobs after interpreter shutdown")
            if self._pid != os.getpid():  # a forked child: the parent's threads are gone
                self._pid, self._threads, self._queue = os.getpid(), [], SimpleQueue()
            self._queue.put(job)
            if len(self._threads) < self._max_workers:
                t = threading.Thread(target=_work, args=(self._queue,), daemon=True,
                                     name=f"{self._prefix}_{len(self._threads)}")
                t.start()
                self._threads.append(t)
        return job

    def map(self, fn: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
        """``fn`` over ``items`` on the workers; the results in the order of ``items``
        (every job is submitted before the first result is waited for)."""
        jobs = [self.submit(fn, x) for x in items]

        def results() -> Iterator[_T]:
            for j in jobs:
                yield j.result()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more jobs; with ``cancel_futures`` cancel those no worker took yet;
        with ``wait`` return once every worker has ended (after the jobs it took)."""
        _LIVE.discard(self)
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            if cancel_futures:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except Empty:
                        break
                    if job is not None:
                        job.cancel()
            for _ in threads:
                self._queue.put(None)  # one stop mark per worker, after the queued jobs
        if wait:
            for t in threads:
                t.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


def _work(queue: SimpleQueue[Job[Any] | None]) -> None:
    while True:
        job = queue.get()
        if job is None:
            return
        job._run()
        del job  # no reference to the last job's result while idle


def _at_exit() -> None:
    """Shut every live pool down, letting its queued jobs finish (the workers, daemon
    threads, stop running once the interpreter finalizes)."""
    for pool in list(_LIVE):
        pool.shutdown(wait=True)


def worker_pool(workers: int, name: str) -> WorkerPool:
    """A new pool of ``max(1, workers)`` threads named ``diskimg-NAME``; the caller owns
    it (shuts it down, or keeps it process-wide)."""
    return WorkerPool(workers, name)
