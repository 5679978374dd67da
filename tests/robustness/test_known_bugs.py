"""Bugs found by the robustness work, one strict xfail each (remove the mark with the fix).

Fixed ones stay as regression tests without the mark (B1-B10).
The fuzzers excuse exactly the open ones (robustlib.KNOWN_BUGS) so they keep finding new
ones; drop an entry together with its xfail mark when the bug is fixed (a strict xfail that
passes fails the suite as a reminder).
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import robustlib
from qemukit import QEMU

import diskimg
from diskimg.errors import DiskImgError

pytestmark = pytest.mark.qemu
SRC = Path(__file__).resolve().parents[2] / "src"


def run_py(code: str, timeout: float = 10, mem_mb: int | None = None) -> tuple[int | str, str]:
    """Run ``code`` in a fresh interpreter; ("timeout", "") when it does not finish."""
    pre = ""
    if mem_mb:
        pre = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, "
               f"({mem_mb << 20}, {mem_mb << 20}))\n")
    try:
        res = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)],
                             capture_output=True, text=True, timeout=timeout,
                             env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return res.returncode, res.stdout + res.stderr


# --- B1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["raw-4-zero-bytes", "qcow2-size-4100-zero-cluster"])
def test_convert_of_unaligned_zero_tail_terminates(case: str, tmp_path: Path) -> None:
    if case.startswith("raw"):
        src = tmp_path / "four.img"
        src.write_bytes(b"\0\0\0\0")
    else:
        src = tmp_path / "uz.qcow2"
        QEMU.img("create", "-q", "-f", "qcow2", src.name, "8k", cwd=tmp_path)
        QEMU.io(src.name, "write -P 0 0 8k", fmt=None, cwd=src.parent)
        robustlib.patch_be(src, 24, ">Q", 4100)
    rc, out = run_py(f"""
        from diskimg.cli.main import main
        raise SystemExit(main(["convert", "-O", "raw", {str(src)!r},
                               {str(tmp_path / 'out.raw')!r}]))
    """, timeout=4)
    assert rc == 0, out


# --- B2 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["reftable-entry", "header-refcount_table_offset"])
def test_refcount_block_offset_above_2_63(where: str, tmp_path: Path) -> None:
    p = tmp_path / "rt.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p.name, "1M",
             cwd=tmp_path)
    QEMU.io(p.name, "write -P 0x11 0 64k", fmt=None, cwd=p.parent)
    rt = robustlib.qcow2_header(p.read_bytes())["refcount_table_offset"]
    off = rt if where == "reftable-entry" else 48
    with p.open("r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x80]))  # 0x8000000000003000 / 0x8000000000001000
    with diskimg.open(p) as d, contextlib.suppress(DiskImgError):
        list(d.map())  # a clean error is fine (qemu-img map succeeds)
    with diskimg.open(p, "r+") as d, contextlib.suppress(DiskImgError):
        d.write(1 << 19, b"x" * 4096)


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("luks") / "l.qcow2"
    diskimg.create(p, "qcow2", 1 << 20, secrets={"s0": b"pw"},
                   options={"encrypt.format": "luks", "encrypt.key-secret": "s0",
                            "encrypt.iter-time": 10})
    return p.read_bytes()


# --- B9 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_secret", [False, True])
def test_luks_header_offset_above_2_63(with_secret: bool, luks_image: bytes,
                                       tmp_path: Path) -> None:
    p = tmp_path / "l.qcow2"
    data = bytearray(luks_image)
    ext = data.find(bytes.fromhex("0537be77"), 104, 4096)
    assert ext > 0
    data[ext + 8] ^= 0xD0  # FDE offset 0x8000 -> 0xd000000000008000: the fuzzer's find
    p.write_bytes(bytes(data))
    kw = ({"secrets": {"s0": b"pw"}, "options": {"encrypt.key-secret": "s0"}}
          if with_secret else {})
    try:
        with diskimg.open(p, **kw) as d:
            d.info()
    except DiskImgError:
        pass


# --- B3 -----------------------------------------------------------------------------------
def test_map_and_convert_work_with_unreadable_refcount_table(tmp_path: Path) -> None:
    p = tmp_path / "rt.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p.name, "1M",
             cwd=tmp_path)
    QEMU.io(p.name, "write -P 0x11 0 64k", fmt=None, cwd=p.parent)
    robustlib.patch_be(p, 48, ">Q", 1 << 40)
    with diskimg.open(p) as d:
        assert d.read(0, 4) == b"\x11" * 4  # reads work (as in qemu)
        entries = list(d.map())
        assert entries[0].data and entries[0].length == 64 << 10
    diskimg.convert(p, tmp_path / "out.raw", out_format="raw")


# --- B4 -----------------------------------------------------------------------------------
def test_data_file_raw_without_data_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "dfr.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p.name, "1M", cwd=tmp_path)
    robustlib.patch_be(p, 88, ">Q", 2)
    with pytest.raises(DiskImgError, match="data"):
        diskimg.open(p).close()


# --- B5 -----------------------------------------------------------------------------------
# opening a streamOptimized vmdk 'r+' truncated the file to overHead*512 at open time
# without checking overHead against the file: a huge sparse file or OSError(EFBIG)
def test_vmdk_stream_rw_open_truncates_to_overhead(tmp_path: Path) -> None:
    p = tmp_path / "s.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", p.name, "1M",
             cwd=tmp_path)
    size = p.stat().st_size
    for overhead in (1 << 25, 1 << 40, 2):  # 16 GiB, 512 TiB, inside the descriptor
        with p.open("r+b") as f:
            f.seek(64)
            f.write(struct.pack("<Q", overhead))
        with pytest.raises(DiskImgError, match=r"overHead .*offset 64") as err:
            diskimg.open(p, "r+").close()
        assert err.value.offset == 64
        assert p.stat().st_size == size, f"overHead {overhead}: file is now " \
            f"{p.stat().st_size} bytes"
        with diskimg.open(p) as d:  # read-only opens read it, as qemu does
            assert d.read(0, 4096) == bytes(4096)


# --- B6 (fixed in the working tree while this was written: now a regression test) ------
# growing an overlay left the new area unallocated, so the backing file's old data showed
# through; qemu 7.2 zeroes it (block: truncate: Don't make backing file data visible)--
def test_resize_grow_does_not_expose_backing_data(tmp_path: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=tmp_path)
    QEMU.io("b.qcow2", "write -P 0xbb 0 1M", fmt=None, cwd=tmp_path)
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2", "1M",
             cwd=tmp_path)
    with diskimg.open(tmp_path / "o.qcow2", "r+") as d:
        d.resize(512 << 10, shrink=True)
        d.resize(1 << 20)
    with diskimg.open(tmp_path / "o.qcow2") as d:
        assert d.read(768 << 10, 4096) == bytes(4096)


# --- B7 -----------------------------------------------------------------------------------
# a grain size near qemu's 1 GiB limit made every compressed-grain read inflate and pad a
# whole grain: ~1 GiB for a 1 MiB disk (MemoryError under a 1 GiB address-space limit)
def test_vmdk_huge_grain_read_is_bounded(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(range(256)) * 1024 + bytes(768 << 10))
    p = tmp_path / "s.vmdk"
    QEMU.img("convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             raw.name, p.name, cwd=tmp_path)
    data = bytearray(p.read_bytes())
    data[22] ^= 0x1E  # grainSize 0x80 -> 0x1e0080 sectors (960 MiB): the fuzzer's find
    p.write_bytes(bytes(data))
    # grain 0 is now the first 64 KiB grain qemu wrote; its inflated bytes, then zeros (a
    # short grain reads as zeros past its end; qemu 7.2 fails such reads with EINVAL)
    want = tmp_path / "want.raw"
    want.write_bytes(raw.read_bytes()[:64 << 10].ljust(1 << 20, b"\0"))
    rc, out = run_py(f"""
        import diskimg
        want = open({str(want)!r}, "rb").read()
        with diskimg.open({str(p)!r}) as d:
            assert d.read(0, d.size) == want
            # small reads stream through the grain (forwards and back), byte-identical
            offs = list(range(0, d.size, 4096)) + [8192, 0, 65536 - 100]
            assert all(d.read(o, 4096) == want[o:o + 4096] for o in offs)
        print("ok")
    """, timeout=60, mem_mb=256)
    assert rc == 0 and out.strip() == "ok", out


def test_known_bug_registry_names_existing_tests() -> None:
    names = {n for n in globals() if n.startswith("test_")}
    for k in robustlib.KNOWN_BUGS:
        assert k.test.split("::")[1] in names, k


# --- B8 (fixed: now a regression test) ----------------------------------------------------
# a crash inside snapshot delete, after the refcount blocks and before the L2 tables with the
# new OFLAG_COPIED bits were written, left refcount/COPIED mismatches that qemu-img check
# counts as corruptions (qemu 7.2 has the same window; both mismatch directions count).
# Create and delete now write new tables and switch the header to them in one write.
CRASH_IN_SNAPSHOT_OP = """
import os, diskimg
img = diskimg.open({path!r}, "r+")
{setup}
img.flush()
host = img.host
calls = 0
for name in ("pwrite", "pwritev", "flush", "punch_hole"):
    real = getattr(host, name)
    def hook(*a, _real=real, _name=name):
        global calls
        calls += 1
        if calls == {nth}:
            os._exit(9)  # "crash" just before this host write/sync of the operation
        return _real(*a)
    setattr(host, name, hook)
{op}
os._exit(0)
"""


def _snapshot_image(d: Path, compat: str, cs: int) -> Path:
    p = d / "s.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", p.name,
             "1M", cwd=d)
    QEMU.io(p.name, "write -P 0x11 0 256k", fmt=None, cwd=p.parent)
    QEMU.io(p.name, "write -c -P 0x22 512k 64k", fmt=None, cwd=p.parent)
    return p


@pytest.mark.parametrize(("kind", "compat"), [("delete", "0.10"), ("create", "1.1")])
def test_crash_in_snapshot_delete_leaves_only_leaks(kind: str, compat: str,
                                                    tmp_path: Path) -> None:
    """Crash before every host write or sync of a snapshot delete/create in turn: qemu-img
    check finds at most leaks and the disk (and the snapshot, if the table has it) reads
    back unchanged."""
    assert robustlib.QEMU_IMG
    cs = 4096
    # clusters shared by s1, s2 and the active disk (refcount 3), by s2 and the active
    # disk only (2: delete s2 moves them to 1) and the active disk's own (1: create moves
    # them to 2), so both operations flip OFLAG_COPIED in the active L1 and L2 tables
    setup = ("img.snapshots.create('s1'); img.write(4096, b'\\x33' * 8192); "
             "img.snapshots.create('s2'); img.write(65536, b'\\x44' * 8192)")
    op = "img.snapshots.delete('s2')" if kind == "delete" else "img.snapshots.create('s3')"
    ref = _snapshot_image(tmp_path, compat, cs)
    rc, out = run_py(CRASH_IN_SNAPSHOT_OP.format(path=str(ref), setup=setup, nth=0, op=""))
    assert rc == 0, out
    pristine = ref.read_bytes()
    with diskimg.open(ref) as d:
        want = d.read(0, d.size)
        with d.snapshot_view(name="s1") as v:
            want_s1 = v.read(0, v.size)
    points = 0
    for nth in range(1, 200):
        ref.write_bytes(pristine)
        rc, out = run_py(CRASH_IN_SNAPSHOT_OP.format(path=str(ref), setup="", nth=nth,
                                                     op=op))
        if rc == 0:
            break  # the operation finished before the nth write: every point was tried
        assert rc == 9, out
        points += 1
        res = subprocess.run([robustlib.QEMU_IMG, "check", str(ref)], capture_output=True,
                             text=True)
        assert res.returncode in (0, 3), (nth, res.stdout + res.stderr[:2000])
        with diskimg.open(ref) as d:
            assert d.read(0, d.size) == want, nth
            names = [s.name for s in d.snapshots.list()]
            if "s1" in names:
                with d.snapshot_view(name="s1") as v:
                    assert v.read(0, v.size) == want_s1, nth
    else:
        raise AssertionError("the operation never finished")
    assert points >= 5, points  # the sweep reached into the operation
    res = subprocess.run([robustlib.QEMU_IMG, "check", str(ref)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
