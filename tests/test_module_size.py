"""Issue 16: modules are split along their seams; none in src/ is over 600 lines."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "diskimg"
LIMIT = 600


def test_no_module_over_600_lines() -> None:
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines())
             for p in SRC.rglob("*.py")}
    assert len(sizes) > 50, "the scan found too few modules: wrong root?"
    over = {m: n for m, n in sizes.items() if n > LIMIT}
    assert not over, f"modules over {LIMIT} lines (split them along their seams): {over}"
