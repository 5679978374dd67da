"""Puts the shared helper module (modelkit) on ``sys.path`` and prints what the model
tests covered (option combinations and operation counts) at the end of the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import modelkit  # noqa: E402


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, cov in sorted(modelkit.REGISTRY.items()):
        if not cov:
            continue
        terminalreporter.write_sep("-", f"model coverage: {name}")
        for what, n in sorted(cov.items()):
            terminalreporter.write_line(f"{n:6d}  {what}")
