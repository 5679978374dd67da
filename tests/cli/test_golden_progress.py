"""Golden tests of ``-p``: diskimg prints the same sequence of ``    (NN.NN/100%)\\r`` lines
as qemu-img 7.2 for convert, compare and rebase (stdout compared byte for byte), on images
of several shapes: sparse raw, qcow2 chains with zero, compressed and partly written
clusters, small clusters, vmdk, several sources, ``-S 0``, ``-c``, ``-B``, ``-l``."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.cli.progress import f32

from .conftest import make_raw, needs_qemu, run_module

pytestmark = [pytest.mark.qemu, needs_qemu]
QEMU_IO = shutil.which("qemu-io")


def qemu_out(d: Path, *args: str) -> tuple[int, bytes]:
    p = QEMU.img(*args, ok=None, cwd=d, text=False)
    return p.returncode, p.stdout


def mine_out(d: Path, *args: str) -> tuple[int, bytes]:
    r = run_module(*args, cwd=d)
    return r.rc, r.out.encode()


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if QEMU_IO is None:
        pytest.skip("qemu-io not installed")
    d = tmp_path_factory.mktemp("progress")
    make_raw(d / "sparse.raw", 6 << 20, [(1 << 20, b"\xab" * 65536), (3 << 20, b"\1" * 4096),
                                         (5 << 20, b"\2" * 512)])
    make_raw(d / "sparse2.raw", 6 << 20, [(1 << 20, b"\xab" * 65536), (3 << 20, b"\1" * 4096),
                                          (5 << 20, b"\2" * 512)])
    make_raw(d / "empty.raw", 6 << 20, [])
    make_raw(d / "full.raw", 6 << 20 | 512, [(0, b"\5" * (6 << 20 | 512))])
    make_raw(d / "many.raw", 64 << 20, [(i << 20, b"\7" * 70000) for i in range(0, 64, 3)])
    make_raw(d / "longer.raw", 9 << 20, [(1 << 20, b"\xab" * 65536), (3 << 20, b"\1" * 4096),
                                         (5 << 20, b"\2" * 512), (7 << 20, b"\3" * (2 << 20))])
    make_raw(d / "tail0.raw", 8 << 20, [(1 << 20, b"\xab" * 65536), (3 << 20, b"\1" * 4096),
                                        (5 << 20, b"\2" * 512)])
    QEMU.img("create", "-f", "qcow2", "base.qcow2", "64M", cwd=d)
    QEMU.io("base.qcow2", "write -P 1 0 9M", "write -P 5 30M 1M", "write -c -P 6 40M 192k",
            cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    QEMU.io("top.qcow2", "write -P 2 64k 128k", "write -P 3 10M 3M", "write -z 20M 1M",
            "write -P 4 33M 4k", "write -c -P 7 50M 64k", "discard 30M 64k", cwd=d)
    QEMU.img("create", "-f", "qcow2", "nb.qcow2", "64M", cwd=d)
    QEMU.io("nb.qcow2", "write -P 1 0 2M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=4k,extended_l2=off", "small.qcow2",
             "5M", cwd=d)
    QEMU.io("small.qcow2", "write -P 8 1000 5000", "write -P 9 2M 2M", "write -z 4M 100k",
            cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o", "extended_l2=on", "ext.qcow2", "8M", cwd=d)
    QEMU.io("ext.qcow2", "write -P 1 6k 10k", "write -P 2 1M 3M", cwd=d)
    QEMU.img("snapshot", "-c", "snap", "ext.qcow2", cwd=d)
    QEMU.io("ext.qcow2", "write -P 3 5M 1M", cwd=d)
    # a source whose own backing file (2M) is shorter than it (8M), zeros and data past it
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=16k", "b2.qcow2", "2M", cwd=d)
    QEMU.io("b2.qcow2", "write -P 1 0 2M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "b2.qcow2", "-F", "qcow2", "grown.qcow2", "8M",
             cwd=d)
    QEMU.io("grown.qcow2", "write -P 2 64k 64k", "write -z 1M 2M", "write -z 3M 1M",
            "write -P 5 6M 100k", cwd=d)
    QEMU.img("create", "-f", "qcow2", "short.qcow2", "1M", cwd=d)
    make_raw(d / "odd.raw", 1000000, [(4096, b"\7" * 512)])  # not a whole number of sectors
    # a 64k-cluster image over a 512-byte-cluster one, whose L2 tables map 32k each: qemu's
    # block status of a range the top leaves to it ends at each of them
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=512", "sb.qcow2", "3M", cwd=d)
    QEMU.io("sb.qcow2", "write -P 1 100k 50k", "write -z 1M 300k", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "sb.qcow2", "-F", "qcow2", "over.qcow2", cwd=d)
    QEMU.io("over.qcow2", "write -P 2 2M 64k", cwd=d)
    # an extended-L2 image over one whose data is one run: qemu's answer for a range the
    # top leaves to it ends where the top's unallocated subclusters of an allocated cluster
    # meet an unallocated cluster
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=2M", "xb.qcow2", "3M", cwd=d)
    QEMU.io("xb.qcow2", "write -P 1 0 3M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on", "-b",
             "xb.qcow2", "-F", "qcow2", "xt.qcow2", cwd=d)
    QEMU.io("xt.qcow2", "write -P 2 64k 4k", "write -P 3 1M 8k", "write -P 4 1200k 4k",
            cwd=d)
    QEMU.img("convert", "-O", "vmdk", "sparse.raw", "s.vmdk", cwd=d)
    QEMU.img("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", "many.raw", "flat.vmdk",
             cwd=d)
    return d


CONVERT = [
    ["-O", "raw", "sparse.raw"], ["-O", "qcow2", "empty.raw"], ["-O", "raw", "full.raw"],
    ["-O", "qcow2", "many.raw"], ["-S", "0", "-O", "raw", "sparse.raw"],
    ["-O", "raw", "top.qcow2"], ["-O", "qcow2", "top.qcow2"],
    ["-S", "0", "-O", "qcow2", "top.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-c", "-O", "qcow2", "top.qcow2"], ["-c", "-O", "qcow2", "-o", "cluster_size=4k",
                                         "sparse.raw"],
    ["-O", "raw", "small.qcow2"], ["-O", "raw", "ext.qcow2"],
    ["-O", "raw", "-l", "snap", "ext.qcow2"], ["-O", "qcow2", "s.vmdk"],
    ["-O", "raw", "flat.vmdk"], ["-O", "raw", "sparse.raw", "full.raw", "small.qcow2"],
    ["-O", "vmdk", "sparse.raw"],
    # -B onto a backing file shorter than the source: requests split at its end, zeros
    # past it left to the target (not counted, also with -S 0)
    ["-S", "0", "-O", "qcow2", "-B", "b2.qcow2", "-F", "qcow2", "grown.qcow2"],
    ["-S", "0", "-O", "qcow2", "-B", "odd.raw", "-F", "raw", "small.qcow2"],
    ["-S", "0", "-c", "-O", "qcow2", "-B", "short.qcow2", "-F", "qcow2", "grown.qcow2"],
    # a streamOptimized target compresses every grain: whole grains, as with -c
    ["-O", "vmdk", "-o", "subformat=streamOptimized", "small.qcow2"],
    # sources of different cluster sizes and formats, one not a whole number of sectors
    ["-O", "raw", "small.qcow2", "grown.qcow2", "s.vmdk", "odd.raw", "ext.qcow2"],
    ["-S", "0", "-O", "raw", "over.qcow2"],
    ["-O", "raw", "xt.qcow2"],
]


@pytest.mark.parametrize("args", CONVERT, ids=" ".join)
def test_convert_progress_lines_match_qemu(imgs: Path, args: list[str]) -> None:
    ext = args[args.index("-O") + 1]
    ref = qemu_out(imgs, "convert", "-p", *args, f"ref.{ext}")
    mine = mine_out(imgs, "convert", "-p", *args, f"mine.{ext}")
    assert ref[0] == 0
    assert mine == ref
    assert qemu_out(imgs, "compare", f"ref.{ext}", f"mine.{ext}")[0] == 0


FAILING = [
    ["convert", "-p", "-O", "raw", "missing.raw", "x.raw"],
    ["convert", "-p", "-c", "-O", "qcow2", "-o", "preallocation=metadata", "sparse.raw",
     "x.qcow2"],
    ["convert", "-p", "-n", "-O", "raw", "longer.raw", "sparse2.raw"],
    ["compare", "-p", "missing.raw", "sparse.raw"],
    ["rebase", "-p", "-b", "nb.qcow2", "-F", "qcow2", "missing.qcow2"],
    ["rebase", "-p", "-b", "base.qcow2", "-F", "nosuchfmt", "nb.qcow2"],
    ["commit", "-p", "nb.qcow2"],
]


@pytest.mark.parametrize("args", FAILING, ids=" ".join)
def test_failing_progress_lines_match_qemu(imgs: Path, args: list[str]) -> None:
    # where qemu-img starts the line (convert and rebase: before opening anything; commit:
    # once the image is open; compare: its first line after opening, the newline before)
    # decides what a failure prints
    before = _files(imgs)
    ref = qemu_out(imgs, *args)
    assert ref[0] in (1, 2)
    assert mine_out(imgs, *args) == ref
    assert _files(imgs) == before  # a refusal changes nothing (and creates nothing)


def _files(d: Path) -> dict[str, tuple[int, int, str]]:
    """Each file's size, modification time and header hash (a write changes the time;
    the fixture's images are too large to hash whole for every case)."""
    out = {}
    for p in d.iterdir():
        if not p.name.startswith(("ref.", "mine.")):
            with open(p, "rb") as f:
                head = hashlib.sha256(f.read(1 << 20)).hexdigest()
            st = p.stat()
            out[p.name] = (st.st_size, st.st_mtime_ns, head)
    return out


