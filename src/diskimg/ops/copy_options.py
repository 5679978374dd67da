"""The copy's optional behaviours, loaded only by a copy that asks for one (start-up,
issue 20: a plain convert builds neither class): ``-r RATE`` (:class:`RateLimit`, convert
and commit) and ``--salvage`` (:class:`Salvage`)."""

from __future__ import annotations

import time

from diskimg.ops import _ZEROS, SECTOR
from diskimg.ops.copier import READ_ERRORS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class RateLimit:
    """``-r RATE`` (convert, commit): data is copied at ``rate`` bytes per second at
    most.  A request goes out at once when the bytes before it are within the rate, else
    after a sleep until they are (so the first request is not delayed, as in qemu-img,
    whose zero and backing runs are not counted either)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start: float | None = None
        self.sent = 0

    def __call__(self, n: int) -> None:
        """Account for ``n`` bytes about to be copied, first waiting for their turn."""
        now = self.clock()
        if self.start is None:
            self.start = now
        due = self.start + self.sent / self.rate
        if due > now:
            self.sleep(due - now)
        self.sent += n


class Salvage:
    """``--salvage``: a range of a source that cannot be read becomes zeros, sector by
    sector, each unreadable sector reported as qemu-img reports it (``warn`` receives the
    line; None keeps quiet, ``-q``)."""

    def __init__(self, warn: Callable[[str], None] | None) -> None:
        self.warn = warn

    def _say(self, line: str) -> None:
        if self.warn is not None:
            self.warn(line)

    def readinto(self, read: Callable[[int, memoryview], Any], off: int,
                 buf: memoryview) -> None:
        """``read(off, buf)``; on failure each sector again, unreadable ones zeroed."""
        try:
            read(off, buf)
            return
        except READ_ERRORS:
            pass
        for s in range(0, len(buf), SECTOR):
            piece = buf[s : s + SECTOR]
            try:
                read(off + s, piece)
            except READ_ERRORS:
                piece[:] = _ZEROS[: len(piece)]
                self._say(f"error while reading offset {off + s}: Input/output error")

    def status_failed(self, pos: int) -> None:
        """The block status at ``pos`` could not be read: the caller reads that one
        sector as data (qemu-img's words for it)."""
        self._say(f"error while reading block status at offset {pos}: Input/output error")
