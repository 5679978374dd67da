"""diskimg.cli.quickparse: the argparse-free reading of plain command lines (issue 20
start-up) gives exactly argparse's namespace, and leaves everything else to argparse.

The property: for any command line built from a command's own option strings, values
(some that look like options, empty ones, ``=`` forms) and FILE names, the quick reader
either declines (None) or returns the attributes argparse's parser gives, and argparse
then accepts that command line too.  So messages, ``--help`` and refusals are never the
quick reader's."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from diskimg.cli import commands, quickparse
from diskimg.cli.parser import _build, _parse

VALUES = ["qcow2", "raw", "json", "human", "x.img", "", "-", "none", "leaks", "all", "1M",
          "-1", "--", "a=b", "secret,id=s,data=x", "-U", "writeback", "bogus"]


def _argparse(cmd: str, argv: list[str]) -> dict[str, object] | None:
    """argparse's attributes, or None when it refuses (or prints help) for ``argv``."""
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            ns, _ = _parse(cmd, list(argv))
    except Exception:  # CommandLineError, ExitCode (-T), quickparse.Exit (--help) ...
        return None
    return vars(ns)


def _options(cmd: str) -> list[str]:
    p, _ = _build(cmd)
    return sorted(p._option_string_actions)


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[str, list[str]]:
    cmd = draw(st.sampled_from(commands.NAMES))
    opts = _options(cmd)
    token = st.one_of(
        st.sampled_from(opts),
        st.builds(lambda o, v: f"{o}={v}", st.sampled_from(opts), st.sampled_from(VALUES)),
        st.sampled_from(VALUES),
        st.sampled_from(["a.qcow2", "b.qcow2", "1G", "snap"]))
    return cmd, draw(st.lists(token, max_size=7))


@example(("create", ["--backing=--", "qcow2"]))  # argparse drops a value "--"
@given(command_lines())
def test_quick_reading_is_argparse_or_declines(line: tuple[str, list[str]]) -> None:
    cmd, argv = line
    quick = quickparse.parse(cmd, list(argv))
    if quick is None:
        return
    ns, mod = quick
    assert mod is commands.load(cmd)
    assert vars(ns) == _argparse(cmd, argv), (cmd, argv)


@pytest.mark.parametrize("cmd, argv", [
    ("info", ["d.qcow2"]),
    ("info", ["-f", "qcow2", "--output=json", "--backing-chain", "-U", "d.qcow2"]),
    ("info", ["--object", "secret,id=s,data=x", "--image-opts", "driver=qcow2,file.filename=d"]),
    ("check", ["-f", "qcow2", "d.qcow2"]),
    ("check", ["-r", "leaks", "--output", "json", "-T", "writeback", "d.qcow2", "-q"]),
    ("map", ["-f", "qcow2", "--start-offset=1M", "--max-length", "4k", "d.qcow2"]),
    ("map", ["--output=json", "d.qcow2"]),
    ("create", ["-f", "qcow2", "-o", "cluster_size=4k", "d.qcow2", "1G"]),
    ("convert", ["-O", "raw", "-c", "s.qcow2", "d.raw"]),
])
def test_plain_command_lines_are_read_without_argparse(cmd: str, argv: list[str]) -> None:
    quick = quickparse.parse(cmd, list(argv))
    assert quick is not None, f"the quick reader declined {cmd} {argv}"
    assert vars(quick[0]) == _argparse(cmd, argv)


@pytest.mark.parametrize("cmd, argv", [
    ("info", ["--help"]), ("info", ["-h"]), ("info", ["--", "-x"]), ("info", ["--out=json"]),
    ("info", ["-Uf", "qcow2", "d"]), ("info", ["-fqcow2", "d"]), ("info", ["-f"]),
    ("info", ["-f", "-U", "d"]), ("info", ["-q", "d"]), ("info", ["-U=1", "d"]),
    ("check", ["-T", "bogus", "d"]), ("info", ["-5", "d"]), ("info", ["-", "d"]),
    ("info", ["--debug", "d"]), ("resize", ["d", "1G"]), ("snapshot", ["-l", "d"]),
])
def test_anything_else_is_left_to_argparse(cmd: str, argv: list[str]) -> None:
    assert quickparse.parse(cmd, list(argv)) is None
