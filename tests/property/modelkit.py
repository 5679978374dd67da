"""Helpers shared by the model machines (beside them on ``sys.path``, see conftest.py):
coverage counters and the model side of a resize and of a refusal check."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from hypothesis import event

#: machine name -> what its runs covered; tests/property/conftest.py prints them
REGISTRY: dict[str, Counter[str]] = {}


def counter(name: str) -> Counter[str]:
    return REGISTRY.setdefault(name, Counter())


def note(cov: Counter[str], what: str) -> None:
    """Count ``what`` and report it as a hypothesis event (--hypothesis-show-statistics)."""
    cov[what] += 1
    event(what)


def resize_model(model: bytearray, new: int) -> str:
    """Cut or zero-extend ``model`` to ``new`` bytes; returns what happened."""
    if new < len(model):
        del model[new:]
        return "resize shrink"
    model.extend(bytes(new - len(model)))
    return "resize grow"


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory``: a refused operation must change none."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}
