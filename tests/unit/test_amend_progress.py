"""qcow2/amend_progress.py: the replay of qemu's refcount-width walks never writes to the
image, and the step helper combines steps as qemu's amend callback does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import diskimg
from diskimg.hostio import open_host_file
from diskimg.qcow2.amend_header import read_header
from diskimg.qcow2.amend_progress import AmendStatus, refcount_walk_calls


def test_walk_replay_changes_no_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 8 << 20, options={"cluster_size": 512})
    with diskimg.open(path, "r+") as img:
        img.write(0, b"\x11" * (3 << 20))
        img.write(6 << 20, b"\x22" * 100_000)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_host_file(path, True) as host:  # read-write, as amend holds it
        h = read_header(host)
        walks, write, refused = refcount_walk_calls(host, h, 5)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not refused
    size = h.refcount_table_clusters * h.cluster_size // 8
    assert walks[0] == (0, 3 * size) and len(walks) % (size + 1) == 0
    n = len(walks) // (size + 1)  # allocation walks
    assert write[0] == (n * size, (n + 1) * size) and write[-1] == ((n + 1) * size,) * 2
    offsets = [o for o, _t in walks + write]
    assert offsets == sorted(offsets)


def test_refused_walk_stops_at_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    diskimg.create(path, "qcow2", 4 << 20)
    with diskimg.open(path, "r+") as img:
        img.write(0, b"\x33" * 65536)
        img.snapshots.create("s")  # the cluster's refcount is 2 now
    with open_host_file(path, False) as host:
        h = read_header(host)
        walks, write, refused = refcount_walk_calls(host, h, 0)
    assert refused and write == []
    assert walks == [(0, 3 * 8192)]  # the first table entry covers the cluster


def test_steps_are_added_and_projected() -> None:
    got: list[tuple[int, int]] = []
    status = AmendStatus(2, lambda o, t: got.append((o, t)))
    status.replay("upgrade", [(0, 2), (1, 2), (2, 2)])
    status.replay("refcount", [(0, 10), (10, 10)])
    # the first step's total is projected onto the second; then the first's is added
    assert got == [(0, 4), (1, 4), (2, 4), (2, 12), (12, 12)]