COMPARE = [
    ["sparse.raw", "sparse2.raw"], ["sparse.raw", "many.raw"], ["empty.raw", "sparse.raw"],
    ["full.raw", "full.raw"], ["many.raw", "many.raw"], ["sparse.raw", "tail0.raw"],
    ["tail0.raw", "sparse.raw"], ["sparse.raw", "longer.raw"], ["top.qcow2", "top.qcow2"],
    ["top.qcow2", "base.qcow2"], ["-s", "sparse.raw", "tail0.raw"],
    ["small.qcow2", "small.qcow2"], ["sparse.raw", "s.vmdk"], ["-q", "sparse.raw", "many.raw"],
    ["over.qcow2", "over.qcow2"],
]


@pytest.mark.parametrize("args", COMPARE, ids=" ".join)
def test_compare_progress_lines_match_qemu(imgs: Path, args: list[str]) -> None:
    ref = qemu_out(imgs, "compare", "-p", *args)
    assert mine_out(imgs, "compare", "-p", *args) == ref


REBASE = [
    ["-b", "nb.qcow2", "-F", "qcow2"], ["-b", ""], ["-u", "-b", "nb.qcow2", "-F", "qcow2"],
    ["-b", "base.qcow2", "-F", "qcow2"],
]


@pytest.mark.parametrize("args", REBASE, ids=" ".join)
def test_rebase_progress_lines_match_qemu(imgs: Path, args: list[str], tmp_path: Path) -> None:
    q, m = tmp_path / "q", tmp_path / "m"
    for d in (q, m):
        d.mkdir()
        for n in ("base.qcow2", "top.qcow2", "nb.qcow2"):
            shutil.copy(imgs / n, d / n)
    ref = qemu_out(q, "rebase", "-p", *args, "top.qcow2")
    mine = mine_out(m, "rebase", "-p", *args, "top.qcow2")
    assert ref[0] == 0
    assert mine == ref
    assert qemu_out(m, "compare", str(q / "top.qcow2"), "top.qcow2")[0] == 0


