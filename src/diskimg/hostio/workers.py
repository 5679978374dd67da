"""The one worker-pool factory: every thread pool of the project (compressed copy,
read-ahead decoding, qcow2 decompression, vmdk stream deflate and grain inflate) is made
here.  ``concurrent.futures`` is imported on first use, so commands that never start a
thread (info, check, map) never load it."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


def worker_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A new pool of ``max(1, workers)`` threads named ``diskimg-NAME``; the caller owns
    it (shuts it down, or keeps it process-wide)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=f"diskimg-{name}")
