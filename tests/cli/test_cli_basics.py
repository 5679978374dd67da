"""CLI behaviour that needs no qemu-img: help, subprocess entry point, error handling,
progress format, option and secret parsing."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from diskimg import operations as conv
from diskimg import options as opts
from diskimg.cli import commands
from diskimg.cli.progress import Progress
from diskimg.errors import UsageError
from diskimg.secrets import parse_objects

from .conftest import SAMPLE_WRITES, make_raw, run_module


def test_module_entry_point_errors_are_one_line(tmp_path: Path) -> None:
    r = run_module("info", "nonexist", cwd=tmp_path)
    assert r.rc == 1
    assert r.err == ("diskimg: Could not open 'nonexist': Could not open 'nonexist': "
                     "No such file or directory\n")
    assert r.out == ""


def test_module_entry_point_info_json(sample: Path) -> None:
    r = run_module("info", "--output=json", "s.raw", cwd=sample.parent)
    assert r.rc == 0
    d = json.loads(r.out)
    assert d["virtual-size"] == 6 << 20 and d["format"] == "raw" and d["filename"] == "s.raw"
    assert r.out.startswith('{\n    "virtual-size"')


def test_debug_env_reraises(tmp_path: Path) -> None:
    r = run_module("info", "nonexist", cwd=tmp_path, env={"DISKIMG_DEBUG": "1"})
    assert r.rc == 1 and "Traceback" in r.err


def test_help_lists_commands_with_example(di, tmp_path: Path) -> None:
    r = di("--help", cwd=tmp_path)
    assert r.rc == 0
    for cmd in ("info", "create", "convert", "check", "compare", "map", "dd", "resize"):
        assert re.search(rf"^  {cmd} ", r.out, re.M), cmd
    assert "Example:" in r.out


@pytest.mark.parametrize("cmd", ["info", "create", "convert", "check", "compare", "map",
                                 "dd", "resize"])
def test_command_help_has_usage_and_example(di, tmp_path: Path, cmd: str) -> None:
    r = di(cmd, "--help", cwd=tmp_path)
    assert r.rc == 0
    assert r.out.startswith(f"usage: diskimg {cmd} ")
    assert f"example:\n  diskimg {cmd} " in r.out


def test_unexpected_exception_is_reported_without_traceback(di, sample: Path,
                                                            monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(commands.api, "open", boom)
    r = di("info", "s.raw", cwd=sample.parent)
    assert r.rc == 1
    assert r.err_lines() == ["diskimg: internal error: RuntimeError: kaboom"]


def test_convert_progress_line_format(sample: Path) -> None:
    p = run_module("convert", "-p", "-O", "raw", "s.raw", "o.raw", cwd=sample.parent)
    assert p.rc == 0
    assert re.fullmatch(r"(    \(\d{1,3}\.\d\d/100%\)\r)+\n", p.out), repr(p.out)
    assert p.out.startswith("    (0.00/100%)\r")
    assert p.out.endswith("    (100.00/100%)\r\n")
    assert (sample.parent / "o.raw").read_bytes() == sample.read_bytes()


def test_compare_progress_then_message(di, sample: Path) -> None:
    d = sample.parent
    make_raw(d / "b.raw", 6 << 20, SAMPLE_WRITES)
    r = di("compare", "-p", "s.raw", "b.raw", cwd=d)
    assert r.rc == 0
    assert re.fullmatch(r"(    \(\d+\.\d\d/100%\)\r)+Images are identical\.\n\n", r.out)


def test_progress_throttles_and_finishes() -> None:
    buf = io.StringIO()
    p = Progress(True, 1.0, out=buf)
    for i in range(0, 1001):
        p(i / 10)
    p.finish()
    lines = buf.getvalue().split("\r")
    assert lines[0] == "    (0.00/100%)"
    assert len(lines) < 110  # roughly one line per percent, not one per call
    assert buf.getvalue().endswith("    (100.00/100%)\r    (100.00/100%)\r\n")


def test_quiet_progress_prints_nothing() -> None:
    buf = io.StringIO()
    p = Progress(False, out=buf)
    p(50.0)
    p.finish()
    assert buf.getvalue() == ""


# --- options / secrets / image-opts -----------------------------------------------


def test_option_list_comma_escaping() -> None:
    assert opts.parse_list("a=1,b=x,,y,c") == [("a", "1"), ("b", "x,y"), ("c", "on")]
    assert opts.parse_list("nocow") == [("cow", "off")]
    with pytest.raises(UsageError, match="Invalid option list: a=1,"):
        opts.parse_list("a=1,")


def test_formatting_line_order_and_defaults() -> None:
    line = opts.formatting_line("x.qcow2", "qcow2", {"size": "1048576", "compat": "v3",
                                                     "backing_file": "b", "backing_fmt": "raw"})
    assert line == ("Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off "
                    "compression_type=zlib size=1048576 compat=v3 backing_file=b "
                    "backing_fmt=raw lazy_refcounts=off refcount_bits=16")


def test_secrets_data_file_and_escaping(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"from-file")
    s = parse_objects(["secret,id=a,data=p,,w", f"secret,id=b,file={tmp_path / 'pw'}",
                       "secret,id=c,data=aGk=,format=base64"])
    assert s == {"a": b"p,w", "b": b"from-file", "c": b"hi"}
    with pytest.raises(UsageError, match="duplicate property 'a'"):
        parse_objects(["secret,id=a,data=x", "secret,id=a,data=y"])
    with pytest.raises(UsageError, match="Parameter 'id' is missing"):
        parse_objects(["secret,data=x"])
    with pytest.raises(UsageError, match="Either 'file' or 'data' must be provided"):
        parse_objects(["secret,id=x"])


def test_image_opts_parsing() -> None:
    path, fmt, o = commands.parse_image_opts(
        "driver=qcow2,file.filename=/a,,b.img,encrypt.key-secret=sec0")
    assert (path, fmt, o) == ("/a,b.img", "qcow2", {"encrypt.key-secret": "sec0"})


def test_info_image_opts(di, sample: Path) -> None:
    r = di("info", "--output=json", "--image-opts", "driver=raw,file.filename=s.raw",
           cwd=sample.parent)
    assert r.rc == 0 and r.json["format"] == "raw"
    r = di("info", "--image-opts", "driver=qcow2", cwd=sample.parent)
    assert r.rc == 1
    assert r.err_lines() == ["diskimg: Could not open 'driver=qcow2': A block device must be "
                             'specified for "file"']


def test_object_errors_exit_1(di, sample: Path) -> None:
    r = di("info", "--object", "secret,id=s", "s.raw", cwd=sample.parent)
    assert (r.rc, r.err_lines()) == (1, ["diskimg: Either 'file' or 'data' must be provided"])


# --- library helpers ----------------------------------------------------------------


def test_sparse_runs_qemu_rules() -> None:
    buf = bytearray(64 * 1024)
    buf[0:512] = b"\1" * 512          # data
    buf[1024:1536] = b"\1" * 512      # after a 512-byte gap: merged into data (gap < 4k)
    buf[32768:33000] = b"\1" * 232
    runs = conv.sparse_runs(buf, len(buf), 4096, 0)
    assert runs[0] == (0, 4096, True)  # data rounded up to the 4 KiB alignment
    assert runs[1] == (4096, 32768 - 4096, False)
    assert runs[2] == (32768, 4096, True)
    assert runs[3] == (36864, 65536 - 36864, False)
    # a leading zero run is a hole whatever its length
    buf2 = bytearray(8192)
    buf2[4096:] = b"\1" * 4096
    assert conv.sparse_runs(buf2, 8192, 65536, 0) == [(0, 4096, False), (4096, 4096, True)]


def test_compare_library_returns_offset(tmp_path: Path) -> None:
    a = make_raw(tmp_path / "a.raw", 1 << 20, [(4096, b"x")])
    b = make_raw(tmp_path / "b.raw", 1 << 20, [(4096, b"x"), (700_000, b"y")])
    same, off, msg = conv.compare(a, b)
    assert (same, off, msg) == (False, 700_000 // 512 * 512,
                                f"Content mismatch at offset {700_000 // 512 * 512}!")
    assert conv.compare(a, a) == (True, None, "Images are identical.")


def test_qemu_progress_single_precision_steps() -> None:
    # compare and rebase add a share per chunk in C float arithmetic; three thirds end
    # exactly at 100 (capped), and a step below min_skip prints nothing
    from diskimg.cli.progress import QemuProgress, f32

    buf = io.StringIO()
    p = QemuProgress(True, 2.0, out=buf)
    p.report(0, 100)
    p.report(1.5, 100)
    for _ in range(3):
        p.report(f32(f32(1 / 3) * 100), 100)
    p.end()
    assert buf.getvalue() == ("    (0.00/100%)\r    (34.83/100%)\r    (68.17/100%)\r"
                              "    (100.00/100%)\r\n")


def test_closed_stdout_pipe_stops_quietly(tmp_path: Path) -> None:
    """`diskimg map ... | head -1`: no "Broken pipe" error, the shell's SIGPIPE status."""
    import subprocess
    import sys

    import diskimg

    img = tmp_path / "many.qcow2"
    diskimg.create(img, "qcow2", 64 << 20, options={"cluster_size": 4096})
    with diskimg.open(img, "r+") as d:
        for k in range(0, 64 << 20, 8192):  # thousands of map lines, more than a pipe buffer
            d.write(k, b"x")
    p = subprocess.Popen([sys.executable, "-m", "diskimg", "map", "--output=json", str(img)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline().startswith(b"[{")
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141
    assert err == b""
