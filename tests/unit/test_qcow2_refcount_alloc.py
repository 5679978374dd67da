"""qcow2.refcount.Refcounts: get/set/update/free, QEMU's allocation order (first fit from
``free_cluster_index``), new refcount blocks and refcount-table growth when an allocation
crosses what the metadata covers, and refusal at the maximum of a narrow refcount width.

The Refcounts object runs over a bytearray 'host file' holding an image diskimg created;
every test asserts offsets returned and bytes on that host.  The qemu-marked tests save
the bytes and let ``qemu-img check`` judge them, and compare the layout diskimg writes
with the one qemu-io writes for the same sequence of guest writes."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import CorruptImageError, DiskImgError
from diskimg.qcow2.layout import Header
from diskimg.qcow2.refcount import RefBlock, Refcounts, decode_refblock

CS = 512


class FakeHost:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        b = self.pread(offset, length)
        assert len(b) == length, f"short read of {what} at {offset:#x}"
        return b

    def pwrite(self, offset: int, data: bytes) -> None:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(data)] = data
        self.writes.append((offset, len(data)))

    def flush(self) -> None:
        self.flushes += 1


def _image(tmp_path: Path, refcount_bits: int = 16, cs: int = CS) -> tuple[Path, FakeHost]:
    path = tmp_path / f"r{refcount_bits}.qcow2"
    diskimg.create(path, "qcow2", 64 << 20,
                   options={"cluster_size": str(cs), "refcount_bits": str(refcount_bits)})
    return path, FakeHost(path.read_bytes())


def _refcounts(host: FakeHost) -> Refcounts:
    header = Header.parse(bytes(host.data[:4096]), len(host.data))
    return Refcounts(host, header)  # type: ignore[arg-type]


def _disk_refcount(host: FakeHost, cluster: int) -> int:
    """Refcount of ``cluster`` as the bytes on the host say (header -> table -> block)."""
    h = Header.parse(bytes(host.data[:4096]), len(host.data))
    cs = h.cluster_size
    per_block = cs * 8 >> h.refcount_order
    ri, i = divmod(cluster, per_block)
    if ri >= h.refcount_table_clusters * cs // 8:
        return 0
    (blk,) = struct.unpack_from(">Q", host.data, h.refcount_table_offset + 8 * ri)
    if not blk:
        return 0
    return decode_refblock(bytes(host.data[blk:blk + cs]), h.refcount_order)[i]


def _used(rc: Refcounts, end: int) -> list[int]:
    return [c for c in range(end) if rc.get(c)]


def test_fresh_image_layout_and_get(tmp_path: Path) -> None:
    _, host = _image(tmp_path)
    rc = _refcounts(host)
    assert rc.max_refcount == 0xFFFF and rc.block_bits == 8  # 256 entries per block
    used = _used(rc, 64)
    assert used == [c for c in range(64) if _disk_refcount(host, c)]
    assert used == list(range(len(used))) and all(rc.get(c) == 1 for c in used)
    assert rc.get(1 << 40) == 0  # beyond the table: free


def test_first_fit_allocation_order(tmp_path: Path) -> None:
    _, host = _image(tmp_path)
    rc = _refcounts(host)
    n0 = len(_used(rc, 64))  # header, table, block, L1 ... are taken
    assert rc.alloc(1) == n0 * CS
    assert rc.alloc(3) == (n0 + 1) * CS
    assert rc.free_cluster_index == n0 + 4
    rc.free((n0 + 1) * CS, CS)  # a one-cluster hole; the free index moves back to it
    assert rc.free_cluster_index == n0 + 1
    assert rc.get(n0 + 1) == 0
    assert rc.alloc(2) == (n0 + 4) * CS  # the hole is too small: first fit after it
    assert rc.alloc(1) == (n0 + 6) * CS  # the index moved past the hole: qemu's order
    rc.free((n0 + 2) * CS, 2 * CS)  # hole [n0+1, n0+4), but the index is n0+2
    assert rc.free_cluster_index == n0 + 2
    assert rc.alloc(3) == (n0 + 7) * CS  # first fit from the index, not from 0
    assert rc.alloc(2) == (n0 + 10) * CS  # and moves on from there
    assert rc.free_cluster_index == n0 + 12
    expect = [1, 0, 0, 0] + [1] * 8 + [0]
    assert [rc.get(c) for c in range(n0, n0 + 13)] == expect
    # nothing reaches the host before a flush; afterwards the bytes agree
    assert [_disk_refcount(host, c) for c in range(n0, n0 + 13)] == [0] * 13
    rc.flush()
    assert [_disk_refcount(host, c) for c in range(n0, n0 + 13)] == expect


def test_set_update_and_refusals(tmp_path: Path) -> None:
    _, host = _image(tmp_path)
    rc = _refcounts(host)
    c = rc.alloc(1) // CS
    assert rc.update(c, 2) == 3
    rc.set(c + 5, 0xFFFF)
    rc.flush()
    assert _disk_refcount(host, c) == 3 and _disk_refcount(host, c + 5) == 0xFFFF
    before = bytes(host.data)
    with pytest.raises(CorruptImageError, match="overflow"):
        rc.update(c + 5, 1)
    with pytest.raises(CorruptImageError, match="negative"):
        rc.update(c + 1, -1)
    with pytest.raises(CorruptImageError, match="overflow"):
        rc.set(c, -1)
    rc.flush()
    assert bytes(host.data) == before
    assert rc.update(c, -3) == 0 and rc.free_cluster_index == c
    assert rc.alloc(1) == c * CS


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_narrow_refcounts_refuse_past_their_maximum(tmp_path: Path, bits: int) -> None:
    _, host = _image(tmp_path, refcount_bits=bits)
    rc = _refcounts(host)
    top = (1 << bits) - 1
    assert rc.max_refcount == top
    c = rc.alloc(2) // CS
    rc.update(c, top - 1)
    rc.flush()
    assert _disk_refcount(host, c) == top and _disk_refcount(host, c + 1) == 1
    before = bytes(host.data)
    with pytest.raises(CorruptImageError) as e:
        rc.update(c, 1)
    assert isinstance(e.value, DiskImgError) and f"{top + 1} > {top}" in str(e.value)
    with pytest.raises(CorruptImageError):
        rc.set(c + 1, top + 1)
    assert rc.get(c) == top and rc.get(c + 1) == 1  # the refusal changed nothing
    rc.flush()
    assert bytes(host.data) == before


def test_alloc_bytes_starts_a_new_cluster_at_refcount_maximum(tmp_path: Path) -> None:
    _, host = _image(tmp_path, refcount_bits=1)
    rc = _refcounts(host)
    a = rc.alloc_bytes(100)
    assert a % CS == 0
    # with 1-bit refcounts a shared cluster cannot count a second user: a new cluster
    assert rc.alloc_bytes(100) == a + CS
    (tmp_path / "16").mkdir()
    _, host16 = _image(tmp_path / "16")
    rc16 = _refcounts(host16)
    b = rc16.alloc_bytes(100)
    assert rc16.alloc_bytes(100) == b + 100  # packed into the same host cluster
    assert rc16.get(b // CS) == 2
    assert rc16.alloc_bytes(400) == b + 200  # straddles into the next cluster
    assert rc16.get(b // CS) == 3 and rc16.get(b // CS + 1) == 1


def test_crossing_a_block_makes_a_self_describing_block(tmp_path: Path) -> None:
    _, host = _image(tmp_path)  # 16-bit refcounts, 256 clusters per block
    rc = _refcounts(host)
    n0 = len(_used(rc, 256))
    table0 = bytes(host.data[rc.header.refcount_table_offset:][:16])
    assert table0[8:] == bytes(8)  # block 1 does not exist yet
    assert rc.alloc(256 - n0) == n0 * CS  # exactly fills block 0's range
    assert rc.alloc(1) == 256 * CS  # the first free cluster: block 1 is missing...
    (entry1,) = struct.unpack_from(">Q", host.data, rc.header.refcount_table_offset + 8)
    assert entry1 == 257 * CS  # ...so it is made at the next free cluster, table entry
    assert (257 * CS, CS) in host.writes  # and block are written (unlike cached blocks)
    blk = RefBlock(4, bytes(host.data[257 * CS:258 * CS]))
    assert blk[1] == 1 and blk[0] == 0  # the new block counts itself, not yet the data
    assert rc.alloc(1) == 258 * CS
    rc.flush()
    assert [_disk_refcount(host, c) for c in range(254, 260)] == [1, 1, 1, 1, 1, 0]


def test_run_straddling_a_block_boundary(tmp_path: Path) -> None:
    _, host = _image(tmp_path)
    rc = _refcounts(host)
    n0 = len(_used(rc, 256))
    rc.alloc(250 - n0)  # clusters up to 249 used
    assert rc.alloc(10) == 250 * CS  # [250, 260) spans block 0 and block 1
    assert rc.table[1] == 260 * CS  # block 1 lands right after the run
    assert rc.free_cluster_index == 260  # the retry found the same run again
    assert rc.alloc(6) == 261 * CS
    rc.flush()
    assert [_disk_refcount(host, c) for c in range(248, 269)] == [1] * 19 + [0, 0]


def _alloc_until_table_moves(rc: Refcounts) -> list[int]:
    """Allocate runs of 100 clusters until the refcount table moves; their first clusters."""
    old_table = rc.header.refcount_table_offset
    got = []
    while rc.header.refcount_table_offset == old_table:
        got.append(rc.alloc(100) // CS)
        assert len(got) < 50
    return got


def test_refcount_table_grows_when_a_run_crosses_its_coverage(tmp_path: Path) -> None:
    """64-bit refcounts, 512-byte clusters: 64 entries per block, and the one-cluster
    refcount table covers 64 blocks = 4096 clusters.  Allocate until a run needs more."""
    _, host = _image(tmp_path, refcount_bits=64)
    rc = _refcounts(host)
    assert rc.block_bits == 6 and rc.header.refcount_table_clusters == 1
    old_table = rc.header.refcount_table_offset
    assert old_table == CS and len(rc.table) == 64
    got = _alloc_until_table_moves(rc)
    assert got[-2] + 100 <= 4096 < got[-1] + 100  # the last run crossed the coverage
    for a, b in zip(got, got[1:]):
        assert b >= a + 100  # runs never overlap
    # the header switched to the new table (bytes 48..59) and names what rc uses
    new_off, new_clusters = struct.unpack_from(">QI", host.data, 48)
    assert (new_off, new_clusters) == (rc.header.refcount_table_offset,
                                       rc.header.refcount_table_clusters)
    # the last run [3997, 4097) needed block 63, made at 4097 (beyond the old table's
    # 4096 clusters, so block 64 at 4098 and a new area): the area starts at the next
    # block boundary, 4160, with blocks 65 and 66, then the two-cluster table
    assert got[-1] == 3997
    assert [e // CS for e in rc.table[62:67]] == [3996, 4097, 4098, 4160, 4161]
    assert (new_off, new_clusters) == (4162 * CS, 2) and len(rc.table) == 128
    rc.flush()
    assert _disk_refcount(host, old_table // CS) == 0  # the old table is freed
    for c in range(new_off // CS, new_off // CS + new_clusters):
        assert _disk_refcount(host, c) == 1
    # the on-disk table is the one in memory, and every block it names counts itself
    raw = bytes(host.data[new_off:new_off + new_clusters * CS])
    entries = [struct.unpack_from(">Q", raw, 8 * i)[0] for i in range(len(rc.table))]
    assert entries == list(rc.table)
    blocks = [e // CS for e in entries if e]
    assert len(blocks) >= 65
    for b in blocks:
        assert _disk_refcount(host, b) == 1
    for first in got:
        assert not set(range(first, first + 100)) & set(blocks)
        assert all(_disk_refcount(host, c) == 1 for c in range(first, first + 100))


@pytest.mark.qemu
@pytest.mark.parametrize("bits", [1, 16, 64])
def test_qemu_check_counts_exactly_the_allocations_as_leaks(
        tmp_path: Path, bits: int, qemu_img: str, run: Callable[..., object]) -> None:
    """What Refcounts writes is consistent for qemu: nothing corrupt, and the clusters it
    allocated (referenced by no L2 table) are exactly the leaks qemu finds."""
    path, host = _image(tmp_path, refcount_bits=bits)
    rc = _refcounts(host)
    got = _alloc_until_table_moves(rc) if bits == 64 else [rc.alloc(100) // CS
                                                          for _ in range(6)]
    rc.free(got[1] * CS, 100 * CS)  # a freed run is neither used nor leaked
    rc.flush()
    end = max(got) + 100  # the caller writes the data: the file reaches the last run
    path.write_bytes(bytes(host.data) + bytes(max(0, end * CS - len(host.data))))
    res = run([qemu_img, "check", "--output=json", path], check=3)  # 3: leaks only
    report = json.loads(res.stdout)  # type: ignore[attr-defined]
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0
    assert report["leaks"] == 100 * (len(got) - 1)


@pytest.mark.qemu
def test_allocation_order_matches_qemu_io(tmp_path: Path, qemu_img: str, qemu_io: str,
                                          run: Callable[..., object]) -> None:
    """The same guest writes (data clusters, L2 tables and new refcount blocks all
    allocated as the writes come) land at the same host offsets as qemu-io puts them,
    across several refcount-block boundaries (256 clusters each)."""
    q = tmp_path / "q.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=512,refcount_bits=16", q, "64M"])
    d = tmp_path / "d.qcow2"
    d.write_bytes(q.read_bytes())
    # (guest cluster, clusters): multi-cluster writes, some far apart (new L2 tables)
    writes = [((i * 37) % 700 + (i % 3) * 20000, 1 + i % 5) for i in range(250)]
    cmds: list[str] = []
    for i, (c, n) in enumerate(writes):
        cmds += ["-c", f"write -P {i % 255 + 1} {c * CS} {n * CS}"]
    run([qemu_io, "-f", "qcow2", *cmds, q])
    with diskimg.open(d, "r+") as img:
        for i, (c, n) in enumerate(writes):
            img.write(c * CS, bytes([i % 255 + 1]) * (n * CS))
    qmap = run([qemu_img, "map", "--output=json", q]).stdout  # type: ignore[attr-defined]
    dmap = run([qemu_img, "map", "--output=json", d]).stdout  # type: ignore[attr-defined]
    assert dmap == qmap
    assert len(json.loads(qmap)) > 100  # the writes did scatter
    assert q.stat().st_size > 520 * CS  # past two refcount-block boundaries
    assert run([qemu_img, "check", d]).returncode == 0  # type: ignore[attr-defined]
    run([qemu_img, "compare", q, d])


@pytest.mark.qemu
def test_refcount_table_growth_matches_qemu_io(tmp_path: Path, qemu_img: str,
                                               qemu_io: str,
                                               run: Callable[..., object]) -> None:
    """Sequential guest writes that outgrow a one-cluster refcount table (64-bit
    refcounts, 512-byte clusters: 4096 clusters covered): the new table lands where
    qemu puts it, with the same entries, and every data cluster where qemu puts it."""
    q = tmp_path / "q.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=512,refcount_bits=64", q, "64M"])
    d = tmp_path / "d.qcow2"
    d.write_bytes(q.read_bytes())
    chunk = 100 * CS
    cmds: list[str] = []
    for i in range(45):
        cmds += ["-c", f"write -P {i + 1} {i * chunk} {chunk}"]
    run([qemu_io, "-f", "qcow2", *cmds, q])
    with diskimg.open(d, "r+") as img:
        for i in range(45):
            img.write(i * chunk, bytes([i + 1]) * chunk)
    qb, db = q.read_bytes(), d.read_bytes()
    q_off, q_clusters = struct.unpack_from(">QI", qb, 48)
    assert q_clusters > 1  # qemu grew the table too
    assert struct.unpack_from(">QI", db, 48) == (q_off, q_clusters)
    assert db[q_off:q_off + q_clusters * CS] == qb[q_off:q_off + q_clusters * CS]
    assert len(db) == len(qb)
    qmap = run([qemu_img, "map", "--output=json", q]).stdout  # type: ignore[attr-defined]
    assert run([qemu_img, "map", "--output=json", d]).stdout == qmap  # type: ignore[attr-defined]
    assert run([qemu_img, "check", d]).returncode == 0  # type: ignore[attr-defined]
    run([qemu_img, "compare", q, d])


@pytest.mark.parametrize("exact, clusters", [(True, 1), (False, 2)])
def test_refcount_area_headroom(tmp_path: Path, exact: bool, clusters: int) -> None:
    """QEMU's qcow2_refcount_area: a new table for 12800 clusters (16-bit refcounts: 256
    per block, so 51 blocks with the area itself) fits one table cluster of 64 entries
    exactly; with the 50% headroom of a growing image it takes two."""
    _, host = _image(tmp_path)
    rc = _refcounts(host)
    end = rc.refcount_area(12800, 0, exact=exact)
    # one new block (index 50, covering the area) at the area's start, then the table;
    # the blocks before the area are not made (nothing there is in use)
    assert rc.table[50] == 12800 * CS and not any(rc.table[1:50])
    assert not any(rc.table[51:])
    assert rc.header.refcount_table_offset == 12801 * CS
    assert rc.header.refcount_table_clusters == clusters
    assert end == 12801 + clusters
    assert struct.unpack_from(">QI", host.data, 48) == (12801 * CS, clusters)
    rc.flush()
    assert [_disk_refcount(host, c) for c in range(12799, 12801 + clusters + 1)] == (
        [0] + [1] * (1 + clusters) + [0])
    assert _disk_refcount(host, 1) == 0  # the old table cluster is free
