"""Run the examples in the documentation, so the docs cannot rot.

Convention (described for writers in docs/development-docs.md): a fenced block is run when
the line before its opening fence is an HTML comment ``<!-- test -->`` (invisible when the
Markdown is rendered).  The comment may carry options: ``<!-- test: qemu -->`` marks a
block that needs qemu-img/qemu-io (skipped when they are absent; blocks that mention
``qemu-img`` or ``qemu-io`` are treated so automatically).

- ```` ```python ```` blocks are executed with ``exec``; all runnable blocks of one page
  share one namespace and one fresh temporary working directory, in document order, so a
  page can build on its earlier steps (like a doctest session).
- ```` ```console ```` / ```` ```sh ```` blocks: every line starting with ``$ `` is a
  command (a trailing ``\\`` continues it on the next line); other lines are sample output
  and are not compared, unless the marker says ``<!-- test: output -->``: then each
  command's combined stdout and stderr must equal the lines after it (trailing blanks
  ignored).  Each command must exit 0.  Plain ``diskimg ...`` commands run in-process
  through ``diskimg.cli.main.main`` (fast); anything else runs under ``bash``.

Every page with at least one runnable block is one test.  Pages: README.md and
docs/**/*.md.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [p for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))] if p.exists()]
HAVE_QEMU = bool(shutil.which("qemu-img") and shutil.which("qemu-io"))

_MARK = re.compile(r"^\s*<!--\s*test(?::\s*(?P<opts>[^>]*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SHELL_META = set("|&;<>()$`*?[]{}~!#\\\"'")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    opts: set[str] = field(default_factory=set)

    @property
    def needs_qemu(self) -> bool:
        return "qemu" in self.opts or bool(re.search(r"\bqemu-(img|io)\b", self.text))

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def extract(page: Path) -> list[Block]:
    """The runnable fenced blocks of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    prev = ""  # last non-blank line before the current one
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                prev = lines[i]
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        mark = _MARK.match(prev)
        prev = ""
        if not mark:
            continue
        lang = info.split()[0] if info else ""
        opts = {o.strip() for o in (mark.group("opts") or "").split(",") if o.strip()}
        indent = len(m.group("indent"))
        text = "\n".join(ln[indent:] for ln in body) + "\n"
        out.append(Block(page, start + 1, lang, text, opts))
    return out


def session(text: str) -> list[tuple[str, list[str]]]:
    """The ``$ `` commands of a console block (continuation lines joined), each with the
    sample output lines that follow it."""
    out: list[tuple[str, list[str]]] = []
    cur: str | None = None
    for line in text.splitlines():
        if cur is not None:
            cur += "\n" + line
            if not line.endswith("\\"):
                out.append((cur, []))
                cur = None
            continue
        if line.startswith("$ "):
            cmd = line[2:]
            if cmd.endswith("\\"):
                cur = cmd
            else:
                out.append((cmd, []))
        elif out:
            out[-1][1].append(line)
    if cur is not None:
        out.append((cur, []))
    return out


def commands(text: str) -> list[str]:
    """The ``$ `` commands of a console block (continuation lines joined)."""
    return [cmd for cmd, _ in session(text)]


def _run_command(cmd: str, where: str) -> str:
    """Run one command (it must exit 0); return its stdout and stderr, interleaved."""
    simple = "\n" not in cmd and not (_SHELL_META & set(cmd.replace("=", "")))
    argv = shlex.split(cmd) if simple else []
    if argv and argv[0] == "diskimg":
        from diskimg.cli.main import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = main(argv[1:])
        assert rc == 0, f"{where}: `{cmd}` exited {rc}\n{out.getvalue()}"
        return out.getvalue()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    p = subprocess.run(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, f"{where}: `{cmd}` exited {p.returncode}\n{p.stdout}"
    return p.stdout


def _lines(text: str | list[str]) -> list[str]:
    lines = [ln.rstrip() for ln in (text.splitlines() if isinstance(text, str) else text)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _pages_with_blocks() -> list[Path]:
    return [p for p in PAGES if extract(p)]


@pytest.mark.parametrize("page", _pages_with_blocks(),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_page_examples(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = extract(page)
    if not HAVE_QEMU:
        blocks = [b for b in blocks if not b.needs_qemu]
        if not blocks:
            pytest.skip("every example on this page needs qemu-img")
    monkeypatch.chdir(tmp_path)
    # pool examples run as root in CI: keep definitions out of /etc/libvirt/storage
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(tmp_path / ".storage"))
    monkeypatch.setenv("DISKIMG_POOL_STATE_DIR", str(tmp_path / ".state"))
    ns: dict[str, object] = {"__name__": "__docs__"}
    for b in blocks:
        if b.lang in ("python", "py", "pycon"):
            code = compile(b.text, b.where(), "exec")
            exec(code, ns)
        elif b.lang in ("console", "sh", "shell", "bash"):
            for cmd, expected in session(b.text):
                got = _run_command(cmd, b.where())
                if "output" in b.opts:
                    assert _lines(got) == _lines(expected), (
                        f"{b.where()}: `{cmd}` printed something else than the page shows:\n"
                        + "\n".join(difflib.unified_diff(_lines(expected), _lines(got),
                                                          "page", "actual", lineterm="")))
        else:
            raise AssertionError(f"{b.where()}: cannot run a '{b.lang}' block")


def test_convention_is_used() -> None:
    """Guard against a typo in the marker silently disabling every example."""
    assert sum(len(extract(p)) for p in PAGES) >= 20
