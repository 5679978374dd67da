"""``check``'s whole-table fast path: an L2 table whose entries are all plain data
clusters is counted without the entry-by-entry walk, and with COPIED set on every entry
and stored refcounts of 1 it is cleared for OFLAG_COPIED in one pass.  Every image here
is checked by both tools: the output, exit code and repair must match qemu-img's."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.qcow2 import entries as E
from diskimg.qcow2.check import refcounts as C_copied
from diskimg.qcow2.check import walk as C

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]
MiB = 1 << 20


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def _first_data_cluster(img: Path) -> tuple[int, int]:
    """(host cluster index, byte offset of its stored 16-bit refcount)."""
    with open(img, "rb") as f:
        hdr = f.read(104)
        cb = struct.unpack_from(">I", hdr, 20)[0]
        l1_off, rt_off = struct.unpack_from(">QQ", hdr, 40)
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_off)
        ents = struct.unpack(f">{(1 << cb) // 8}Q", f.read(1 << cb))
        host = next(e for e in ents if e) & 0x00FFFFFFFFFFFE00
        f.seek(rt_off)
        rb_off = struct.unpack(">Q", f.read(8))[0]
    k = host >> cb
    return k, rb_off + 2 * k


def _set_refcount(value: int) -> Callable[[Path], None]:
    def damage(img: Path) -> None:
        _, at = _first_data_cluster(img)
        with open(img, "r+b") as f:
            f.seek(at)
            f.write(struct.pack(">H", value))
    return damage


def _cut_last_cluster(img: Path) -> None:
    with open(img, "r+b") as f:
        f.truncate(f.seek(0, 2) - 65536)


def _make(tmp: Path, refbits: int = 16, backwards: bool = False,
          snapshot: bool = False) -> Path:
    img = tmp / "img.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={refbits}", img, "64M")
    offsets = list(range(0, 48 * MiB, 3 * MiB))
    if backwards:  # host order the reverse of guest order: every cluster run fragmented
        offsets.reverse()
    cmds = [c for i, off in enumerate(offsets) for c in ("-c", f"write -P {i + 1} {off} 1M")]
    subprocess.run([QEMU_IO, "-f", "qcow2", *cmds, img], check=True, capture_output=True)
    if snapshot:  # shared clusters: refcount 2, COPIED clear
        QEMU.img("snapshot", "-c", "s1", img)
        subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 99 0 2M", img], check=True,
                       capture_output=True)
    return img


def _reftable_entry(index_from_end: int, value: Callable[[int], int]) -> Callable[[Path], None]:
    """Set the refcount table entry ``index_from_end`` places before the table's end to
    ``value(first refcount block's offset)``: check reads the table up to its last non-zero
    entry only, so an entry far behind the zeros must still be found."""
    def damage(img: Path) -> None:
        with open(img, "r+b") as f:
            hdr = f.read(104)
            cs = 1 << struct.unpack_from(">I", hdr, 20)[0]
            rt_off, rt_clusters = struct.unpack_from(">QI", hdr, 48)
            f.seek(rt_off)
            rb_off = struct.unpack(">Q", f.read(8))[0]
            f.seek(rt_off + rt_clusters * cs - 8 * index_from_end)
            f.write(struct.pack(">Q", value(rb_off)))
    return damage


def _l2_slot(img: Path, l1_index: int, index: int) -> int:
    """File offset of entry ``index`` of the L2 table of L1 entry ``l1_index``."""
    with open(img, "rb") as f:
        hdr = f.read(104)
        l1_off = struct.unpack_from(">Q", hdr, 40)[0]
        f.seek(l1_off + 8 * l1_index)
        return (struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00) + 8 * index


def _duplicate_entry(l1_index: int, index: int) -> Callable[[Path], None]:
    """Entry ``index`` of L1 entry ``l1_index``'s L2 table becomes a copy of entry 5 of
    the first table (a cluster referenced twice: refcount 1 too low, COPIED wrong; with
    1-bit refcounts an overflow)."""
    def damage(img: Path) -> None:
        src, dst = _l2_slot(img, 0, 5), _l2_slot(img, l1_index, index)
        with open(img, "r+b") as f:
            f.seek(src)
            ent = f.read(8)
            f.seek(dst)
            f.write(ent)
    return damage


def _second_table(img: Path) -> None:
    """A second L2 table (guest 512 MiB on), plain, whose entry 3 is a copy of entry 5
    of the first table."""
    QEMU.img("resize", "-q", img, "1G")
    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 7 512M 1M", img], check=True,
                   capture_output=True)
    _duplicate_entry(1, 3)(img)


CASES: dict[str, tuple[dict[str, object], Callable[[Path], None] | None]] = {
    "shared-cluster-one-table": ({}, _duplicate_entry(0, 40)),
    "shared-cluster-two-tables": ({}, _second_table),
    "refcount-bits-1-overflow": ({"refbits": 1}, _duplicate_entry(0, 40)),
    "clean": ({}, None),
    "fragmented": ({"backwards": True}, None),
    "snapshot": ({"snapshot": True}, None),
    "refcount-bits-1": ({"refbits": 1}, None),
    "refcount-bits-64": ({"refbits": 64}, None),
    "refcount-too-high": ({}, _set_refcount(2)),
    "refcount-zero": ({}, _set_refcount(0)),
    "data-past-eof": ({}, _cut_last_cluster),
    "reftable-last-entry-unaligned": ({}, _reftable_entry(1, lambda rb: rb + 512)),
    "reftable-entry-outside": ({}, _reftable_entry(3, lambda rb: rb + (256 << 20))),
}


@pytest.mark.parametrize("case", CASES)
def test_check_and_repair_same_as_qemu(case: str, tmp_path: Path) -> None:
    kw, damage = CASES[case]
    pristine = _make(tmp_path, **kw)  # type: ignore[arg-type]
    if damage is not None:
        damage(pristine)
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    for args in (["check"], ["check", "--output=json"], ["check", "-r", "all"]):
        shutil.copy(pristine, q)
        shutil.copy(pristine, d)
        want = _run(QEMU_IMG, *args, q)
        got = _run(sys.executable, "-m", "diskimg", *args, d)
        assert got.returncode == want.returncode, (args, got.stderr, want.stderr)
        if args[-1] == "--output=json":
            doc = json.loads(got.stdout)
            doc.pop("findings", None)
            want_doc = json.loads(want.stdout)
            doc.pop("filename", None)
            want_doc.pop("filename", None)
            assert doc == want_doc
        else:
            assert got.stdout.replace("d.qcow2", "q.qcow2") == want.stdout, args
        if "-r" in args:
            assert d.read_bytes() == q.read_bytes()


def test_clean_tables_skip_the_entry_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The point of the fast path: a clean (here fragmented) image is checked without
    classifying a single L2 entry, and the counts are qemu-img's."""
    img = _make(tmp_path, backwards=True)
    calls: list[int] = []
    real = C.cluster_type

    def spy(e: int, *, extended: bool, has_data_file: bool) -> E.ClusterType:
        calls.append(e)
        return real(e, extended=extended, has_data_file=has_data_file)

    for mod in (C, C_copied):  # the check's two L2 walks (references, OFLAG_COPIED)
        monkeypatch.setattr(mod, "cluster_type", spy)
    from diskimg.cli.main import main

    assert main(["check", "--output=json", str(img)]) == 0
    assert calls == []
    mine = json.loads(capsys.readouterr().out)
    theirs = json.loads(_run(QEMU_IMG, "check", "--output=json", img).stdout)
    assert theirs["fragmented-clusters"] > 0
    for key in ("allocated-clusters", "fragmented-clusters", "total-clusters",
                "image-end-offset"):
        assert mine[key] == theirs[key], key
