"""The diskimg CLI against qemu-img 7.2 on the same inputs: exit codes, stderr lines,
parsed JSON and human text (program name replaced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import make_raw, needs_qcow2, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]


# --- info / map / check on raw --------------------------------------------------------


@pytest.mark.parametrize("fmt_args", [[], ["-f", "raw"], ["-U"]])
def test_info_raw_matches_qemu(di, sample: Path, fmt_args: list[str]) -> None:
    d = sample.parent
    for extra in ([], ["--output=json"]):
        mine = di("info", *fmt_args, *extra, "s.raw", cwd=d)
        ref = qemu("info", *fmt_args, *extra, "s.raw", cwd=d)
        assert mine.rc == ref.rc == 0
        if extra:
            assert mine.json == ref.json
        else:
            assert mine.out == ref.out


def test_info_backing_chain_raw_is_a_list(di, sample: Path) -> None:
    mine = di("info", "--backing-chain", "--output=json", "s.raw", cwd=sample.parent)
    ref = qemu("info", "--backing-chain", "--output=json", "s.raw", cwd=sample.parent)
    assert isinstance(mine.json, list)
    assert mine.json == ref.json


@pytest.mark.parametrize("extra", [[], ["--start-offset=1M", "--max-length=64k"],
                                   ["--start-offset=7M"], ["--max-length=3M"]])
def test_map_raw_matches_qemu(di, sample: Path, extra: list[str]) -> None:
    d = sample.parent
    for out in ("human", "json"):
        mine = di("map", f"--output={out}", *extra, "s.raw", cwd=d)
        ref = qemu("map", f"--output={out}", *extra, "s.raw", cwd=d)
        assert mine.rc == ref.rc == 0
        if out == "json":
            assert mine.json == ref.json
            # qemu's layout: one entry per line inside the array
            assert mine.out.count("\n") == ref.out.count("\n")
        else:
            assert mine.out == ref.out


@pytest.mark.parametrize("extra", [[], ["--output=json"], ["-r", "leaks", "-f", "raw"]])
def test_check_raw_not_supported(di, sample: Path, extra: list[str]) -> None:
    mine = di("check", *extra, "s.raw", cwd=sample.parent)
    ref = qemu("check", *extra, "s.raw", cwd=sample.parent)
    assert mine.rc == ref.rc == 63
    assert mine.err_lines()[-1] == ref.err_lines()[-1] == \
        "diskimg: This image format does not support checks"


# --- errors ---------------------------------------------------------------------------

ERROR_CASES = [
    ["info", "nonexist"],
    ["info"],
    ["info", "s.raw", "extra"],
    ["info", "--bogus", "s.raw"],
    ["info", "-f", "qcow2", "s.raw"],
    ["info", "--output=xml", "s.raw"],
    ["map", "--start-offset=1x", "s.raw"],
    ["map", "--max-length=-1", "s.raw"],
    ["check", "-r", "foo", "s.raw"],
    ["check", "nonexist"],
    ["compare", "s.raw"],
    ["convert", "s.raw"],
    ["convert", "-O", "foo", "s.raw", "o.raw"],
    ["convert", "-S", "100", "s.raw", "o.raw"],
    ["convert", "-S", "1x", "s.raw", "o.raw"],
    ["convert", "-m", "17", "s.raw", "o.raw"],
    ["convert", "-O", "raw", "-B", "b.qcow2", "s.raw", "o.raw"],
    ["convert", "-O", "qcow2", "-B", "b.qcow2", "s.raw", "o.qcow2"],
    ["convert", "-c", "-O", "raw", "s.raw", "o.raw"],
    ["convert", "-O", "raw", "-l", "snap1", "s.raw", "o.raw"],
    ["convert", "-n", "s.raw", "missing.raw"],
    ["convert", "-O", "raw", "-o", "foo=bar", "s.raw", "o.raw"],
    ["resize", "s.raw"],
    ["resize", "nonexist", "1M"],
    ["resize", "-f", "raw", "s.raw", "1M"],
    ["resize", "-f", "raw", "s.raw", "+1x"],
    ["resize", "-f", "raw", "--preallocation=bogus", "s.raw", "8M"],
    ["resize", "-f", "raw", "--preallocation=metadata", "s.raw", "8M"],
    ["resize", "-f", "raw", "s.raw", "--", "-100M"],
    ["dd", "if=s.raw"],
    ["dd", "bs=0", "if=s.raw", "of=o.raw"],
    ["dd", "bs=1x", "if=s.raw", "of=o.raw"],
    ["dd", "foo=1", "if=s.raw", "of=o.raw"],
    ["bogus"],
    [],
]


@pytest.mark.parametrize("args", ERROR_CASES, ids=lambda a: " ".join(a) or "noargs")
def test_error_text_and_exit_code(di, sample: Path, args: list[str]) -> None:
    d = sample.parent
    ref = qemu(*args, cwd=d)
    mine = di(*args, cwd=d)
    assert mine.rc == ref.rc
    assert ref.rc != 0
    assert mine.err_lines() == ref.err_lines()
    assert "Traceback" not in mine.err


# --- create ---------------------------------------------------------------------------

CREATE_CASES = [
    ["-f", "raw", "a.img", "1M"],
    ["a.img", "1.5k"],
    ["-f", "raw", "-o", "preallocation=falloc", "a.img", "1M"],
    ["-f", "raw", "-o", "nocow=on,extent_size_hint=0,preallocation=full", "a.img", "1k"],
    ["-f", "raw", "-o", "size=2M", "a.img"],
    ["-f", "raw", "a.img", "0x10"],
    ["-q", "-f", "raw", "a.img", "1M"],
    ["-f", "qcow2", "a.img", "64M"],
    ["-f", "qcow2", "-o", "compat=1.1,refcount_bits=4,extended_l2=on", "a.img", "1G"],
    ["-f", "qcow2", "-o", "preallocation=metadata,compression_type=zstd", "a.img", "1M"],
    ["-f", "qcow2", "-u", "-b", "nonexist", "-F", "raw", "a.img", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=3k", "a.img", "1M"],
]
CREATE_ERRORS = [
    ["-f", "raw", "a.img", "1e3"],
    ["-f", "raw", "a.img", "1KiB"],
    ["-f", "raw", "a.img", "--", "-1"],
    ["-f", "raw", "a.img", "1.5"],
    ["-f", "raw", "a.img", "16E"],
    ["-f", "raw", "a.img"],
    ["-f", "raw"],
    ["-f", "raw", "a.img", "1M", "extra"],
    ["-f", "foo", "a.img", "1M"],
    ["-f", "raw", "-o", "compat=v3", "a.img", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "a.img", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=x", "a.img", "1M"],
    ["-f", "raw", "-o", "preallocation=metadata", "a.img", "1M"],
    ["-f", "raw", "-o", "preallocation=full,,x", "a.img", "1M"],
    ["-f", "raw", "-o", "size=1M,", "a.img"],
    ["-f", "raw", "-o", "size=2M", "a.img", "1M"],
    ["-f", "raw", "-o", "nocow", "a.img", "1M"],
    ["-f", "raw", "-o", "size", "a.img"],
    ["-f", "raw", "-b", "x", "-F", "raw", "a.img", "1M"],
    ["-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "a.img"],
    ["-f", "raw", "/nonexistent-dir/a.img", "1M"],
]


def _needs_qcow2_impl(args: list[str]) -> None:
    if "qcow2" in args and "a.img" in args:
        pytest.importorskip("diskimg.qcow2.create")


@pytest.mark.parametrize("args", CREATE_CASES, ids=" ".join)
def test_create_formatting_line(di, twin_dirs: tuple[Path, Path], args: list[str]) -> None:
    _needs_qcow2_impl(args)
    qd, dd = twin_dirs
    ref = qemu("create", *args, cwd=qd)
    mine = di("create", *args, cwd=dd)
    assert (mine.rc, mine.out, mine.err_lines()) == (ref.rc, ref.out, ref.err_lines())
    if ref.rc == 0:
        q = qemu("info", "--output=json", "a.img", cwd=qd).json
        m = qemu("info", "--output=json", "a.img", cwd=dd).json
        assert m["virtual-size"] == q["virtual-size"]
        assert m["format"] == q["format"]


@pytest.mark.parametrize("args", CREATE_ERRORS, ids=" ".join)
def test_create_errors(di, twin_dirs: tuple[Path, Path], args: list[str]) -> None:
    qd, dd = twin_dirs
    ref = qemu("create", *args, cwd=qd)
    mine = di("create", *args, cwd=dd)
    assert ref.rc == 1
    assert (mine.rc, mine.out, mine.err_lines()) == (ref.rc, ref.out, ref.err_lines())


@pytest.mark.parametrize("args", [["-f", "qcow2", "-o", "help"], ["-f", "raw", "-o", "help"],
                                  ["-f", "qcow2", "-o", "help", "x.qcow2"],
                                  ["-f", "raw", "-o", "?", "x.raw"], ["-o", "help"]])
def test_create_o_help(di, twin_dirs: tuple[Path, Path], args: list[str]) -> None:
    ref = qemu("create", *args, cwd=twin_dirs[0])
    mine = di("create", *args, cwd=twin_dirs[1])
    assert mine.rc == ref.rc == 0
    assert mine.out == ref.out
    assert not list(twin_dirs[1].iterdir()), "-o help must not create a file"


def test_convert_o_help(di, tmp_path: Path) -> None:
    ref = qemu("convert", "-O", "qcow2", "-o", "help", cwd=tmp_path)
    mine = di("convert", "-O", "qcow2", "-o", "help", cwd=tmp_path)
    assert mine.out == ref.out and mine.rc == 0


# --- compare --------------------------------------------------------------------------


def _compare_set(d: Path) -> None:
    from .conftest import SAMPLE_WRITES

    make_raw(d / "a.raw", 6 << 20, SAMPLE_WRITES)
    make_raw(d / "same.raw", 6 << 20, SAMPLE_WRITES)
    make_raw(d / "diff.raw", 6 << 20, [*SAMPLE_WRITES, (2 << 20, b"\x09" * 100)])
    make_raw(d / "longer0.raw", 8 << 20, SAMPLE_WRITES)
    make_raw(d / "longer1.raw", 8 << 20, [*SAMPLE_WRITES, (7 << 20, b"x")])
    make_raw(d / "inner.raw", 6 << 20, [(1 << 20, b"\xab" * 65536), (3 << 20, b"\x01" * 4096),
                                       (5 << 20, b"\x02" * 512), (5 << 20 | 700, b"\x07")])


@pytest.mark.parametrize("args", [
    ["a.raw", "same.raw"], ["-s", "a.raw", "same.raw"], ["a.raw", "diff.raw"],
    ["diff.raw", "a.raw"], ["a.raw", "longer0.raw"], ["longer0.raw", "a.raw"],
    ["-s", "a.raw", "longer0.raw"], ["a.raw", "longer1.raw"], ["a.raw", "inner.raw"],
    ["-q", "a.raw", "diff.raw"], ["-f", "raw", "-F", "raw", "a.raw", "diff.raw"],
    ["a.raw", "nonexist"], ["-f", "qcow2", "a.raw", "same.raw"],
], ids=" ".join)
def test_compare_matches_qemu(di, tmp_path: Path, args: list[str]) -> None:
    _compare_set(tmp_path)
    ref = qemu("compare", *args, cwd=tmp_path)
    mine = di("compare", *args, cwd=tmp_path)
    assert (mine.rc, mine.out, mine.err_lines()) == (ref.rc, ref.out, ref.err_lines())


# --- convert / dd / resize ------------------------------------------------------------


def test_convert_raw_keeps_holes(di, sample: Path) -> None:
    d = sample.parent
    mine = di("convert", "-O", "raw", "s.raw", "mine.raw", cwd=d)
    ref = qemu("convert", "-O", "raw", "s.raw", "ref.raw", cwd=d)
    assert mine.rc == ref.rc == 0 and mine.out == mine.err == ""
    assert (d / "mine.raw").read_bytes() == sample.read_bytes()
    blocks = (d / "mine.raw").stat().st_blocks * 512
    assert blocks <= 64 * 1024 + 4096 + 512 + 3 * 4096  # the data, not 6 MiB
    # qemu allocates its first 4 KiB block on create; allow that difference only
    assert blocks <= (d / "ref.raw").stat().st_blocks * 512
    assert qemu("compare", "-f", "raw", "-F", "raw", "mine.raw", "ref.raw", cwd=d).rc == 0


def test_convert_sparse_size_zero_fully_allocates(di, sample: Path) -> None:
    d = sample.parent
    assert di("convert", "-S", "0", "s.raw", "full.raw", cwd=d).rc == 0
    assert (d / "full.raw").stat().st_blocks * 512 >= 6 << 20
    assert (d / "full.raw").read_bytes() == sample.read_bytes()


def test_convert_detects_zero_data(di, tmp_path: Path) -> None:
    # allocated zeros (not holes) in the source become holes in the target
    with open(tmp_path / "z.raw", "wb") as f:
        f.write(b"\0" * (2 << 20) + b"\x05" * 4096 + b"\0" * (2 << 20))
    assert di("convert", "z.raw", "o.raw", cwd=tmp_path).rc == 0
    assert (tmp_path / "o.raw").stat().st_blocks * 512 <= 8192
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "z.raw").read_bytes()


def test_convert_concatenates_sources(di, sample: Path) -> None:
    d = sample.parent
    make_raw(d / "t.raw", 1 << 20, [(512, b"tail")])
    assert di("convert", "-O", "raw", "s.raw", "t.raw", "cat.raw", cwd=d).rc == 0
    assert (d / "cat.raw").read_bytes() == sample.read_bytes() + (d / "t.raw").read_bytes()


def test_convert_n_writes_into_existing(di, sample: Path) -> None:
    d = sample.parent
    make_raw(d / "big.raw", 8 << 20, [(0, b"\xff" * 8192)])
    make_raw(d / "small.raw", 1 << 20, [])
    r = di("convert", "-n", "-O", "raw", "s.raw", "big.raw", cwd=d)
    assert r.rc == 0
    got = (d / "big.raw").read_bytes()
    assert got[: 6 << 20] == sample.read_bytes()  # old 0xff bytes overwritten by zeros
    assert len(got) == 8 << 20
    ref = qemu("convert", "-n", "-O", "raw", "s.raw", "small.raw", cwd=d)
    mine = di("convert", "-n", "-O", "raw", "s.raw", "small.raw", cwd=d)
    assert (mine.rc, mine.err_lines()) == (ref.rc, ref.err_lines())


@pytest.mark.parametrize("ops", [[], ["bs=64k", "count=2", "skip=16"], ["bs=512", "skip=1",
                                 "count=2"], ["bs=1M", "count=2", "skip=1"],
                                 ["skip=100", "bs=64k"]], ids=" ".join)
def test_dd_matches_qemu(di, sample: Path, ops: list[str]) -> None:
    d = sample.parent
    ref = qemu("dd", "-f", "raw", "-O", "raw", *ops, "if=s.raw", "of=ref.raw", cwd=d)
    mine = di("dd", "-f", "raw", "-O", "raw", *ops, "if=s.raw", "of=mine.raw", cwd=d)
    assert (mine.rc, mine.err_lines()) == (ref.rc, [x.replace("ref.raw", "mine.raw")
                                                   for x in ref.err_lines()])
    assert (d / "mine.raw").read_bytes() == (d / "ref.raw").read_bytes()


@pytest.mark.parametrize("steps", [
    [["8M"], ["+1M"], ["--shrink", "--", "-1M"], ["--shrink", "1000"]],
    [["-q", "12M"], ["--preallocation=full", "13M"]],
], ids=["grow-shrink", "quiet-prealloc"])
def test_resize_raw_matches_qemu(di, twin_dirs: tuple[Path, Path],
                                 steps: list[list[str]]) -> None:
    qd, dd = twin_dirs
    for base in twin_dirs:
        make_raw(base / "r.raw", 4 << 20, [(0, b"head")])
    for step in steps:
        ref = qemu("resize", "-f", "raw", *step[:-1], "r.raw", step[-1], cwd=qd) \
            if "--" not in step else qemu("resize", "-f", "raw", *step[:-2], "r.raw", "--",
                                          step[-1], cwd=qd)
        args = ["resize", "-f", "raw", *step[:-1], "r.raw", step[-1]] if "--" not in step \
            else ["resize", "-f", "raw", *step[:-2], "r.raw", "--", step[-1]]
        mine = di(*args, cwd=dd)
        assert (mine.rc, mine.out, mine.err_lines()) == (ref.rc, ref.out, ref.err_lines())
        assert (dd / "r.raw").stat().st_size == (qd / "r.raw").stat().st_size


def test_resize_probed_raw_warns_like_qemu(di, twin_dirs: tuple[Path, Path]) -> None:
    qd, dd = twin_dirs
    for base in twin_dirs:
        make_raw(base / "r.raw", 1 << 20, [])
    ref = qemu("resize", "r.raw", "2M", cwd=qd)
    mine = di("resize", "r.raw", "2M", cwd=dd)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)


# --- qcow2 ----------------------------------------------------------------------------


@pytest.fixture
def qchain(tmp_path: Path) -> Path:
    """base.qcow2 (data at 0) <- top.qcow2 (data at 64k, zeros at 2M), made by qemu."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    QEMU.img("create", "-f", "qcow2", "base.qcow2", "4M", cwd=tmp_path)
    QEMU.io("base.qcow2", "write -P 0xcd 0 128k", fmt=None, cwd=tmp_path)
    QEMU.img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             cwd=tmp_path)
    QEMU.io("top.qcow2", "write -P 0xee 64k 64k", "write -z 2M 64k", fmt=None, cwd=tmp_path)
    return tmp_path


