"""Small qemu-img 7.2 command-line behaviours (issue 17, "Small CLI differences"), each
against qemu-img: ``create -F`` without ``-b``, ``info -q``/``map -q``, the global
``-T``/``--trace`` option, and a ``--version`` line scripts can parse."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from .conftest import make_raw, needs_qemu, qemu, run_module

pytestmark = [pytest.mark.qemu, needs_qemu]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-F", "qcow2"], ["-f", "qcow2", "-o", "backing_fmt=qcow2"],
    ["-f", "qcow2", "-F", "raw", "-u"], ["-f", "qcow2", "-q", "-F", "qcow2"],
    ["-f", "raw", "-F", "raw"], ["-f", "vmdk", "-F", "qcow2"], ["-f", "vmdk", "-F", "vmdk"],
])
def test_create_backing_format_without_backing_file(di, twin_dirs: tuple[Path, Path],
                                                    args: list[str]) -> None:
    qd, dd = twin_dirs
    ref = qemu("create", *args, "x.img", "1M", cwd=qd)
    mine = di("create", *args, "x.img", "1M", cwd=dd)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert (qd / "x.img").exists() == (dd / "x.img").exists() == (ref.rc == 0)


def test_refused_create_leaves_an_existing_file_alone(di, tmp_path: Path) -> None:
    # qemu-img deletes the file it was asked to overwrite; diskimg refuses before it
    # touches anything (a refusal changes nothing)
    old = make_raw(tmp_path / "x.img", 65536, [(0, b"keep me" * 100)])
    before = sha(old)
    mine = di("create", "-q", "-f", "qcow2", "-F", "qcow2", "x.img", "1M", cwd=tmp_path)
    assert mine.rc == 1
    assert mine.err == "diskimg: x.img: Backing format cannot be used without backing file\n"
    assert sha(old) == before


@pytest.mark.parametrize("cmd", ["info", "map"])
def test_quiet_is_not_an_option_of_info_or_map(di, sample: Path, cmd: str) -> None:
    mine = di(cmd, "-q", "s.raw", cwd=sample.parent)
    ref = qemu(cmd, "-q", "s.raw", cwd=sample.parent)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err) == \
        (1, "", "diskimg: unrecognized option '-q'\n"
                "Try 'diskimg --help' for more information\n")


TRACES = [["-T", "foo"], ["--trace", "foo"], ["--trace=foo"], ["-Tfoo"],
          ["-T", "foo", "--trace", "enable=bar,enable=baz"], ["-T", "qcow2_*"], ["-T", ""],
          ["-T", "enable="], ["-T", "-foo"], ["-T", "bogus=1"], ["-T", "events=nonexist"],
          ["-T", "events=ev"], ["-T", "file=/nonexistent/dir/log"], ["-T"], ["--trace"]]


@pytest.mark.parametrize("trace", TRACES)
def test_trace_option_accepted_as_qemu(di, sample: Path, trace: list[str]) -> None:
    d = sample.parent
    (d / "ev").write_text("a\n\n# c\n-b\nqcow2_*\n")
    before = sha(sample)
    mine = di(*trace, "info", "s.raw", cwd=d)
    ref = qemu(*trace, "info", "s.raw", cwd=d)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert sha(sample) == before


def test_trace_file_is_created_empty_as_qemu_does(di, sample: Path) -> None:
    d = sample.parent
    for who, log in (("mine", d / "mine.log"), ("ref", d / "ref.log")):
        log.write_text("old log\n")
        argv = ["--trace", f"file={log}", "info", "s.raw"]
        res = di(*argv, cwd=d) if who == "mine" else qemu(*argv, cwd=d)
        assert res.rc == 0 and res.out.startswith("image: s.raw\n")
    assert (d / "mine.log").read_bytes() == (d / "ref.log").read_bytes() == b""


def test_version_line_parses_as_qemu_img(tmp_path: Path) -> None:
    ref = qemu("--version", cwd=tmp_path)
    for opt in ("--version", "-V"):
        mine = run_module(opt, cwd=tmp_path)
        assert mine.rc == 0 and mine.err == ""
        first = mine.out.splitlines()[0]
        # OpenStack cinder's and nova's test, and `grep | cut -d ' ' -f 3`
        m = re.match(r"qemu-img version ([0-9\.]*)", mine.out)
        assert m is not None and m.group(1) == "7.2.0"
        assert first.split(" ")[2] == "7.2.0"
        assert "diskimg" in first
        # the same major.minor as the qemu-img diskimg is checked against
        ref_m = re.match(r"diskimg version (\d+\.\d+)", ref.out)
        assert ref_m is not None and m.group(1).startswith(ref_m.group(1) + ".")


@pytest.mark.parametrize("argv", [
    ["check", "-T", "foo", "q.qcow2"], ["check", "-q", "-T", "off", "q.qcow2"],
    ["compare", "-T", "bad", "s.raw", "s.raw"], ["compare", "-T", "none", "s.raw", "s.raw"],
    ["convert", "-T", "writeback", "-O", "raw", "s.raw", "c.raw"],
    ["rebase", "-T", "x", "-u", "-b", "", "q.qcow2"],
    ["info", "-T", "none", "s.raw"], ["map", "-T", "none", "s.raw"],
    ["create", "-T", "none", "n.raw", "1M"], ["snapshot", "-T", "none", "-l", "q.qcow2"],
])
def test_source_cache_option_where_qemu_takes_it(di, sample: Path, argv: list[str]) -> None:
    """``-T`` after the command is qemu-img's source cache mode (check, compare, convert,
    rebase: checked, then nothing to do for diskimg); the other commands refuse it."""
    d = sample.parent
    qemu("create", "-q", "-f", "qcow2", "q.qcow2", "1M", cwd=d)
    before = sha(d / "q.qcow2"), sha(sample)
    mine = di(*argv, cwd=d)
    ref = qemu(*argv, cwd=d)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert (sha(d / "q.qcow2"), sha(sample)) == before
