"""Snapshot limits as qemu-img 7.2 meets them (issue 17 item 7): a full snapshot table
(65536 entries) refuses another snapshot in qemu's ``-27 (File too large)`` form and
changes no byte; ``snapshot -c NAME`` names the snapshot by the first 255 bytes of NAME,
as qemu-img's 256-byte name buffer does."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.cli.main import main
from diskimg.qcow2 import header_io
from diskimg.qcow2.layout import QCOW_MAX_SNAPSHOTS
from diskimg.qcow2.snapshot_table import Snapshot, pack_table_exact

pytestmark = pytest.mark.qemu


def dimg(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def full_table(path: Path) -> None:
    """A qcow2 image (no data) with QCOW_MAX_SNAPSHOTS snapshots that all share one
    one-cluster L1 table (all zeros, as the active one: 64-bit refcounts count the
    65536 references), laid out with the refcount allocator and the snapshot-table
    codec: one table write, one header write."""
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", path, "64k")
    with diskimg.open(path, "r+") as img:
        rc, cs = img.refcounts, img.cs
        l1 = rc.alloc(1)
        rc.update(l1 // cs, QCOW_MAX_SNAPSHOTS - 1)
        snaps = [Snapshot(str(i + 1), f"s{i + 1}", l1, len(img.l1), disk_size=img.size)
                 for i in range(QCOW_MAX_SNAPSHOTS)]
        table = pack_table_exact(snaps)
        at = rc.alloc(-(-len(table) // cs))
        img.flush_refcounts()
        img.host.pwrite(l1, bytes(cs))
        img.host.pwrite(at, table)
        img.host.flush()
        header_io.set_snapshots(img.host, QCOW_MAX_SNAPSHOTS, at)
        img.host.flush()


def test_full_snapshot_table_is_refused_as_qemu(tmp_path: Path) -> None:
    src = tmp_path / "full.qcow2"
    full_table(src)
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, d)
    before = sha(src)

    def name(p: Path, aio: str) -> list[str]:
        # qemu reads the 65536 entries with four preads each: through its thread pool
        # that takes ~10 s, through io_uring ~1 s (diskimg takes the option, unused)
        return ["--image-opts", f"driver=qcow2,file.filename={p},file.aio={aio}"]

    aio = "io_uring"
    ref = QEMU.img("snapshot", "-c", "one-more", *name(q, aio), ok=None)
    if "io_uring" in ref.stderr:  # a kernel without it
        aio = "threads"
        ref = QEMU.img("snapshot", "-c", "one-more", *name(q, aio), ok=None)
    rc, out, err = dimg("snapshot", "-c", "one-more", *name(d, aio))
    # qemu opened the image (it read every entry diskimg's codec wrote) and refused
    assert ref.stderr == "qemu-img: Could not create snapshot 'one-more': -27 (File too large)\n"
    assert (rc, out, err.replace("diskimg:", "qemu-img:")) == (ref.returncode, ref.stdout,
                                                               ref.stderr)
    assert sha(q) == sha(d) == before
    assert "No errors were found" in QEMU.img("check", *name(src, aio)).stdout


def test_long_snapshot_name_keeps_its_first_255_bytes_as_qemu(tmp_path: Path) -> None:
    """400 bytes of 'é': qemu-img keeps 255 of them, the last character cut in two."""
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    for p in (q, d):
        QEMU.img("create", "-q", "-f", "qcow2", p, "1M")
    name = "é" * 200
    QEMU.img("snapshot", "-c", name, q)
    assert dimg("snapshot", "-c", name, d)[0] == 0
    QEMU.check_clean(d)
    names = [[s["name"] for s in json.loads(QEMU.img("info", "--output=json", p).stdout)
              ["snapshots"]] for p in (q, d)]
    assert names[0] == names[1] == ["é" * 127 + "\ufffd"]
    # and it is found by those bytes, as qemu finds it
    cut = (name.encode()[:255]).decode("utf-8", "surrogateescape")
    assert dimg("snapshot", "-d", cut, d)[0] == 0
    assert QEMU.img("snapshot", "-l", d).stdout == ""