@needs_qcow2
@pytest.mark.parametrize("args", [
    ["info", "top.qcow2"], ["info", "--backing-chain", "top.qcow2"],
    ["info", "--output=json", "top.qcow2"],
    ["info", "--output=json", "--backing-chain", "top.qcow2"],
    ["map", "top.qcow2"], ["map", "--output=json", "top.qcow2"],
    ["map", "--output=json", "base.qcow2"],
    ["check", "top.qcow2"], ["check", "--output=json", "top.qcow2"],
    ["compare", "top.qcow2", "base.qcow2"], ["compare", "base.qcow2", "base.qcow2"],
], ids=" ".join)
def test_qcow2_output_matches_qemu(di, qchain: Path, args: list[str]) -> None:
    ref = qemu(*args, cwd=qchain)
    mine = di(*args, cwd=qchain)
    assert mine.rc == ref.rc
    if "--output=json" in args:
        got = mine.json
        if args[0] == "check":
            assert got.pop("findings") == []  # diskimg's addition to qemu-img's keys
        assert got == ref.json
    else:
        assert mine.out == ref.out
    assert mine.err_lines() == ref.err_lines()


@needs_qcow2
def test_convert_qcow2_with_backing_copies_top_only(di, qchain: Path) -> None:
    mine = di("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2",
              "mine.qcow2", cwd=qchain)
    assert mine.rc == 0
    qemu("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2",
         "ref.qcow2", cwd=qchain)
    m = qemu("map", "--output=json", "mine.qcow2", cwd=qchain).json
    r = qemu("map", "--output=json", "ref.qcow2", cwd=qchain).json
    assert m == r
    assert qemu("compare", "top.qcow2", "mine.qcow2", cwd=qchain).rc == 0
    assert qemu("check", "mine.qcow2", cwd=qchain).rc == 0


