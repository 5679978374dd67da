"""qcow2.amend_refcount: rebuilding the refcount structures at a new width keeps every
cluster's refcount and every guest byte; the width check refuses before any write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import UsageError
from diskimg.hostio import open_host_file
from diskimg.qcow2.amend import read_header
from diskimg.qcow2.amend_refcount import (
    check_refcount_width,
    counts_after_rebuild,
    rebuild_refcounts,
)
from diskimg.qcow2.refcount import (
    REFT_OFFSET_MASK,
    Refcounts,
    max_refcount,
    refblock_entries,
    refcount_order_of,
)
from tests.unit.qcow2_amend_testlib import assert_clean, guest_sha256

MiB = 1 << 20


def test_check_refcount_width() -> None:
    check_refcount_width([0, 1, 1], 0, 512)
    check_refcount_width([0, 3, 2], 1, 512)
    check_refcount_width([(1 << 16) - 1], 4, 512)
    # qemu's message names the first cluster whose refcount does not fit
    for counts, order, where, value in (([0, 2, 3], 0, 0x10000, 2), ([1, 4], 1, 0x10000, 4),
                                        ([1 << 16], 4, 0, 1 << 16)):
        with pytest.raises(UsageError) as exc:
            check_refcount_width(counts, order, 65536)
        assert str(exc.value) == (f"Cannot decrease refcount entry width to {1 << order} "
                                  f"bits: Cluster at offset {where:#x} has a refcount of "
                                  f"{value}")


def _image(tmp_path: Path) -> Path:
    """Data, zero clusters and a snapshot (shared clusters have refcount 2)."""
    p = tmp_path / "r.qcow2"
    diskimg.create(p, "qcow2", 8 * MiB, options={"cluster_size": "4096"})
    with diskimg.open(p, "r+") as d:
        for i in range(40):
            d.write(i * 8192, bytes([i + 1]) * 4096)
        d.write_zeroes(2 * MiB, 16384)
    diskimg.snapshot(p, "create", "s")
    with diskimg.open(p, "r+") as d:
        d.write(0, b"\xee" * 4096)
    return p



def _counts(p: Path) -> list[int]:
    host = open_host_file(p, False)
    try:
        h = read_header(host)
        rc = Refcounts(host, h)
        return [rc.get(c) for c in range(-(-host.size() // h.cluster_size))]
    finally:
        host.close()



def test_counts_after_rebuild_drops_the_old_structures(tmp_path: Path) -> None:
    p = _image(tmp_path)
    now = _counts(p)
    host = open_host_file(p, False)
    try:
        h = read_header(host)
        after = counts_after_rebuild(host, h)
        rc = Refcounts(host, h)
        old = {h.refcount_table_offset // h.cluster_size}
        old |= {(e & REFT_OFFSET_MASK) // h.cluster_size for e in rc.table if e}
    finally:
        host.close()
    assert old and all(now[c] == 1 and after[c] == 0 for c in old)
    assert [v for c, v in enumerate(after) if c not in old] == \
        [v for c, v in enumerate(now) if c not in old]
    assert max(after) == 2  # the clusters the snapshot shares


@pytest.mark.parametrize("orders", [(1, 6, 4), (3, 5)])
def test_rebuild_keeps_refcounts_and_data(tmp_path: Path, orders: tuple[int, ...]) -> None:
    p = _image(tmp_path)
    guest = guest_sha256(p)
    for order in orders:
        host = open_host_file(p, True)
        try:
            h = read_header(host)
            before = counts_after_rebuild(host, h)
            rebuild_refcounts(host, h, order)
            assert read_header(host).refcount_order == order
        finally:
            host.close()
        now = _counts(p)
        # every cluster keeps its count; the new blocks and table at the end count 1
        assert now[:len(before)] == before
        assert now[len(before):] == [1] * (len(now) - len(before))
        assert_clean(p)
        assert guest_sha256(p) == guest


def test_rebuild_refuses_before_writing(tmp_path: Path) -> None:
    p = _image(tmp_path)
    raw = p.read_bytes()
    host = open_host_file(p, True)
    try:
        with pytest.raises(UsageError, match="to 1 bits: Cluster at offset 0x"):
            rebuild_refcounts(host, read_header(host), 0)
    finally:
        host.close()
    assert p.read_bytes() == raw


# --- the refcount-width rules amend_refcount uses (qcow2/refcount.py) ------------------


def test_refcount_width_rules() -> None:
    # docs/interop/qcow2.txt: refcount_order 0..6, a block holds cluster_size * 8 / bits
    assert [refcount_order_of(b) for b in (1, 2, 4, 8, 16, 32, 64)] == list(range(7))
    for bad in (0, -16, 3, 12, 128):
        with pytest.raises(UsageError) as exc:
            refcount_order_of(bad)
        assert str(exc.value) == ("Refcount width must be a power of two and may not "
                                  "exceed 64 bits")
    assert [refblock_entries(65536, o) for o in (0, 4, 6)] == [524288, 32768, 8192]
    assert [refblock_entries(512, o) for o in (0, 6)] == [4096, 64]
    assert [max_refcount(o) for o in range(7)] == [1, 3, 15, 255, 65535, (1 << 32) - 1,
                                                    (1 << 64) - 1]


@pytest.mark.qemu
def test_too_narrow_message_matches_qemu(tmp_path: Path, qemu_img: str) -> None:
    p = _image(tmp_path)  # refcount 2 on the clusters the snapshot shares
    q = tmp_path / "q.qcow2"
    q.write_bytes(p.read_bytes())
    raw = p.read_bytes()
    ref = subprocess.run([qemu_img, "amend", "-o", "refcount_bits=1", str(q)],
                         capture_output=True, text=True)
    mine = subprocess.run([sys.executable, "-m", "diskimg", "amend", "-o", "refcount_bits=1",
                           str(p)], capture_output=True, text=True)
    assert ref.returncode == mine.returncode == 1
    assert ref.stderr.removeprefix("qemu-img: ") == mine.stderr.removeprefix("diskimg: ")
    assert "Cluster at offset 0x" in mine.stderr
    assert p.read_bytes() == raw == q.read_bytes()
