"""Golden tests: qemu-img 7.2 and diskimg on the same inputs print the same text.

Table-driven over commands and formats (qcow2 in its variants, raw, every vmdk subformat);
the rows here are the ones ``test_cli_vs_qemu.py`` and ``test_lifecycle_*.py`` do not
already cover.  Only the program name is normalised; every command runs in the directory
that holds its images, so paths are the same relative names for both tools.  Commands that
write run on twin copies of the inputs.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import make_raw, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

VMDK_SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                   "twoGbMaxExtentFlat", "streamOptimized"]


def _poke_refcount(path: Path, cluster: int, value: int, truncate: int | None = None) -> None:
    """Set the 16-bit refcount of ``cluster`` in the first refcount block."""
    with open(path, "r+b") as f:
        f.seek(65536)
        (rb,) = struct.unpack(">Q", f.read(8))
        f.seek(rb + 2 * cluster)
        f.write(struct.pack(">H", value))
        if truncate is not None:
            f.truncate(truncate)


def build_inputs(d: Path) -> None:
    """Every image the read-only rows use, made by qemu-img and qemu-io."""
    make_raw(d / "r.raw", 4 << 20, [(65536, b"x" * 70000)])
    QEMU.img("create", "-f", "qcow2", "b.qcow2", "4M", cwd=d)
    QEMU.io("b.qcow2", "write -P 1 0 1M", fmt=None, cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", cwd=d)
    QEMU.io("t.qcow2", "write -P 2 64k 64k", "write -z 2M 64k", "write -c -P 3 3M 64k",
            fmt=None, cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "t.qcow2", "-F", "qcow2", "t2.qcow2", "6M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1G", cwd=d)
    QEMU.io("v2.qcow2", "write 0 4k", fmt=None, cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o",
             "lazy_refcounts=on,extended_l2=on,"
        "compression_type=zstd,refcount_bits=8",
             "x.qcow2", "16M", cwd=d)
    QEMU.io("x.qcow2", "write 8k 4k", fmt=None, cwd=d)
    QEMU.img("snapshot", "-c", "first", "x.qcow2", cwd=d)
    QEMU.img("snapshot", "-c", "a-much-longer-snapshot-name", "x.qcow2", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-o", "data_file=dd.raw", "df.qcow2", "1M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
             "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", "l.qcow2", "1M",
             cwd=d)
    QEMU.img("create", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
             "encrypt.format=aes,encrypt.key-secret=s", "aes.qcow2", "1M", cwd=d)
    QEMU.img("create", "-f", "qcow2", "bm.qcow2", "1M", cwd=d)
    QEMU.img("bitmap", "--add", "bm.qcow2", "b0", cwd=d)
    QEMU.img("bitmap", "--add", "--disable", "-g", "128k", "bm.qcow2", "b1", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "or.qcow2", cwd=d)
    QEMU.img("create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "om.qcow2",
             "1M", cwd=d)
    for sub in VMDK_SUBFORMATS:
        QEMU.img("convert", "-O", "vmdk", "-o", f"subformat={sub}", "r.raw", f"{sub}.vmdk",
                 cwd=d)
    QEMU.img("create", "-f", "vmdk", "-o", "compat6=on,adapter_type=lsilogic", "c6.vmdk", "10M",
             cwd=d)
    QEMU.img("create", "-f", "vmdk", "-o", "zeroed_grain=on", "zg.vmdk", "10M", cwd=d)
    QEMU.img("create", "-f", "vmdk", "-b", "monolithicSparse.vmdk", "-F", "vmdk", "ov.vmdk",
             cwd=d)
    # check's messages: a cluster in use with refcount 0 (plus a leak), and refcount 2
    QEMU.img("create", "-f", "qcow2", "bad.qcow2", "1M", cwd=d)
    QEMU.io("bad.qcow2", "write 0 64k", fmt=None, cwd=d)
    _poke_refcount(d / "bad.qcow2", 3, 0)
    _poke_refcount(d / "bad.qcow2", 7, 1, truncate=8 * 65536)
    QEMU.img("create", "-f", "qcow2", "bad2.qcow2", "1M", cwd=d)
    QEMU.io("bad2.qcow2", "write 0 64k", fmt=None, cwd=d)
    _poke_refcount(d / "bad2.qcow2", 4, 2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    d = tmp_path_factory.mktemp("golden")
    build_inputs(d)
    return d


QCOW2 = ["t.qcow2", "t2.qcow2", "v2.qcow2", "x.qcow2", "df.qcow2", "l.qcow2", "aes.qcow2",
         "bm.qcow2", "or.qcow2", "bad.qcow2", "bad2.qcow2"]
VMDK = [f"{s}.vmdk" for s in VMDK_SUBFORMATS] + ["c6.vmdk", "zg.vmdk", "ov.vmdk"]
IMAGES = QCOW2 + VMDK + ["r.raw"]

# (command, options) run on every image above
PER_IMAGE = [("info", []), ("info", ["--backing-chain"]), ("map", []), ("check", []),
             ("snapshot", ["-l"]), ("measure", ["-O", "qcow2"]), ("compare", [])]

READ_ONLY = [[cmd, *o, img] + (["r.raw"] if cmd == "compare" else [])
             for cmd, o in PER_IMAGE for img in IMAGES]
READ_ONLY += [
    # human output variants
    ["measure", "-O", "raw", "streamOptimized.vmdk"],
    ["measure", "--output=json", "-O", "qcow2", "twoGbMaxExtentSparse.vmdk"],
    ["map", "--output=json", "monolithicFlat.vmdk"],
    ["map", "--output=json", "streamOptimized.vmdk"],
    ["map", "--output=json", "twoGbMaxExtentFlat.vmdk"],
    ["check", "-r", "all", "monolithicSparse.vmdk"],
    ["check", "-r", "leaks", "monolithicSparse.vmdk"],
    ["compare", "-s", "t.qcow2", "b.qcow2"], ["compare", "-s", "r.raw", "monolithicSparse.vmdk"],
    ["compare", "x.qcow2", "v2.qcow2"], ["compare", "monolithicSparse.vmdk", "ov.vmdk"],
    ["convert", "-O", "vmdk", "-o", "help"], ["convert", "-O", "raw", "-o", "help"],
    ["create", "-f", "vmdk", "-o", "help"], ["create", "-f", "vmdk", "-o", "help", "x.vmdk"],
    # qemu-img's words for common mistakes
    ["info", "-f", "vmdk", "t.qcow2"], ["info", "-f", "vmdk", "r.raw"],
    ["info", "-f", "qcow2", "monolithicSparse.vmdk"], ["map", "-f", "vmdk", "r.raw"],
    ["check", "-f", "vmdk", "t.qcow2"], ["compare", "-f", "vmdk", "t.qcow2", "b.qcow2"],
    ["convert", "-f", "vmdk", "t.qcow2", "o.raw"], ["commit", "-f", "vmdk", "t.qcow2"],
    ["rebase", "-f", "vmdk", "-b", "r.raw", "-F", "raw", "t.qcow2"],
    ["info", "--backing-chain", "om.qcow2"], ["info", "om.qcow2"], ["map", "om.qcow2"],
    ["check", "om.qcow2"], ["snapshot", "-l", "om.qcow2"], ["compare", "om.qcow2", "r.raw"],
    ["measure", "-O", "qcow2", "om.qcow2"],
    ["snapshot", "--bogus", "t.qcow2"], ["map", "--bogus", "t.qcow2"],
    ["compare", "--bogus", "t.qcow2", "b.qcow2"], ["commit", "--bogus", "t.qcow2"],
    ["rebase", "--bogus", "t.qcow2"], ["amend", "--bogus", "t.qcow2"],
    ["convert", "--bogus", "t.qcow2", "o.raw"], ["resize", "--bogus", "t.qcow2", "8M"],
    ["dd", "--bogus", "if=r.raw", "of=o.raw"],
    ["map", "nonexist"], ["snapshot", "-l", "nonexist.qcow2"], ["commit", "nonexist.qcow2"],
    ["compare", "t.qcow2", "nonexist"], ["convert", "-O", "qcow2", "nonexist.qcow2", "o.qcow2"],
    ["rebase", "-b", "b.qcow2", "-F", "qcow2", "nonexist.qcow2"], ["dd", "if=nonexist",
                                                                  "of=o.raw"],
    ["resize", "nonexist", "8M"], ["resize", "t.qcow2", "1x"],
    ["map", "--max-length", "-1", "t.qcow2"], ["measure", "--size", "1x"],
    ["convert", "-l", "nope", "-O", "raw", "t.qcow2", "o.raw"],
    ["convert", "-l", "nope", "-O", "raw", "monolithicSparse.vmdk", "o.raw"],
    ["convert", "-l", "nope", "-O", "raw", "r.raw", "o.raw"],
    ["convert", "-O", "qcow2", "-l", "snapshot.name=nope", "x.qcow2", "o.qcow2"],
    ["snapshot", "-a", "nope", "x.qcow2"], ["snapshot", "-d", "nope", "x.qcow2"],
    ["snapshot", "-a", "x", "monolithicSparse.vmdk"],
    ["snapshot", "-d", "x", "monolithicSparse.vmdk"],
    ["snapshot", "-c", "x", "monolithicSparse.vmdk"], ["snapshot", "-l", "r.raw"],
    ["commit", "monolithicSparse.vmdk"], ["commit", "r.raw"],
    ["rebase", "-b", "r.raw", "-F", "raw", "monolithicSparse.vmdk"],
    ["amend", "-o", "compat=0.10", "monolithicSparse.vmdk"],
    ["resize", "monolithicSparse.vmdk", "8M"], ["resize", "streamOptimized.vmdk", "8M"],
]


def _same(args: list[str], qd: Path, md: Path, di) -> None:
    ref = qemu(*args, cwd=qd)
    mine = di(*args, cwd=md)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert "Traceback" not in mine.err


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_read_only_output_matches_qemu(di, inputs: Path, args: list[str]) -> None:
    _same(args, inputs, inputs, di)


WRITING = [
    # create's Formatting line for vmdk and its option errors
    ["create", "-f", "vmdk", "a.vmdk", "10M"],
    ["create", "-f", "vmdk", "-o", "subformat=monolithicFlat,adapter_type=buslogic", "a.vmdk",
     "10M"],
    ["create", "-f", "vmdk", "-o", "subformat=streamOptimized,hwversion=6,toolsversion=1234",
     "a.vmdk", "10M"],
    ["create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse,compat6=on", "a.vmdk",
     "10M"],
    ["create", "-f", "vmdk", "-o", "zeroed_grain=on,adapter_type=ide", "a.vmdk", "1G"],
    ["create", "-f", "vmdk", "-o", "zeroed_grain=off", "a.vmdk", "1G"],
    ["create", "-f", "vmdk", "-b", "r.raw", "-F", "raw", "a.vmdk"],
    ["create", "-f", "vmdk", "-b", "monolithicSparse.vmdk", "-F", "vmdk", "a.vmdk"],
    ["create", "-f", "vmdk", "-o", "subformat=bogus", "a.vmdk", "1M"],
    ["create", "-f", "vmdk", "-o", "adapter_type=bogus", "a.vmdk", "1M"],
    ["create", "-f", "vmdk", "-o", "hwversion=4,compat6=on", "a.vmdk", "1M"],
    # qcow2 create lines not in test_cli_vs_qemu
    ["create", "-f", "qcow2", "-o", "data_file=zz.raw,data_file_raw=on", "a.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=4M", "a.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=128", "a.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "a.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "a.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "b.qcow2", "a.qcow2"],  # "Detected format" (no newline)
    ["create", "-f", "qcow2", "-b", "r.raw", "a.qcow2"],
    ["create", "-f", "qcow2", "-b", "b.qcow2", "-F", "raw", "a.qcow2"],
    ["create", "-f", "qcow2", "-b", "nothere.qcow2", "-F", "qcow2", "a.qcow2"],
    ["create", "-f", "qcow2", "a.qcow2", "1M", "-o", "foo"],
    ["create", "--bogus", "a.qcow2", "1M"], ["create", "-f", "qcow2", "a.qcow2", "12Q"],
    ["create", "-f", "qcow2", "a.qcow2", "-5"],
    ["create", "-f", "qcow2", "-o", "preallocation=falloc,cluster_size=4k", "a.qcow2", "5M"],
    # convert: the target cannot be created
    ["convert", "-O", "qcow2", "-o", "cluster_size=3k", "t.qcow2", "o.qcow2"],
    ["convert", "-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "t.qcow2", "o.qcow2"],
    ["convert", "-O", "vmdk", "-o", "adapter_type=xx", "t.qcow2", "o.vmdk"],
    ["convert", "-O", "vmdk", "-o", "subformat=bogus", "t.qcow2", "o.vmdk"],
    ["convert", "-O", "raw", "-o", "preallocation=metadata", "t.qcow2", "o.raw"],
    ["convert", "-O", "vmdk", "-o", "hwversion=4,compat6=on", "t.qcow2", "o.vmdk"],
    ["convert", "-O", "qcow2", "t.qcow2", "/nonexistent-dir/o.qcow2"],
    # convert/commit messages on success (stdout empty / "Image committed.")
    ["convert", "-O", "vmdk", "t.qcow2", "o.vmdk"], ["convert", "-O", "qcow2", "ov.vmdk",
                                                    "o.qcow2"],
    ["commit", "t2.qcow2"], ["commit", "-q", "t.qcow2"], ["commit", "ov.vmdk"],
    # snapshots on formats without them, and the probed-raw warning
    ["snapshot", "-c", "x", "r.raw"], ["snapshot", "-d", "x", "r.raw"],
    ["snapshot", "-a", "x", "r.raw"], ["snapshot", "-a", "x", "-f", "raw", "r.raw"],
    ["snapshot", "-c", "x", "om.qcow2"],
    ["resize", "-f", "raw", "r.raw", "-1M"],
]


@pytest.mark.parametrize("args", WRITING, ids=" ".join)
def test_writing_output_matches_qemu(di, inputs: Path, tmp_path: Path,
                                     args: list[str]) -> None:
    qd, md = tmp_path / "q", tmp_path / "m"
    for d in (qd, md):
        shutil.copytree(inputs, d, symlinks=True)
    _same(args, qd, md, di)
    created = [a for a in args[-2:] if a.startswith(("a.", "o.")) and (qd / a).exists()]
    for name in created:
        if name.endswith(".qcow2") and args[0] == "create":
            assert (md / name).read_bytes() == (qd / name).read_bytes()


# --- create: the same bytes ----------------------------------------------------------

PREALLOC = [f"preallocation={p},cluster_size={cs},refcount_bits={rb}{extra}"
            for p in ("falloc", "full")
            for cs, rb in (("512", "1"), ("4k", "64"), ("64k", "16"), ("2M", "8"))
            for extra in ("", ",compat=0.10" if rb == "16" else ",lazy_refcounts=on")]
PREALLOC += ["preallocation=falloc,extended_l2=on", "preallocation=full,extended_l2=on,"
             "cluster_size=16k,refcount_bits=2"]


# small clusters need many L2 tables and refcount blocks already at 40M; the last row
# spans three L2 tables of 64 KiB clusters
PREALLOC_CASES = [(o, size) for o in PREALLOC for size in ("0", "1M", "40M")]
PREALLOC_CASES += [("preallocation=falloc", "1100M")]


@pytest.mark.parametrize("olist,size", PREALLOC_CASES, ids=lambda v: str(v))
def test_create_preallocated_qcow2_is_byte_identical(di, twin_dirs: tuple[Path, Path],
                                                     olist: str, size: str) -> None:
    qd, md = twin_dirs
    args = ["create", "-f", "qcow2", "-o", olist, "p.qcow2", size]
    ref = qemu(*args, cwd=qd)
    mine = di(*args, cwd=md)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert subprocess.run(["cmp", str(qd / "p.qcow2"), str(md / "p.qcow2")],
                          capture_output=True).returncode == 0
    assert qemu("check", "p.qcow2", cwd=md).rc == 0
