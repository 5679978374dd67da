"""convert's qemu-img 7.2 options against qemu-img: ``-r RATE`` (and commit's),
``--target-is-zero``, ``--target-image-opts`` needing ``-n``, ``--salvage`` over a corrupt
compressed cluster, and a failed convert that removes the target file it created (only
that file)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.ops.copy_options import RateLimit

from .conftest import make_raw, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

CS = 65536


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree(d: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(d.iterdir()) if p.is_file()}


def layout(p: Path) -> list[tuple[int, bool, bool, bool]]:
    """``qemu-img map`` without host offsets: (end, present, zero, data) of each run."""
    out: list[tuple[int, bool, bool, bool]] = []
    for e in QEMU.map(p):
        flags = (e["present"], e["zero"], e["data"])
        if out and out[-1][1:] == flags:
            out.pop()
        out.append((e["start"] + e["length"], *flags))
    return out


# --- -r --------------------------------------------------------------------------------


def test_rate_limit_schedule() -> None:
    """The limiter's waits, on a fake clock: the first request goes at once, each next
    one when the bytes before it fit the rate."""
    now = [0.0]
    slept: list[float] = []

    def sleep(t: float) -> None:
        slept.append(t)
        now[0] += t

    lim = RateLimit(1 << 20, clock=lambda: now[0], sleep=sleep)
    lim(2 << 20)
    now[0] += 0.5  # half a second of copying
    lim(2 << 20)  # 2 MiB were sent: due at 2 s
    lim(512 << 10)  # 4 MiB: due at 4 s
    now[0] += 10
    lim(1)  # late already: no wait
    assert slept == pytest.approx([1.5, 2.0])


@pytest.mark.parametrize("argv", [["-r", "abc"], ["-r", "-1"], ["-r", "1x"]])
@pytest.mark.parametrize("cmd", ["convert", "commit"])
def test_bad_rate_refused_as_qemu(di, tmp_path: Path, argv: list[str], cmd: str) -> None:
    make_raw(tmp_path / "a.raw", CS, [(0, b"\x01" * 512)])
    files = ["-O", "raw", "a.raw", "b.raw"] if cmd == "convert" else ["a.raw"]
    before = tree(tmp_path)
    mine = di(cmd, *argv, *files, cwd=tmp_path)
    ref = qemu(cmd, *argv, *files, cwd=tmp_path)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert mine.rc == 1 and tree(tmp_path) == before


def test_convert_rate_limit_slows_the_copy(di, tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    make_raw(tmp_path / "a.raw", len(data), [(0, data)])
    # (qemu-img's rate does not change what it writes)
    QEMU.img("convert", "-O", "qcow2", tmp_path / "a.raw", tmp_path / "ref.qcow2")
    t0 = time.monotonic()
    assert di("convert", "-r", "8M", "-O", "qcow2", "a.raw", "b.qcow2", cwd=tmp_path).rc == 0
    took = time.monotonic() - t0
    # at 8 MiB/s the second 2 MiB request waits until 0.25 s after the first
    assert took >= 0.25
    assert QEMU.compare(tmp_path / "b.qcow2", tmp_path / "ref.qcow2") == 0
    assert QEMU.raw_bytes(tmp_path / "b.qcow2") == data
    assert di("convert", "-r", "0", "-O", "raw", "a.raw", "c.raw", cwd=tmp_path).rc == 0
    assert (tmp_path / "c.raw").read_bytes() == data


def test_commit_rate_limit_slows_the_commit(di, tmp_path: Path) -> None:
    for name in ("mine", "ref"):
        QEMU.img("create", "-q", "-f", "qcow2", tmp_path / f"{name}-base.qcow2", "4M")
        QEMU.img("create", "-q", "-f", "qcow2", "-b", f"{name}-base.qcow2", "-F", "qcow2",
                 tmp_path / f"{name}-top.qcow2")
        QEMU.io(tmp_path / f"{name}-top.qcow2", "write -P 0x3c 0 2M", "write -z 2M 512k")
    QEMU.img("commit", tmp_path / "ref-top.qcow2")  # (its rate does not change the result)
    t0 = time.monotonic()
    res = di("commit", "-r", "8M", "mine-top.qcow2", cwd=tmp_path)
    took = time.monotonic() - t0
    assert (res.rc, res.out) == (0, "Image committed.\n")
    assert took >= 0.25  # 2 MiB committed before the second request, at 8 MiB/s
    assert QEMU.compare(tmp_path / "mine-base.qcow2", tmp_path / "ref-base.qcow2") == 0
    # where each cluster lands differs (qemu's commit job writes chunks in parallel)
    assert layout(tmp_path / "mine-base.qcow2") == layout(tmp_path / "ref-base.qcow2")
    QEMU.check_clean(tmp_path / "mine-base.qcow2")


# --- --target-is-zero, --target-image-opts --------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--target-is-zero", "-O", "raw", "a.raw", "t.raw"],
    ["--target-image-opts", "-O", "raw", "a.raw", "driver=raw,file.filename=t.raw"],
    ["--target-is-zero", "--target-image-opts", "a.raw", "driver=raw,file.filename=t.raw"],
    ["--target-is-zero", "-n", "-B", "base.raw", "-O", "qcow2", "a.raw", "t.raw"],
    ["--target-image-opts", "t.raw"],
])
def test_options_that_need_n_refused_as_qemu(di, tmp_path: Path, argv: list[str]) -> None:
    make_raw(tmp_path / "a.raw", CS, [(0, b"\x01" * 512)])
    make_raw(tmp_path / "t.raw", CS, [(512, b"\x02" * 512)])
    before = tree(tmp_path)
    mine = di("convert", *argv, cwd=tmp_path)
    ref = qemu("convert", *argv, cwd=tmp_path)
    assert (mine.out, mine.err) == (ref.out, ref.err)
    # qemu-img 7.2 exits 0 after refusing -B with --target-is-zero; a refusal is 1 here
    assert ref.rc == (0 if "-B" in argv else 1)
    assert mine.rc == 1 and tree(tmp_path) == before


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_target_is_zero_leaves_zero_runs_unwritten(di, tmp_path: Path, fmt: str) -> None:
    src = make_raw(tmp_path / "a.raw", 8 * CS, [(CS, b"\x11" * CS), (5 * CS, b"\x22" * 4096)])
    for name in ("mine", "ref"):
        QEMU.img("create", "-q", "-f", fmt, tmp_path / f"{name}.{fmt}", str(8 * CS))
        # the user's promise is false here on purpose: what is left unwritten shows
        QEMU.io(tmp_path / f"{name}.{fmt}", "write -P 0xee 0 512k", fmt=fmt)
    argv = ["-n", "--target-is-zero", "-O", fmt, "a.raw"]
    assert di("convert", *argv, f"mine.{fmt}", cwd=tmp_path).rc == 0
    assert qemu("convert", *argv, f"ref.{fmt}", cwd=tmp_path).rc == 0
    mine = QEMU.raw_bytes(tmp_path / f"mine.{fmt}", fmt)
    assert mine == QEMU.raw_bytes(tmp_path / f"ref.{fmt}", fmt)
    assert mine[CS:2 * CS] == src.read_bytes()[CS:2 * CS]
    assert mine[:CS] == b"\xee" * CS  # a zero run of the source: not written
    if fmt == "qcow2":
        assert QEMU.map(tmp_path / "mine.qcow2") == QEMU.map(tmp_path / "ref.qcow2")


# --- --salvage and failures ------------------------------------------------------------


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    """A compressed qcow2 of 8 clusters (the first a hole) whose third cluster's
    compressed data is garbage: qemu-img cannot read guest bytes [128k, 192k)."""
    data = b"".join(bytes([k % 251]) * CS for k in range(8))
    data = bytes(CS) + data[CS:]
    make_raw(tmp_path / "p.raw", len(data), [(0, data)])
    QEMU.img("convert", "-c", "-O", "qcow2", tmp_path / "p.raw", tmp_path / "cc.qcow2")
    with diskimg.open(tmp_path / "cc.qcow2") as img:
        run = img.plan(2 * CS, CS)
    assert run.kind is diskimg.plan.RunKind.COMPRESSED and run.entry is not None
    host = run.entry & ((1 << 54) - 1)  # 64 KiB clusters: the offset field's width
    with open(tmp_path / "cc.qcow2", "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 16)
    return tmp_path / "cc.qcow2"


@pytest.mark.parametrize("extra", [[], ["-q"], ["-O", "qcow2"], ["-c", "-O", "qcow2"]])
def test_salvage_reads_past_a_corrupt_cluster_as_qemu(di, corrupt: Path,
                                                      extra: list[str]) -> None:
    d = corrupt.parent
    argv = ["--salvage", *(extra if "-O" in extra else [*extra, "-O", "raw"]), "cc.qcow2"]
    mine = di("convert", *argv, "mine.img", cwd=d)
    ref = qemu("convert", *argv, "ref.img", cwd=d)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert mine.rc == 0
    if "-q" not in extra:
        assert mine.err.count("diskimg: warning: error while reading offset ") == CS // 512
    fmt = "qcow2" if "qcow2" in extra else "raw"
    got = QEMU.raw_bytes(d / "mine.img", fmt)
    assert got == QEMU.raw_bytes(d / "ref.img", fmt)
    want = (d / "p.raw").read_bytes()
    assert got == want[:2 * CS] + bytes(CS) + want[3 * CS:]


def test_failed_convert_removes_the_target_it_created(di, corrupt: Path) -> None:
    d = corrupt.parent
    for fmt in ("raw", "qcow2", "vmdk"):
        res = di("convert", "-O", fmt, "cc.qcow2", f"new.{fmt}", cwd=d)
        assert res.rc == 1 and "host offset" in res.err
        assert not (d / f"new.{fmt}").exists()  # qemu-img leaves a partial file here


def test_failed_convert_keeps_an_existing_target(di, corrupt: Path) -> None:
    d = corrupt.parent
    # -n: the target stays, with what was written before the failure, as in qemu-img
    # (which clusters those are depends on how each tool cuts its requests: qemu reads
    # one compressed cluster a request; every cluster is the old one or the source's)
    old = b"\xaa" * CS
    src = (d / "p.raw").read_bytes()
    for name in ("mine.raw", "ref.raw"):
        make_raw(d / name, 8 * CS, [(0, old * 8)])
    assert di("convert", "-n", "-O", "raw", "cc.qcow2", "mine.raw", cwd=d).rc == 1
    assert qemu("convert", "-n", "-O", "raw", "cc.qcow2", "ref.raw", cwd=d).rc == 1
    for name in ("mine.raw", "ref.raw"):
        got = (d / name).read_bytes()
        assert len(got) == 8 * CS
        for k in range(8):
            assert got[k * CS:(k + 1) * CS] in (old, src[k * CS:(k + 1) * CS]), (name, k)
        assert got[2 * CS:3 * CS] == old  # the unreadable cluster is not replaced
    # an existing file recreated without -n is not removed either (only a file the
    # convert itself brought into being is)
    shutil.copyfile(d / "p.raw", d / "old.raw")
    assert di("convert", "-O", "raw", "cc.qcow2", "old.raw", cwd=d).rc == 1
    assert (d / "old.raw").exists()


def test_salvage_past_a_corrupt_l2_table_as_qemu(di, tmp_path: Path) -> None:
    """The L1 entry points at an unaligned L2 table: neither block status nor reads work
    for its range; qemu-img warns for each sector in its counting pass, then for each
    sector's status and read again, and writes zeros there."""
    img = tmp_path / "l2.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", img, "64k")
    QEMU.io(img, "write -P 0x11 0 64k")
    with open(img, "r+b") as f:
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        f.write(struct.pack(">Q", (entry & ~((1 << 56) - 1)) | 0x12345600))
    before = sha(img)
    mine = di("convert", "--salvage", "-O", "raw", "l2.qcow2", "mine.raw", cwd=tmp_path)
    ref = qemu("convert", "--salvage", "-O", "raw", "l2.qcow2", "ref.raw", cwd=tmp_path)
    assert mine.rc == ref.rc == 0
    # qemu's driver adds its own "qcow2: Image is corrupt: ..." line
    assert mine.err_lines() == [x for x in ref.err_lines() if not x.startswith("qcow2: ")]
    assert len(mine.err_lines()) == 3 * 128
    assert (tmp_path / "mine.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes() == \
        bytes(65536)
    assert sha(img) == before


def test_the_formats_convert_creates_without_the_option_parser_are_the_creatable_ones(
        ) -> None:
    """``convert`` without ``-o`` takes an output format of ``_shared.KNOWN_FORMATS`` as
    creatable without loading :mod:`diskimg.options` (start-up): the same formats as the
    option schemas, which ``options.creatable`` accepts."""
    from diskimg import options
    from diskimg.cli.commands._shared import KNOWN_FORMATS

    assert set(KNOWN_FORMATS) == set(options.FORMAT_OPTIONS)
    for fmt in KNOWN_FORMATS:
        assert options.creatable(fmt) == fmt
