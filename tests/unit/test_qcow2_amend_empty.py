"""qcow2.amend_empty: emptying an image after commit, both ways QEMU does it -- rebuilt
from scratch (file truncated to header, refcount table and block, L1) or every cluster
discarded (snapshots keep their data) -- leaves the image reading its backing file."""

from __future__ import annotations

from pathlib import Path

import diskimg
from diskimg.hostio import open_host_file
from diskimg.qcow2 import entries as E
from diskimg.qcow2.amend import read_header
from diskimg.qcow2.amend_empty import make_empty
from tests.unit.qcow2_amend_testlib import assert_clean

MiB = 1 << 20


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    diskimg.create(base, "qcow2", 2 * MiB)
    with diskimg.open(base, "r+") as d:
        d.write(0, b"\x55" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", 2 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with diskimg.open(top, "r+") as d:
        d.write(0, b"\x11" * 65536)
        d.write_zeroes(MiB, 65536)
        d.write(MiB + 65536, b"\x22" * 4096)
    return base, top


def _empty(p: Path) -> None:
    host = open_host_file(p, True)
    try:
        make_empty(host, read_header(host))
    finally:
        host.close()



def test_make_completely_empty(tmp_path: Path) -> None:
    _base, top = _pair(tmp_path)
    _empty(top)
    host = open_host_file(top, False)
    try:
        h = read_header(host)
    finally:
        host.close()
    cs = h.cluster_size
    # header, refcount table, refcount block, one L1 cluster: nothing else
    assert top.stat().st_size == 4 * cs
    assert (h.refcount_table_offset, h.l1_table_offset) == (cs, 3 * cs)
    with diskimg.open(top) as d:
        assert d.read(0, d.size) == b"\x55" * (2 * MiB)
    assert_clean(top)


def test_discard_all_keeps_snapshots(tmp_path: Path) -> None:
    _base, top = _pair(tmp_path)
    with diskimg.open(top) as d:
        at_snapshot = d.read(0, d.size)
    diskimg.snapshot(top, "create", "s")
    with diskimg.open(top, "r+") as d:
        d.write(4096, b"\x33" * 4096)  # the active L2 table is no longer shared
    _empty(top)
    with diskimg.open(top) as d:
        assert d.read(0, d.size) == b"\x55" * (2 * MiB)
    assert_clean(top)
    diskimg.snapshot(top, "apply", "s")
    with diskimg.open(top) as d:
        assert d.read(0, d.size) == at_snapshot
    assert_clean(top)


def test_compressed_host_clusters() -> None:
    # the clusters a compressed descriptor's bytes touch (each freed once by make_empty)
    cb = 16
    one = E.encode_compressed(3 * 65536 + 1000, 2000, cb)
    assert E.compressed_host_clusters(one, cb) == range(3, 4)
    two = E.encode_compressed(4 * 65536 - 700, 1500, cb)  # crosses into cluster 4
    assert E.compressed_host_clusters(two, cb) == range(3, 5)
    assert E.decode_compressed(two, cb)[0] == 4 * 65536 - 700
