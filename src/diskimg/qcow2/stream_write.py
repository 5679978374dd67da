"""Writing a qcow2 image front to back into a :class:`~diskimg.hostio.sink.Sink` (a pipe,
a socket, stdout): the metadata first, laid out from the source's map, then the data
clusters in guest order (issue 18 item 2).

Two passes over the source: :func:`plan` walks its block status once and keeps the runs
of guest clusters that hold data (one entry per run: memory follows the map, not the
size); :func:`write` then emits, in file order::

    header cluster | refcount table | refcount blocks | L1 table | L2 tables | data

Every cluster has refcount 1 (so every L1 and L2 entry carries COPIED), nothing leaks,
and the refcount blocks count exactly the clusters written.  The header, refcount-block,
table and entry rules are the existing codecs' (``layout.Header``, ``refcount.RefBlock``,
``refcount_metadata_clusters``, ``entries.QCOW_OFLAG_COPIED``).  Compressed, encrypted,
extended-L2 and external-data-file images cannot be laid out this way and are refused
by the caller.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from typing import Any

from diskimg.device import BlockDevice
from diskimg.errors import UsageError
from diskimg.hostio.sink import Sink
from diskimg.qcow2.entries import pack_be_u64_array
from diskimg.qcow2.create import plan_header
from diskimg.qcow2.entries import QCOW_OFLAG_COPIED
from diskimg.qcow2.layout import QCOW2_INCOMPAT_EXTL2, Header
from diskimg.qcow2.refcount import RefBlock, refblock_entries, refcount_metadata_clusters

#: data clusters read from the source per request (bytes, at least one cluster)
READ = 2 << 20


class StreamPlan:
    """Where everything goes: the header, the data runs and the file layout."""

    def __init__(self, h: Header, runs: list[tuple[int, int]]) -> None:
        self.h = h
        self.runs = runs                    # (first guest cluster, count), ascending
        cs = h.cluster_size
        self.cs = cs
        self.epl = cs // 8                  # L2 entries per table
        self.data_clusters = sum(n for _, n in runs)
        self.l2_tables = sorted({t for first, n in runs
                                 for t in range(first // self.epl,
                                                (first + n - 1) // self.epl + 1)})
        self.l1_clusters = -(-h.l1_size * 8 // cs)
        fixed = 1 + self.l1_clusters + len(self.l2_tables) + self.data_clusters
        self.rb, self.rt = refcount_metadata_clusters(fixed, cs, h.refcount_order)
        self.rt_at = 1
        self.rb_at = self.rt_at + self.rt
        self.l1_at = self.rb_at + self.rb
        self.l2_at = self.l1_at + self.l1_clusters
        self.data_at = self.l2_at + len(self.l2_tables)
        self.clusters = self.data_at + self.data_clusters
        h.refcount_table_offset = self.rt_at * cs
        h.refcount_table_clusters = self.rt
        h.l1_table_offset = self.l1_at * cs if h.l1_size else 0

    @property
    def size(self) -> int:
        """Bytes of the stream."""
        return self.clusters * self.cs


def plan(src: BlockDevice, options: dict[str, Any]) -> StreamPlan:
    """The header from ``options`` (qemu-img's qcow2 ``-o``) and the runs of ``src``'s
    guest clusters that hold data: one pass over its block status."""
    opts = dict(options)
    for k in ("size", "backing_file", "backing_fmt"):
        opts.pop(k, None)
    h, prealloc = plan_header(src.size, opts)
    opts.pop("_encrypt", None)
    if opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
    if h.crypt_method or h.data_file is not None or prealloc != "off":
        raise UsageError("encrypted, preallocated and external-data-file qcow2 images "
                         "cannot be written to a stream")
    if h.incompatible_features & QCOW2_INCOMPAT_EXTL2:
        raise UsageError("qcow2 with extended_l2 cannot be written to a stream yet")
    cs = h.cluster_size
    runs: list[tuple[int, int]] = []
    off = 0
    while off < src.size:
        st, _ = src.block_status(off, src.size - off, coarse=True)
        if st.data:
            first, last = off // cs, (off + st.length - 1) // cs
            if runs and runs[-1][0] + runs[-1][1] > first:   # shares a cluster
                first = runs[-1][0] + runs[-1][1]
            if first <= last:
                if runs and runs[-1][0] + runs[-1][1] == first:
                    runs[-1] = (runs[-1][0], runs[-1][1] + last - first + 1)
                else:
                    runs.append((first, last - first + 1))
        off += st.length
    return StreamPlan(h, runs)


def _guest_clusters(p: StreamPlan) -> Iterator[int]:
    for first, n in p.runs:
        yield from range(first, first + n)


def write(src: BlockDevice, p: StreamPlan, sink: Sink,
          progress: Callable[[int, int], None] | None = None) -> None:
    """Emit the image planned by ``p`` for ``src`` into ``sink``, front to back."""
    h, cs = p.h, p.cs
    start = sink.offset
    sink.write(h.pack().ljust(cs, b"\0"))
    # refcount table: block i at rb_at + i
    per_t = cs // 8
    for t in range(p.rt):
        ents = array("Q", [(p.rb_at + i) * cs for i in range(t * per_t,
                                                             min(p.rb, (t + 1) * per_t))])
        sink.write(pack_be_u64_array(ents).ljust(cs, b"\0"))
    # refcount blocks: every cluster of the file has refcount 1
    per_b = refblock_entries(cs, h.refcount_order)
    full: bytes | None = None
    for b in range(p.rb):
        n = min(per_b, p.clusters - b * per_b)
        if n == per_b and full is not None:
            sink.write(full)
            continue
        blk = RefBlock(h.refcount_order, bytes(cs))
        for i in range(n):
            blk[i] = 1
        packed = blk.pack()
        if n == per_b:
            full = packed
        sink.write(packed)
    # L1: one L2 table per entry that covers data, in order
    l1 = array("Q", bytes(8 * h.l1_size))
    for k, t in enumerate(p.l2_tables):
        l1[t] = ((p.l2_at + k) * cs) | QCOW_OFLAG_COPIED
    if h.l1_size:
        sink.write(pack_be_u64_array(l1).ljust(p.l1_clusters * cs, b"\0"))
    del l1
    # L2 tables: the k-th data cluster (in guest order) at data_at + k
    clusters = _guest_clusters(p)
    nxt = next(clusters, None)
    k = 0
    for t in p.l2_tables:
        l2 = array("Q", bytes(cs))
        while nxt is not None and nxt // p.epl == t:
            l2[nxt % p.epl] = ((p.data_at + k) * cs) | QCOW_OFLAG_COPIED
            k += 1
            nxt = next(clusters, None)
        sink.write(pack_be_u64_array(l2))
    assert sink.offset - start == p.data_at * cs
    # data, in guest order, whole clusters (the last one zero-padded)
    step = max(1, READ // cs)
    buf = bytearray(step * cs)
    mv = memoryview(buf)
    done = 0
    for first, n in p.runs:
        g = first
        while g < first + n:
            m = min(step, first + n - g)
            off = g * cs
            length = min(m * cs, src.size - off)
            src.readinto(off, mv[:length])
            if length < m * cs:
                mv[length:m * cs] = bytes(m * cs - length)
            sink.write(mv[:m * cs])
            g += m
            done += m
            if progress is not None:
                progress(done, p.data_clusters)
    assert sink.offset - start == p.size
