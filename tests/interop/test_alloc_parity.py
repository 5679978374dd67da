"""Allocation that matches qemu-img 7.2's, so that ``map`` gives the same answer (issue 17,
items 6 and 7).

Every test prepares one image with qemu-img/qemu-io, copies it, runs the same command
line with qemu-img on one copy and diskimg on the other, and asserts what a user sees:
``qemu-img map --output=json`` equal, ``qemu-img check`` clean, ``qemu-img compare``
identical and (where it holds) every byte of the two files equal.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from qemukit import Qemu

pytestmark = pytest.mark.qemu

DISKIMG = [sys.executable, "-m", "diskimg"]
Prep = Callable[[Qemu, Path], None]


def _diskimg(*args: str | Path) -> None:
    res = subprocess.run([*DISKIMG, *map(str, args)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, f"diskimg {args}: {res.stdout}{res.stderr}"


def _pair(qemu: Qemu, tmp_path: Path, prep: Prep, args: Sequence[str],
          fmt: str = "qcow2") -> tuple[Path, Path]:
    """Prepare ``base`` with ``prep``, copy it to ``q`` and ``d`` and run ``args`` (``{}``
    stands for the image) with qemu-img on ``q`` and diskimg on ``d``."""
    base, q, d = (tmp_path / f"{n}.{fmt}" for n in ("base", "q", "d"))
    prep(qemu, base)
    for p in (q, d):
        shutil.copyfile(base, p)
    qemu.img(*[str(q) if a == "{}" else a for a in args])
    _diskimg(*[str(d) if a == "{}" else a for a in args])
    return q, d


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _same(qemu: Qemu, q: Path, d: Path, fmt: str = "qcow2", *, file_bytes: bool = True) -> None:
    assert qemu.map(d, fmt) == qemu.map(q, fmt)
    if fmt == "qcow2":
        qemu.check_clean(d)
        assert qemu.check(d)["image-end-offset"] == qemu.check(q)["image-end-offset"]
    assert qemu.compare(q, d, "-f", fmt, "-F", fmt) == 0
    if file_bytes:
        assert d.stat().st_size == q.stat().st_size
        # (hashes: a failing comparison of whole files would make pytest diff them)
        assert _sha(d) == _sha(q)


# --- convert -n: the target's freed clusters are reused where qemu reuses them ----------

def _source(qemu: Qemu, path: Path) -> None:
    qemu.img("create", "-q", "-f", "qcow2", path, "4M")
    qemu.io(path, "write -P 1 0 256k", "write -P 2 1M 128k", "write -P 3 3M 64k",
            "write -P 4 3200k 3k")


def _target(opts: str, *cmds: str, backing: bool = False) -> Prep:
    def prep(qemu: Qemu, path: Path) -> None:
        extra: list[str | Path] = []
        if backing:
            b = path.with_name("back.qcow2")
            qemu.img("create", "-q", "-f", "qcow2", b, "4M")
            qemu.io(b, "write -P 7 0 4M")
            extra = ["-b", b.name, "-F", "qcow2"]
        qemu.img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *extra,
                 path, "4M")
        if cmds:
            qemu.io(path, *cmds)
    return prep


CONVERT_TARGETS = {
    # data, then part of it discarded: the zero-writes of convert free more clusters,
    # and qemu puts the next data at the first of them
    "discarded": _target("", "write -P 9 0 2M", "discard 512k 1M"),
    # zero-allocated clusters (write -z without -u) are written in place by qemu
    "zero-allocated": _target("", "write -P 9 0 4M", "write -z 0 4M"),
    "backing": _target("", "write -P 9 0 2M", "discard 512k 1M", backing=True),
    "v2": _target("compat=0.10", "write -P 9 0 2M", "discard 512k 1M"),
}


@pytest.mark.parametrize("target", sorted(CONVERT_TARGETS))
def test_convert_n_reuses_freed_clusters_as_qemu(qemu: Qemu, tmp_path: Path,
                                                 target: str) -> None:
    src = tmp_path / "src.qcow2"
    _source(qemu, src)
    q, d = _pair(qemu, tmp_path, CONVERT_TARGETS[target],
                 ["convert", "-n", "-O", "qcow2", str(src), "{}"])
    _same(qemu, q, d)
    assert qemu.compare(src, d) == 0


# --- resize over a longer backing file: the new area reads as zeros, as in qemu ----------

def _backed(size: str, *cmds: str, opts: str = "") -> Prep:
    def prep(qemu: Qemu, path: Path) -> None:
        b = path.with_name("back.qcow2")
        qemu.img("create", "-q", "-f", "qcow2", b, "4M")
        qemu.io(b, "write -P 7 0 4M")
        qemu.img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []),
                 "-b", b.name, "-F", "qcow2", path, size)
        if cmds:
            qemu.io(path, *cmds)
    return prep


RESIZE_OVER_BACKING = {
    # past the backing file's end: qemu zero-flags all the new area, not only up to it
    "past-backing": (_backed("1M"), "6M", "off"),
    # metadata: preallocated first, then zeroed without unmapping (zero-allocated)
    "metadata": (_backed("1M"), "3M", "metadata"),
    "metadata-unaligned": (_backed("1000k", "write -P 1 900k 60k"), "6M", "metadata"),
    # falloc/full: the new clusters are zero-filled, so qemu sets no zero flag there
    "falloc-unaligned": (_backed("1000k"), "3M", "falloc"),
    "full": (_backed("1M"), "6M", "full"),
}


@pytest.mark.parametrize("case", sorted(RESIZE_OVER_BACKING))
def test_resize_over_longer_backing_zeroes_as_qemu(qemu: Qemu, tmp_path: Path,
                                                   case: str) -> None:
    prep, size, mode = RESIZE_OVER_BACKING[case]
    q, d = _pair(qemu, tmp_path, prep, ["resize", f"--preallocation={mode}", "{}", size])
    _same(qemu, q, d)
    # the guest sees zeros past the old size, never the backing file's 0x07
    assert qemu.raw_bytes(d)[1 << 20:].count(0) == qemu.info(d)["virtual-size"] - (1 << 20)


def test_resize_v2_over_longer_backing_is_refused_as_qemu(qemu: Qemu,
                                                          tmp_path: Path) -> None:
    """v2 has no zero flag: qemu-img 7.2 fails (``Failed to zero out new clusters``);
    diskimg fails the same way before anything is written."""
    d = tmp_path / "d.qcow2"
    _backed("1M", opts="compat=0.10")(qemu, d)
    before = d.read_bytes()
    res = subprocess.run([*DISKIMG, "resize", str(d), "3M"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    q = qemu.img("resize", d, "3M", ok=(1,))
    assert res.returncode == 1
    assert res.stderr == q.stderr.replace("qemu-img:", "diskimg:")
    assert d.read_bytes() == before


# --- resize --preallocation: qemu's layout; an unaligned old end is not written ---------

def _plain(size: str, *cmds: str) -> Prep:
    def prep(qemu: Qemu, path: Path) -> None:
        qemu.img("create", "-q", "-f", "qcow2", path, size)
        if cmds:
            qemu.io(path, *cmds)
    return prep


RESIZE_PREALLOC = {
    # the old last cluster, unallocated, is left alone (qemu writes nothing there)
    "off-unaligned": (_plain("1000k", "write -P 1 0 64k"), "off"),
    # ... or preallocated with its head copied as data and its tail left unwritten
    "metadata-unaligned": (_plain("1000k", "write -P 1 0 64k"), "metadata"),
    "metadata-zero-cluster": (_plain("1000k", "write -z 960k 40k"), "metadata"),
}


@pytest.mark.parametrize("case", sorted(RESIZE_PREALLOC))
def test_resize_preallocation_lays_out_as_qemu(qemu: Qemu, tmp_path: Path,
                                               case: str) -> None:
    prep, mode = RESIZE_PREALLOC[case]
    q, d = _pair(qemu, tmp_path, prep, ["resize", f"--preallocation={mode}", "{}", "6M"])
    _same(qemu, q, d)
    assert d.stat().st_blocks == q.stat().st_blocks


# --- resize --shrink: the freed data clusters are deallocated, as qemu does -------------

@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10"])
def test_resize_shrink_deallocates_freed_clusters_as_qemu(qemu: Qemu, tmp_path: Path,
                                                          opts: str) -> None:
    def prep(qemu: Qemu, path: Path) -> None:
        qemu.img("create", "-q", "-f", "qcow2", "-o", opts, path, "6M")
        # the data past the new end lies before other data in the file: not truncated
        qemu.io(path, "write -P 1 3M 1M", "write -P 2 0 1M", "write -c -P 3 5M 1M")

    q, d = _pair(qemu, tmp_path, prep, ["resize", "--shrink", "{}", "1000k"])
    _same(qemu, q, d)
    assert qemu.check(d).get("leaks", 0) == qemu.check(q).get("leaks", 0) == 0
    # the disk usage drops as qemu's (both files were copied whole, without holes)
    assert abs(d.stat().st_blocks - q.stat().st_blocks) * 512 < 65536
    assert q.stat().st_blocks * 512 < 2 << 20


# --- safe rebase: zeros past the old backing file's end become zero clusters -----------

def test_safe_rebase_writes_zero_clusters_as_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """(A v2 overlay gets the zeros as data from both tools.)"""
    old, new = tmp_path / "old.qcow2", tmp_path / "new.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", old, "1M")
    qemu.io(old, "write -P 1 0 1M")
    qemu.img("create", "-q", "-f", "qcow2", new, "4M")
    qemu.io(new, "write -P 2 1M 2M", "write -P 1 0 512k")

    def prep(qemu: Qemu, path: Path) -> None:
        qemu.img("create", "-q", "-f", "qcow2", "-b", old.name, "-F", "qcow2", path, "4M")
        qemu.io(path, "write -P 5 3M 64k", "write -z 2M 64k")

    q, d = _pair(qemu, tmp_path, prep, ["rebase", "-b", new.name, "-F", "qcow2", "{}"])
    _same(qemu, q, d)
