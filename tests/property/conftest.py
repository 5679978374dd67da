"""Prints what the model tests covered (option combinations and operation counts) at the
end of the run: every model module may define a ``COVERAGE`` Counter."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, mod in sorted(sys.modules.items()):
        cov = getattr(mod, "COVERAGE", None)
        if not name.startswith("test_") and not name.startswith("tests.") or not cov:
            continue
        terminalreporter.write_sep("-", f"model coverage: {name}")
        for what, n in sorted(cov.items()):
            terminalreporter.write_line(f"{n:6d}  {what}")
