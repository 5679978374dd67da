"""``amend -p``: the progress calls qemu's qcow2 driver makes during an amend, so that the
CLI prints qemu-img 7.2's lines.

qemu reports each amend step as ``(offset, total)`` "work units" and combines the steps
through one helper (:class:`AmendStatus`): the offsets of finished steps are added up, and
the total of the running step is projected onto the steps still to come.  The steps and
their units (facts from QEMU's qcow2 driver, as it behaves):

- upgrade to v3: ``(0, 2)``, ``(1, 2)`` after the snapshot table, ``(2, 2)`` after the header;
- refcount width (:func:`refcount_walk_calls`): qemu walks the old refcount table (one unit
  per table entry) once to allocate the new refcount blocks, again until a walk allocates
  nothing (each allocation of a block moves the new table), then once to write the blocks.
  How many walks that takes depends on where qemu's allocator puts the new blocks and
  table, so the walks are replayed on an in-memory copy of the refcount structures with
  the allocator qemu's order is already written in (:class:`Refcounts`);
- downgrade to v2 (:func:`downgrade_calls`): one unit per L1 entry of the active table and
  of every snapshot's.

The key-slot update counts as a step but reports nothing.  None of this reads or writes
the image beyond the refcount structures it reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from diskimg.hostio import HostFile
from diskimg.qcow2.layout import Header
from diskimg.qcow2.refcount import REFT_OFFSET_MASK, Refcounts, max_refcount, refblock_entries

StatusFn = Callable[[int, int], None]

__all__ = ["AmendStatus", "StatusFn", "downgrade_calls", "refcount_walk_calls",
           "UPGRADE_CALLS"]

#: the upgrade step's calls before the header write, and after it
UPGRADE_CALLS = ([(0, 2), (1, 2)], [(2, 2)])


class AmendStatus:
    """qemu's amend helper callback: turns each step's ``(offset, total)`` into the
    ``(offset, total)`` of the whole amend and passes it to ``out`` (None: nothing is
    reported, :attr:`enabled` is False).  ``steps`` is the number of steps the amend counts
    (version change, refcount width, key slots)."""

    def __init__(self, steps: int, out: StatusFn | None) -> None:
        self.steps = steps
        self.out = out
        self.current: str | None = None
        self.last: str | None = None
        self.offset_done = 0
        self.steps_done = 0
        self.last_total = 0

    @property
    def enabled(self) -> bool:
        return self.out is not None

    def step(self, name: str) -> None:
        """The step named ``name`` starts (its calls follow)."""
        self.current = name

    def __call__(self, offset: int, total: int) -> None:
        if self.current != self.last:
            if self.last is not None:
                self.offset_done += self.last_total
                self.steps_done += 1
            self.last = self.current
        self.last_total = total
        work = self.offset_done + total
        projected = work * (self.steps - self.steps_done - 1) // (self.steps_done + 1)
        if self.out is not None:
            self.out(self.offset_done + offset, work + projected)

    def replay(self, name: str, calls: list[tuple[int, int]]) -> None:
        """Step ``name`` made ``calls``."""
        if self.out is None:
            return
        self.step(name)
        for offset, total in calls:
            self(offset, total)


class _DryRunHost(HostFile):
    """``base`` for reading; every write (zeroing and hole punching included) is kept in
    memory, so qemu's allocator can be replayed on the image without changing it."""

    def __init__(self, base: HostFile) -> None:
        super().__init__(base.fd, base.path, False)  # read-only: a missed override raises
        self.base = base
        #: (offset, bytes written) or (offset, length zeroed), in order
        self.writes: list[tuple[int, bytes | int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        data = bytearray(self.base.pread(offset, length))
        end = offset + length
        for woff, w in self.writes:
            n = w if isinstance(w, int) else len(w)
            lo, hi = max(offset, woff), min(end, woff + n)
            if lo < hi:
                if len(data) < hi - offset:
                    data.extend(bytes(hi - offset - len(data)))
                data[lo - offset:hi - offset] = (bytes(hi - lo) if isinstance(w, int)
                                                 else w[lo - woff:hi - woff])
        return bytes(data)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        data = self.pread(offset, len(buf))
        buf[:len(data)] = data
        buf[len(data):] = bytes(len(buf) - len(data))
        return len(buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((offset, bytes(data)))

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        self.pwrite(offset, b"".join(bytes(p) for p in parts))

    def punch_hole(self, offset: int, length: int) -> bool:
        self.writes.append((offset, length))
        return True

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        self.writes.append((offset, length))

    def write_zeros(self, offset: int, length: int) -> None:
        self.writes.append((offset, length))

    def preallocate(self, offset: int, length: int) -> None:
        pass

    def truncate(self, size: int) -> None:
        pass

    def size(self) -> int:
        return max([self.base.size()] + [o + (w if isinstance(w, int) else len(w))
                                          for o, w in self.writes])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the fd is the base file's


def _first_too_large(rc: Refcounts, new_order: int) -> int | None:
    """The first cluster whose refcount does not fit ``new_order`` (where qemu's first walk
    stops with "Cannot decrease refcount entry width"), or None."""
    top = max_refcount(new_order)
    per = 1 << rc.block_bits
    for ri, ent in enumerate(rc.table):
        off = ent & REFT_OFFSET_MASK
        if not off:
            continue
        blk = rc.blocks.get(off)
        if isinstance(blk.data, memoryview) and max(blk.data) <= top:  # wide entries
            continue
        for k in range(per):
            if blk[k] > top:
                return ri * per + k
    return None


def refcount_walk_calls(host: HostFile, h: Header, new_order: int
                        ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool]:
    """qemu's progress calls for changing the refcount width of the image in ``host``
    (header ``h``) to ``1 << new_order`` bits: (the allocation walks' calls, the write
    walk's calls, whether qemu stops in the first walk because a refcount is too large --
    then the first list ends there and the second is empty)."""
    cs = h.cluster_size
    rc = Refcounts(_DryRunHost(host), copy.copy(h))
    r_old = 1 << rc.block_bits
    r_new = refblock_entries(cs, new_order)
    too_large = _first_too_large(rc, new_order) if new_order < h.refcount_order else None
    calls: list[tuple[int, int]] = []
    new_table: dict[int, int] = {}
    new_size = 0  # entries of the new refcount table (qemu grows it a cluster at a time)

    def walk(index: int, walks: int, alloc: bool) -> tuple[bool, bool]:
        """One walk over the old refcount table; returns (allocated, refused)."""
        nonlocal new_size
        allocated = False
        chunk = used = 0  # the new block being filled, and how many entries it has
        empty = True

        def done_block() -> None:
            nonlocal allocated, new_size
            if alloc and not empty:  # the new table covers the last block in use
                if chunk >= new_size:
                    per_cluster = cs // 8
                    new_size = -(-(chunk + 1) // per_cluster) * per_cluster
                if not new_table.get(chunk):
                    new_table[chunk] = rc.alloc(1)
                    allocated = True

        ri = 0
        while ri < len(rc.table):
            size = len(rc.table)  # the old table may grow while qemu allocates
            calls.append((index * size + ri, walks * size))
            off = rc.table[ri] & REFT_OFFSET_MASK
            e = 0
            while e < r_old:
                if used >= r_new:
                    done_block()
                    chunk, used, empty = chunk + 1, 0, True
                n = min(r_old - e, r_new - used)
                if off:
                    first = ri * r_old + e
                    if too_large is not None and first <= too_large < first + n:
                        return allocated, True
                    if empty and rc.blocks.get(off).first_used(e, e + n) < e + n:
                        empty = False
                used += n
                e += n
            ri += 1
        if used:
            done_block()
        size = len(rc.table)
        calls.append(((index + 1) * size, walks * size))
        return allocated, False

    reftable = 0
    reftable_entries = 0
    index = 0
    while True:
        allocated, refused = walk(index, max(index + 2, 3), True)
        index += 1
        if refused:
            return calls, [], True
        if not allocated:
            break
        if reftable:
            rc.free(reftable, reftable_entries * 8)
        reftable = rc.alloc(-(-new_size * 8 // cs))
        reftable_entries = new_size
    before = calls
    calls = []
    walk(index, index + 1, False)
    return before, calls, False


def downgrade_calls(host: HostFile, h: Header) -> list[tuple[int, int]]:
    """qemu's progress calls for a downgrade to v2 (zero-cluster expansion): one per L1
    entry, the active table's then each snapshot's."""
    total = h.l1_size
    if h.nb_snapshots:
        from diskimg.qcow2.snapshot import QCOW_MAX_SNAPSHOTS_SIZE, read_entries

        total += sum(sn.l1_size for sn in read_entries(host, h.snapshots_offset,
                                                       h.nb_snapshots,
                                                       QCOW_MAX_SNAPSHOTS_SIZE))
    return [(k, total) for k in range(1, total + 1)]
