"""``mkdocs build --strict`` succeeds: no broken links or anchors, every page in the nav.

Runs when mkdocs and pymdown-extensions are installed (skipped otherwise). Without
mkdocs-material (mkdocs.yml's theme, ~140 MB) the build uses mkdocs' built-in theme: link,
anchor and nav validation do not depend on the theme.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("mkdocs")
pytest.importorskip("pymdownx")
yaml = pytest.importorskip("yaml")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    cfg["docs_dir"] = str(REPO / "docs")
    if importlib.util.find_spec("material") is None:
        cfg["theme"] = {"name": "mkdocs"}
    cfg_path = tmp_path / "mkdocs.yml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                        str(cfg_path), "-d", str(site)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}{p.stderr}"
    for page in ("index.html", "tutorial/index.html", "examples/index.html",
                 "reference/api/index.html", "reference/cli/index.html",
                 "howto/ova-vmdk/index.html"):
        assert (site / page).is_file(), page
    assert not list(site.rglob("*.py")), "the generator scripts must not be published"
    assert "create → write → snapshot" in (site / "index.html").read_text(encoding="utf-8")