def test_commit_progress_shape(imgs: Path, tmp_path: Path) -> None:
    # qemu-img polls its commit job, so how many times it repeats 0 and 100 varies from run
    # to run; the shape is fixed: 0 first, rising values, 100 last, a newline, the message
    for n in ("base.qcow2", "top.qcow2"):
        shutil.copy(imgs / n, tmp_path / n)
    rc, out = mine_out(tmp_path, "commit", "-p", "top.qcow2")
    assert rc == 0
    text = out.decode()
    body, msg = text.rsplit("\n", 2)[0], text.rsplit("\n", 2)[1]
    assert msg == "Image committed."
    values = [float(x.strip()[1:].split("/")[0]) for x in body.split("\r") if x]
    assert values[:2] == [0.0, 0.0] and values[-2:] == [100.0, 100.0]
    assert values == sorted(values) and len(values) > 4
    assert all(x.startswith("    (") for x in body.split("\r") if x)


def test_commit_progress_values_on_qemus_grid(tmp_path: Path) -> None:
    # qemu's commit job counts whole 64 KiB granules (the base's cluster size) of the ranges
    # the top (of 4 KiB clusters) allocates, and its operations finish in an order that
    # varies from run to run: every value either tool prints is k granules of that total
    # (diskimg: one per operation, in order)
    src = tmp_path / "src"
    src.mkdir()
    QEMU.img("create", "-f", "qcow2", "base.qcow2", "4M", cwd=src)
    QEMU.io("base.qcow2", "write -P 1 0 4M", cwd=src)
    QEMU.img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F",
             "qcow2", "top.qcow2", cwd=src)
    QEMU.io("top.qcow2", "write -P 2 8k 12k", "write -P 3 200k 4k", "write -P 4 1M 300k",
            "write -z 3M 64k", "write -P 5 4092k 4k", cwd=src)
    outs = []
    for tool in ("q", "d"):
        d = tmp_path / tool
        d.mkdir()
        for n in ("base.qcow2", "top.qcow2"):
            shutil.copy(src / n, d / n)
        if tool == "q":
            top_map = QEMU.map(d / "top.qcow2")
            outs.append(qemu_out(d, "commit", "-p", "top.qcow2"))
        else:
            outs.append(mine_out(d, "commit", "-p", "top.qcow2"))
    g = 65536
    granules: set[int] = set()
    for e in top_map:
        if e["depth"] == 0:
            granules.update(range(e["start"] // g, -(-(e["start"] + e["length"]) // g)))
    total = len(granules) * g
    grid = {f"{f32(f32(f32(k * g) / f32(total)) * 100):.2f}" for k in range(len(granules) + 1)}
    seen = []
    for rc, out in outs:
        assert rc == 0
        body = out.decode().rsplit("\n", 2)[0]
        seen.append({x.strip()[1:].split("/")[0] for x in body.split("\r") if x})
    assert seen[0] <= grid and seen[1] <= grid
    assert len(seen[1] - {"0.00", "100.00"}) > 3  # a value per operation
    assert QEMU.compare(tmp_path / "q" / "base.qcow2", tmp_path / "d" / "base.qcow2") == 0


def test_convert_backing_other_past_source_backing_end(tmp_path: Path) -> None:
    # the source's own backing file (1M) ends before it (2M); -B names another image full
    # of 0xbb.  qemu-img leaves the range the source leaves unallocated, across that end, to
    # the target's backing file: its target reads 0xbb at 1M..2M where the source reads
    # zeros.  diskimg writes the zeros there (docs/compatibility.md) and prints qemu-img's
    # progress lines all the same.
    d = tmp_path
    QEMU.img("create", "-f", "qcow2", "base.qcow2", "1M", cwd=d)
    QEMU.io("base.qcow2", "write -P 1 0 1M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "2M",
             cwd=d)
    QEMU.img("create", "-f", "qcow2", "tb.qcow2", "2M", cwd=d)
    QEMU.io("tb.qcow2", "write -P 0xbb 0 2M", cwd=d)
    args = ["convert", "-p", "-S", "0", "-O", "qcow2", "-B", "tb.qcow2", "-F", "qcow2",
            "top.qcow2"]
    ref = qemu_out(d, *args, "q.qcow2")
    assert ref[0] == 0
    assert mine_out(d, *args, "d.qcow2") == ref
    half = 1 << 20
    source = QEMU.raw_bytes(d / "top.qcow2", "qcow2")
    # (booleans: pytest's diff of two megabytes would take minutes)
    source_ok = source == b"\1" * half + bytes(half)
    assert source_ok
    # the first half is left to the target's backing file by both (the source leaves it to
    # its own); past the end of the source's backing file the source reads zeros
    mine = QEMU.raw_bytes(d / "d.qcow2", "qcow2")
    mine_ok = mine[:half] == b"\xbb" * half and not any(mine[half:])
    assert mine_ok
    theirs_ok = QEMU.raw_bytes(d / "q.qcow2", "qcow2") == b"\xbb" * (2 * half)
    assert theirs_ok


def test_convert_n_onto_stream_optimized_progress(imgs: Path, tmp_path: Path) -> None:
    # an existing streamOptimized target compresses every grain: qemu-img copies into it a
    # grain at a time, as with -c, and counts whole grains
    for name in ("q.vmdk", "d.vmdk"):
        QEMU.img("create", "-f", "vmdk", "-o", "subformat=streamOptimized", name, "5M",
                 cwd=tmp_path)
    src = str(imgs / "small.qcow2")
    ref = qemu_out(tmp_path, "convert", "-p", "-n", "-O", "vmdk", src, "q.vmdk")
    assert ref[0] == 0
    assert mine_out(tmp_path, "convert", "-p", "-n", "-O", "vmdk", src, "d.vmdk") == ref
    assert QEMU.compare(tmp_path / "q.vmdk", tmp_path / "d.vmdk") == 0
    assert QEMU.compare(src, tmp_path / "d.vmdk") == 0
