"""The generated reference pages are up to date, and every public object has a docstring.

docs/gen_api.py and docs/gen_cli.py rebuild docs/reference/api.md and cli.md; ``--check``
exits 1 when the committed page differs or (api) when a public object lacks a docstring.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


@pytest.mark.parametrize("script", ["gen_api.py", "gen_cli.py"])
def test_reference_page_is_current_and_complete(script: str) -> None:
    p = subprocess.run([sys.executable, str(DOCS / script), "--check"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, (f"python docs/{script} --check failed; run python "
                               f"docs/{script} and write the missing docstrings:\n{p.stderr}")


@pytest.fixture
def gen_api(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(DOCS))
    import gen_api

    return gen_api


def test_missing_docstring_fails_the_check(gen_api: types.ModuleType, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    mod = types.ModuleType("fake_public")

    def documented() -> None:
        """Has one."""

    def undocumented() -> None:
        pass

    class Thing:
        """A class."""

        @property
        def size(self) -> int:
            return 0

    mod.documented, mod.undocumented, mod.Thing = documented, undocumented, Thing  # type: ignore[attr-defined]
    mod.__all__ = ["documented", "undocumented", "Thing"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_public", mod)
    monkeypatch.setattr(gen_api, "SECTIONS", [("fake_public", None, "fake", "intro")])
    monkeypatch.setattr(gen_api, "OUT", tmp_path / "reference" / "api.md")

    assert gen_api.main([]) == 1  # writes the page, but reports the gaps
    err = capsys.readouterr().err
    assert "missing docstring: fake_public.undocumented" in err
    assert "missing docstring: fake_public.Thing.size" in err
    assert "fake_public.documented" not in err
    assert gen_api.main(["--check"]) == 1  # page current, docstrings still missing

    undocumented.__doc__ = "Now documented."
    Thing.size.fget.__doc__ = "Bytes."  # type: ignore[attr-defined]
    assert gen_api.main(["--check"]) == 1  # the page no longer matches
    assert gen_api.main([]) == 0
    assert gen_api.main(["--check"]) == 0
    page = (tmp_path / "reference" / "api.md").read_text()
    assert "Now documented." in page and "no docstring" not in page


def test_check_reports_a_stale_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(DOCS))
    import gen_common

    out = DOCS / "reference" / "cli.md"  # only read: --check never writes
    assert gen_common.run("gen_cli.py", out, lambda: out.read_text() + "x\n", ["--check"]) == 1
    assert "docs/reference/cli.md is out of date; run python docs/gen_cli.py" in \
        capsys.readouterr().err
    assert gen_common.run("gen_cli.py", out, out.read_text, ["--check"]) == 0
