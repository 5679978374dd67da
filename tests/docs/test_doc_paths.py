"""No doc refers to a file that is not in the repository.

Scans README.md and every docs/**/*.md for
- relative links (``[text](formats/luks.md#anchor)``, ``[x](../src/...)``), which must name
  an existing file or directory relative to the page;
- repository paths in the text (``src/...``, ``tests/...``, ``benchmarks/...``,
  ``examples/...``, ``fuzz/...``, ``fixtures/...``, ``docs/...``, ``.ci/...``), which must exist
  relative to the repository root.

A path may name something a command writes rather than a file in the repository only when
it is a placeholder (a word such as ``SIZE`` or ``SEED`` standing for a value, checked as a
glob: ``benchmarks/results-SIZE.md`` needs some ``benchmarks/results-*.md``)
or lies under a directory ``.gitignore`` keeps out of the repository (``fuzz/findings/``).
Links to other sites (``https://...``) are not followed; their text is not scanned.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_PATH = re.compile(r"(?<![\w./~$-])((?:src|tests|benchmarks|examples|fuzz|fixtures|docs|\.ci)"
                   r"/[\w./*<>-]*[\w*>/])")
#: words the docs use for a value in a path (``results-SIZE.md``, ``crash/SEED/``)
_PLACEHOLDER = re.compile(r"(?<![A-Za-z])(?:SIZE|SEED|NAME|N|ID|FMT|DIR|KIND)(?![A-Za-z])"
                          r"|<[^>]*>")


def _ignored_dirs() -> list[str]:
    """The directories .gitignore keeps out of the repository (``name/`` entries)."""
    out = []
    for line in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.endswith("/") and not line.startswith("#") and "*" not in line:
            out.append(line.strip("/"))
    return out


def _exists(rel: str) -> bool:
    if (REPO / rel).exists():
        return True
    pattern = _PLACEHOLDER.sub("*", rel)
    if "*" in pattern and glob.glob(str(REPO / pattern)):
        return True
    return any(rel == d or rel.startswith(d + "/") for d in _ignored_dirs())


def missing_paths(doc: Path, text: str) -> list[str]:
    """The links and repository paths in ``text`` (the page ``doc``) that name nothing."""
    bad = []
    for m in _LINK.finditer(text):
        target = m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (doc.parent / path).exists():
            bad.append(f"link {target}")
    # a link to another site names *its* files (QEMU's docs/interop/qcow2.txt): skip its text
    text = _LINK.sub(lambda m: "" if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", m.group(2))
                     else m.group(0), text)
    for m in _PATH.finditer(text):
        rel = m.group(1).rstrip("./")
        if not _exists(rel):
            bad.append(f"path {rel}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_names_only_existing_files(doc: Path) -> None:
    assert missing_paths(doc, doc.read_text(encoding="utf-8")) == []


def test_the_scanner_finds_missing_files() -> None:
    """The check can fail: a made-up link, repo path and placeholder are all reported."""
    page = REPO / "docs" / "index.md"
    text = ("See [luks](formats/luks.md#x), [gone](formats/gone.md), "
            "[qemu](https://example.org/docs/interop/x.txt), `tests/docs/test_doc_paths.py`, "
            "`src/diskimg/no_such.py`, `benchmarks/results-SIZE.md`, "
            "`examples/NAME.sh`, `docs/README.md` and `fuzz/findings/q`.")
    assert missing_paths(page, text) == ["link formats/gone.md", "path src/diskimg/no_such.py",
                                         "path examples/NAME.sh", "path docs/README.md"]
