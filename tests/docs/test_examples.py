"""Run every script in examples/ in a fresh directory: each asserts its own results, so a
change that breaks an example fails here (issue 9.6: examples CI runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_examples_exist_and_are_documented() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.py", "export_file.py", "validate_uploads.py", "build_ova.py"} <= names
    page = (REPO / "docs" / "examples.md").read_text(encoding="utf-8")
    undocumented = [n for n in sorted(names) if f"examples/{n}" not in page]
    assert not undocumented, f"docs/examples.md does not describe {undocumented}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, f"{script.name} exited {p.returncode}\n{p.stdout}{p.stderr}"
    assert p.stdout.strip(), f"{script.name} printed nothing"
    assert not any(tmp_path.glob("*.lock")), "an example left a lock file behind"
    # the script worked in its own directory, not in the repository
    assert any(tmp_path.iterdir())
