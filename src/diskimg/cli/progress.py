"""qemu-img's ``-p`` progress line: ``    (NN.NN/100%)\\r`` on stdout, ``\\n`` at the end."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Callable taking percentages; prints at 0 and 100 and whenever the value moved by more than ``min_skip`` points
    (qemu-img uses 1.0 for convert, 2.0 for compare).  Disabled: does nothing."""

    def __init__(self, enabled: bool, min_skip: float = 1.0, out: TextIO | None = None):
        self.enabled = enabled
        self.min_skip = min_skip
        self.out = out
        self.current = 0.0
        self.last = 0.0

    def _print(self) -> None:
        out = self.out or sys.stdout
        out.write(f"    ({self.current:3.2f}/100%)\r")
        out.flush()

    def __call__(self, percent: float) -> None:
        """Set the progress to ``percent`` (0..100)."""
        if not self.enabled:
            return
        cur = min(100.0, max(0.0, percent))
        self.current = cur
        if (cur > self.last + self.min_skip or cur < self.last - self.min_skip
                or cur in (0.0, 100.0)):
            self.last = cur
            self._print()

    def finish(self) -> None:
        """Force 100% and end the line (what qemu-img does after a successful copy)."""
        if self.enabled:
            self.current = 100.0
            self._print()
            self.end()

    def end(self) -> None:
        """End the progress line."""
        if self.enabled:
            out = self.out or sys.stdout
            out.write("\n")
            out.flush()
