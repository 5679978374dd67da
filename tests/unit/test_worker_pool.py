"""The project's own worker pool (``diskimg.hostio.workers``): the part of
``ThreadPoolExecutor``'s behaviour the copy paths rely on, without importing
``concurrent.futures`` (whose ``logging`` import sat on a pipelined copy's critical path,
issue 20)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from diskimg.hostio.workers import CancelledError, Job, WorkerPool, wait, worker_pool


def test_results_in_submission_order_and_errors_kept() -> None:
    with worker_pool(2, "t") as pool:
        jobs = [pool.submit(pow, 3, k) for k in range(50)]
        bad = pool.submit(int, "not a number")
        assert [j.result() for j in jobs] == [3 ** k for k in range(50)]
        with pytest.raises(ValueError, match="not a number"):
            bad.result()
        assert isinstance(bad.exception(), ValueError) and bad.done()
        assert jobs[0].exception() is None
        # a job that raised did not kill its worker
        assert pool.submit(len, b"abc").result() == 3
        assert list(pool.map(lambda x: x * 2, range(10))) == [x * 2 for x in range(10)]
    assert len(pool._threads) == 2 and not any(t.is_alive() for t in pool._threads)


def test_cancel_only_before_a_worker_takes_the_job() -> None:
    gate = threading.Event()
    started = threading.Event()
    ran: list[int] = []

    def block() -> int:
        started.set()
        gate.wait(10)
        return 1

    pool = worker_pool(1, "t")
    first = pool.submit(block)
    assert started.wait(10)
    queued = [pool.submit(ran.append, k) for k in range(3)]
    assert not first.cancel()  # running
    assert queued[1].cancel() and queued[1].cancel() and queued[1].cancelled()
    with pytest.raises(CancelledError):
        queued[1].result()
    gate.set()
    assert first.result() == 1
    wait(queued)
    assert ran == [0, 2]  # the cancelled job never ran; the others did, in order
    assert not queued[0].cancel()  # done
    pool.shutdown()


def test_shutdown_cancels_pending_jobs_and_refuses_new_ones() -> None:
    gate = threading.Event()
    pool = WorkerPool(1, "t")
    busy = pool.submit(gate.wait, 10)
    pending = [pool.submit(int, k) for k in range(5)]
    gate.set()
    pool.shutdown(wait=True, cancel_futures=True)
    assert busy.result() is True
    for j in pending:  # each either ran before the shutdown or was cancelled, never both
        assert j.done()
        assert j.cancelled() or j.result() in range(5)
    with pytest.raises(RuntimeError):
        pool.submit(int, 1)


def test_threads_named_started_on_demand_and_at_least_one() -> None:
    pool = worker_pool(0, "named")
    assert pool._max_workers == 1 and pool._threads == []
    name = pool.submit(lambda: threading.current_thread().name).result()
    assert name.startswith("diskimg-named")
    pool.shutdown()


def test_job_is_subscriptable_for_annotations() -> None:
    assert Job[int] is Job


def test_an_idle_process_wide_pool_does_not_hold_up_exit() -> None:
    code = ("from diskimg.hostio.workers import worker_pool\n"
            "p = worker_pool(2, 'idle')\n"
            "assert p.submit(sum, [1, 2]).result() == 3\n"
            "import sys; print(sorted(m for m in sys.modules if m.startswith('concurrent')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.strip() == "[]"  # and it exited: no import of concurrent.futures


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_workers_of_its_own() -> None:
    """A pool used before a fork works in the child (whose copy of it has no threads):
    the child's first submit starts its own workers instead of waiting for ever."""
    import os

    pool = worker_pool(2, "fork")
    assert [j.result() for j in [pool.submit(pow, 2, 10), pool.submit(pow, 2, 11)]] == [
        1024, 2048]
    assert len(pool._threads) == 2  # every worker started before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's teardown
        import signal

        signal.alarm(30)  # a child that would wait for ever dies: the test fails, not hangs
        try:
            got = [pool.submit(pow, 2, k).result() for k in range(4)]
            os.write(w, repr(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out == "[1, 2, 4, 8]"
    assert pool.submit(pow, 3, 2).result() == 9  # the parent's workers are untouched
    pool.shutdown()


EXIT_PROBE = """\
import sys, threading
from diskimg.hostio.workers import worker_pool
pool = worker_pool(1, "exit")
gate = threading.Event()
pool.submit(gate.wait, 0.3)  # the worker is still busy when the main thread ends
queued = pool.submit(sum, [5, 6])  # still queued when the interpreter starts to exit

class Late:  # finalized by the interpreter's last collections (a cycle)
    def __del__(self):
        out = [queued.result()]
        try:
            pool.submit(sum, [1])
        except RuntimeError as e:
            out.append(str(e))
        sys.stdout.write(repr(out))
        sys.stdout.flush()

late = Late()
late.self = late
"""


def test_at_exit_queued_jobs_finish_and_later_ones_are_refused() -> None:
    """As with ThreadPoolExecutor: the pools are shut down at exit (their queued jobs
    done), so a finalizer that waits for a job gets its result and one that submits
    gets RuntimeError, instead of waiting for ever for daemon workers that no longer
    run."""
    r = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True,
                       timeout=60, check=True)
    out = eval(r.stdout)  # noqa: S307
    assert out[0] == 11 and "shutdown" in out[1]
