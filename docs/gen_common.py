"""What docs/gen_api.py and docs/gen_cli.py share: write a generated page, or check it.

Standard library only; imported by the generators as ``gen_common`` (they run as scripts,
so ``docs/`` is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def run(script: str, out: Path, generate: Callable[[], str], argv: list[str] | None = None,
        problems: Callable[[], list[str]] = list) -> int:
    """The generators' command line: rewrite ``out`` with ``generate()``, or with
    ``--check`` only compare it.

    Returns 1 if (``--check``) ``out`` differs from what would be generated, or if
    ``problems()`` (called after ``generate()``) lists anything, each printed on stderr;
    else 0.  Without ``--check`` the page is written even when there are problems.
    """
    ap = argparse.ArgumentParser(prog=f"python docs/{script}",
                                 description=f"Regenerate {_rel(out)}.")
    ap.add_argument("--check", action="store_true",
                    help=f"do not write; exit 1 if {out.name} is out of date or incomplete")
    a = ap.parse_args(argv)
    text = generate()
    issues = problems()
    for msg in issues:
        print(msg, file=sys.stderr)
    rc = 1 if issues else 0
    rel = _rel(out)
    if a.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{rel} is out of date; run python docs/{script}", file=sys.stderr)
            rc = 1
        return rc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {rel}")
    return rc


def _rel(out: Path) -> str:
    """``out`` relative to the repository (``docs/reference/api.md``) when it lies inside."""
    repo = Path(__file__).resolve().parent.parent
    path = out.resolve()
    return path.relative_to(repo).as_posix() if path.is_relative_to(repo) else str(out)