@needs_qcow2
def test_convert_raw_to_qcow2_leaves_clusters_unallocated(di, sample: Path) -> None:
    d = sample.parent
    assert di("convert", "-O", "qcow2", "s.raw", "o.qcow2", cwd=d).rc == 0
    assert qemu("convert", "-O", "qcow2", "s.raw", "ref.qcow2", cwd=d).rc == 0
    assert qemu("map", "--output=json", "o.qcow2", cwd=d).json == \
        qemu("map", "--output=json", "ref.qcow2", cwd=d).json
    assert qemu("compare", "s.raw", "o.qcow2", cwd=d).rc == 0
    assert qemu("check", "o.qcow2", cwd=d).rc == 0


@needs_qcow2
def test_qcow2_create_matches_qemu_bytes(di, twin_dirs: tuple[Path, Path]) -> None:
    qd, dd = twin_dirs
    args = ["create", "-f", "qcow2", "-o", "cluster_size=4k", "a.qcow2", "16M"]
    assert qemu(*args, cwd=qd).out == di(*args, cwd=dd).out
    assert (qd / "a.qcow2").read_bytes() == (dd / "a.qcow2").read_bytes()


def _leaky_qcow2(path: Path) -> None:
    """A qemu-made qcow2 with one leaked cluster (refcount 1, unreferenced)."""
    import struct
    import subprocess

    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "1M"], check=True,
                   capture_output=True)
    with open(path, "r+b") as f:
        hdr = f.read(104)
        (rt_off,) = struct.unpack(">Q", hdr[48:56])
        f.seek(rt_off)
        (rb,) = struct.unpack(">Q", f.read(8))
        f.seek(rb + 2 * 6)
        f.write(struct.pack(">H", 1))
        f.truncate(7 * 65536)


@needs_qcow2
@pytest.mark.parametrize("args", [[], ["--output=json"], ["-r", "leaks"],
                                  ["-r", "all", "--output=json"]], ids=" ".join)
def test_qcow2_check_leak_matches_qemu(di, twin_dirs: tuple[Path, Path],
                                       args: list[str]) -> None:
    qd, dd = twin_dirs
    _leaky_qcow2(qd / "l.qcow2")
    _leaky_qcow2(dd / "l.qcow2")
    ref = qemu("check", *args, "l.qcow2", cwd=qd)
    mine = di("check", *args, "l.qcow2", cwd=dd)
    assert mine.rc == ref.rc == (0 if "-r" in args else 3)
    if "--output=json" in args:
        ours, theirs = json.loads(mine.out), json.loads(ref.out)
        findings = ours.pop("findings")  # diskimg's addition, after qemu-img's keys
        assert [f["kind"] for f in findings] == ["leak"]
        assert findings[0]["repaired"] is ("-r" in args)
        assert list(ours.items()) == list(theirs.items())  # qemu's QDict key order
    else:
        assert mine.out == ref.out
    assert mine.err_lines() == ref.err_lines()


@needs_qcow2
def test_encrypted_needs_key_except_info(di, tmp_path: Path) -> None:
    r = qemu("create", "-f", "qcow2", "--object", "secret,id=sec0,data=pw", "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", "e.qcow2",
             "1M", cwd=tmp_path)
    assert r.rc == 0
    info = di("info", "--output=json", "e.qcow2", cwd=tmp_path)
    assert info.rc == 0 and info.json["encrypted"] is True
    for cmd in (["map"], ["check"], ["convert", "-O", "raw"]):
        args = [*cmd, "e.qcow2"] + (["x.raw"] if cmd[0] == "convert" else [])
        ref = qemu(*args, cwd=tmp_path)
        mine = di(*args, cwd=tmp_path)
        assert (mine.rc, mine.err_lines()) == (ref.rc, ref.err_lines()) != (0, [])
    opts = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0"
    mine = di("map", "--image-opts", opts, cwd=tmp_path)
    assert mine.err_lines() == [f"diskimg: Could not open '{opts}': No secret with id 'sec0'"]
    args = ["map", "--output=json", "--object", "secret,id=sec0,data=pw", "--image-opts", opts]
    assert di(*args, cwd=tmp_path).json == qemu(*args, cwd=tmp_path).json
