"""The state of one check pass (qemu's BDRVQcow2State plus the in-memory refcount table)
and the helpers every part of the check uses: reading with zero fill past EOF,
findings, counting references (``qcow2_inc_refcounts_imrt``), the abort signals, and
the refcounts stored in the image (:class:`_Stored`: refcount blocks read, cached and
repaired, ``check_refblocks``)."""

from __future__ import annotations

import struct

from diskimg import progname
from diskimg.check_report import CheckReport
from diskimg.errors import CorruptImageError
from diskimg.hostio.file import trailing_zeros
from diskimg.qcow2.entries import be_u64_table
from diskimg.qcow2.entries import ClusterType
from diskimg.qcow2.layout import (
    QCOW2_INCOMPAT_DATA_FILE,
    Header,
)
from diskimg.qcow2.refblock import (
    REFT_OFFSET_MASK,
    decode_refblock,
    encode_refblock,
    refblock_entries,
    refcount_typecode,
)
from diskimg.slotted import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host


# --- the check's abort signals (its result is the format-neutral CheckReport) ---------

_STRERROR = {
    "EIO": "Input/output error",
    "EFBIG": "File too large",
    "EINVAL": "Invalid argument",
    "ENOMEM": "Cannot allocate memory",
}


class _Abort(Exception):
    """The check could not complete (qemu: the check function returned < 0)."""

    def __init__(self, errno_name: str) -> None:
        super().__init__(errno_name)
        self.strerror = _STRERROR.get(errno_name, errno_name)


class _RefErr(Exception):
    """A stored refcount could not be read (unaligned refcount block)."""


#: the qcow2 check's historical name for :class:`diskimg.check_report.CheckReport`
CheckResult = CheckReport


def _counts(res: CheckResult) -> tuple[int, int, int, int, int]:
    return (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
            res.leaks_fixed)


def _set_counts(res: CheckResult, c: tuple[int, int, int, int, int]) -> None:
    (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
     res.leaks_fixed) = c


REFT_RESERVED_MASK = 0x1FF
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1

#: Cap on the in-memory refcount array (one entry per host cluster).
MAX_IMRT_BYTES = 1 << 29

#: Cap on L1 plus non-zero L2 entries visited (snapshots sharing tables multiply this).
MAX_L2_ENTRIES = 1 << 28

# L2 cluster types (classified by entries.cluster_type, the one rule)
_UNALLOCATED, _ZERO_ALLOC, _NORMAL, _COMPRESSED = (
    ClusterType.UNALLOCATED, ClusterType.ZERO_ALLOC, ClusterType.NORMAL,
    ClusterType.COMPRESSED)


def _hexc(v: int) -> str:
    """C's ``%#x``: 0 prints as ``0``."""
    return f"{v:#x}" if v else "0"


class _Snap(Record):
    __slots__ = ("l1_table_offset", "l1_size", "id_str", "name", "extra_data_size",
                 "entry_offset")
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_data_size: int
    entry_offset: int

    def __init__(self, l1_table_offset: int, l1_size: int, id_str: str, name: str,
                 extra_data_size: int, entry_offset: int) -> None:
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id_str = id_str
        self.name = name
        self.extra_data_size = extra_data_size
        self.entry_offset = entry_offset

class _State:
    """One run of qemu's ``qcow2_co_check_locked``: its state and small helpers."""

    def __init__(self, host: Host, header: Header, fix: int, res: CheckResult) -> None:
        self.host = host
        self.h = header
        self.fix = fix  # bit 0: leaks, bit 1: errors (qemu's BDRV_FIX_*)
        self.res = res
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.order = header.refcount_order
        self.rc_bits = 1 << self.order
        self.rc_max = (1 << self.rc_bits) - 1
        self.rb_bits = self.cbits + 3 - self.order
        self.rb_entries = 1 << self.rb_bits
        self.ext_l2 = header.extended_l2
        self.l2e_size = 16 if self.ext_l2 else 8
        self.l2_size = self.cs // self.l2e_size
        self.data_file = bool(header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
        self.tc = refcount_typecode(self.order)
        self.itemsize = struct.calcsize(self.tc)
        self.work = 0
        #: L2 table offset -> (its bytes, :meth:`_Walk._plain_runs` of them)
        self._plain: dict[int, tuple[bytes, list[tuple[int, int]] | None]] = {}
        self._ones_buf = memoryview(b"").cast(self.tc)
        self.snap_corruptions = 0
        self.signaled = False  # qemu's s->signaled_corruption
        self.marked_corrupt = False
        self.dead = False  # a fatal corruption was signalled (qemu: bs->drv = NULL)
        self.rb_cache: dict[int, memoryview] = {}
        self.rb_dirty: set[int] = set()
        self.snapshots: list[_Snap] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.file_len = host.size()
        # refcount table and active L1 as loaded at open (zeros past EOF)
        rt_entries = header.refcount_table_clusters * self.cs // 8
        self.reftable = self._read_u64s(header.refcount_table_offset, rt_entries)
        self.reftable_offset = header.refcount_table_offset
        self.l1 = self._read_u64s(header.l1_table_offset, header.l1_size)
        #: the in-memory refcounts, one per host cluster (qemu's refcount_table): a
        #: native view of format ``tc``, replaced (not resized) when it grows
        self.imrt = self.zeros(0)
        self.nb = 0

    def msg(self, line: str) -> None:
        self.res.messages.append(line)

    def find(self, kind: str, repaired: bool = False, **kw: Any) -> None:
        d: dict[str, Any] = {"kind": kind, "table": kw.pop("table", None),
                             "index": kw.pop("index", None),
                             "host_offset": kw.pop("host_offset", None),
                             "guest_offset": kw.pop("guest_offset", None),
                             "repaired": repaired}
        d.update(kw)
        self.res.findings.append(d)

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes, zero-filled past the end of the file."""
        if length <= 0:
            return b""
        if offset >= self.file_len:
            return bytes(length)
        data = self.host.pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _read_u64s(self, offset: int, n: int) -> memoryview:
        return be_u64_table(self.pread(offset, n * 8))

    def zeros(self, n: int) -> memoryview:
        """``n`` zero refcounts, in the form of :attr:`imrt`."""
        return memoryview(bytearray(n * self.itemsize)).cast(self.tc)

    def write(self, offset: int, data: bytes) -> None:
        self.host.pwrite(offset, data)

    # metadata overlap protection and corruption signalling, for repairs and findings only
    # (diskimg.qcow2.check.overlap, loaded when first needed)
    def signal_corruption(self, message: str, fatal: bool = True) -> None:
        from diskimg.qcow2.check.overlap import signal_corruption

        signal_corruption(self, message, fatal)

    def overlap(self, ign: str, offset: int, size: int) -> str | None:
        from diskimg.qcow2.check.overlap import overlap

        return overlap(self, ign, offset, size)

    def checked_write(self, ign: str, offset: int, data: bytes) -> bool:
        from diskimg.qcow2.check.overlap import checked_write

        return checked_write(self, ign, offset, data)

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cs - 1) >> self.cbits

    def grow_imrt(self, new_nb: int) -> None:
        """qemu's realloc_refcount_array: the backing array covers whole clusters."""
        per_cluster = refblock_entries(self.cs, self.order)
        need = -(-new_nb // per_cluster) * per_cluster
        if need * self.itemsize > MAX_IMRT_BYTES:
            self.res.check_errors += 1
            raise _Abort("ENOMEM")
        if need > len(self.imrt):
            grown = self.zeros(need)
            grown[: len(self.imrt)] = self.imrt
            self.imrt = grown
        self.nb = new_nb

    def count_work(self, n: int) -> None:
        self.work += n
        if self.work > MAX_L2_ENTRIES:
            raise CorruptImageError(
                f"qcow2 metadata too large to check: more than {MAX_L2_ENTRIES} table entries "
                "visited (L1/L2 tables shared by too many snapshots?)")

    def inc(self, offset: int, size: int, what: str = "metadata") -> None:
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            self.res.corruptions += 1
            self.find("region-past-eof", table=what, host_offset=offset, size=size)
            return
        start = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        if last >= self.nb:
            self.grow_imrt(last + 1)
        imrt = self.imrt
        for k in range(start, last + 1):
            r = imrt[k]
            if r == self.rc_max:
                self.msg(f"ERROR: overflow cluster offset=0x{k << self.cbits:x}")
                prog = progname.name()
                self.msg(f"Use {prog} amend to increase the refcount entry width or {prog} "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                self.res.corruptions += 1
                self.find("refcount-overflow", table=what, host_offset=k << self.cbits)
                continue
            imrt[k] = r + 1


# --- the refcounts stored in the image, as the check reads and repairs them: refcount
# blocks through the one codec (diskimg.qcow2.refblock), a write-back block cache, and
# qemu's check_refblocks (references of the refcount blocks themselves)

class _Stored(_State):
    def refblock(self, idx: int, *, quiet: bool = False) -> memoryview | None:
        """Stored refcount block ``idx`` decoded, or None when it is not allocated.

        An unusable block offset (unaligned, or negative as a file offset) is reported and
        raises _RefErr; with ``quiet`` it reads as None and nothing is reported (for a
        fast path that leaves such tables to the full check)."""
        if idx >= len(self.reftable):
            return None
        off = self.reftable[idx] & REFT_OFFSET_MASK
        if not off:
            return None
        unaligned = off & (self.cs - 1)
        if unaligned or off > INT64_MAX - self.cs:
            if quiet:
                return None
            if unaligned:
                self.signal_corruption(f"Refblock offset {_hexc(off)} unaligned (reftable "
                                       f"index: {_hexc(idx)})")
            raise _RefErr(off)  # qemu: a negative file offset reads as EIO
        blk = self.rb_cache.get(off)
        if blk is None:
            blk = decode_refblock(self.pread(off, self.cs), self.order)
            self.rb_cache[off] = blk
        return blk

    def get_refcount(self, cluster: int) -> int:
        blk = self.refblock(cluster >> self.rb_bits)
        return 0 if blk is None else blk[cluster & (self.rb_entries - 1)]

    def set_refcount(self, cluster: int, value: int) -> None:
        """Change one stored refcount (its block must exist) in the write-back cache."""
        idx = cluster >> self.rb_bits
        off = self.reftable[idx] & REFT_OFFSET_MASK
        blk = self.refblock(idx)
        assert blk is not None
        blk[cluster & (self.rb_entries - 1)] = value
        self.rb_dirty.add(off)

    def flush_refblocks(self) -> None:
        """Write back changed refcount blocks (qemu's refcount block cache flush)."""
        for off in sorted(self.rb_dirty):
            if self.dead:
                break
            self.checked_write("refcount block", off,
                               encode_refblock(self.rb_cache[off], self.order))
        self.rb_dirty.clear()
        if not self.dead:
            self.host.flush()

    def check_refblocks(self) -> bool:
        rebuild = False
        fix_errors = bool(self.fix & 2)
        rt = self.reftable
        n = len(rt)
        if self.nb > 0:  # then an entry of 0 (no refcount block) has nothing to check:
            # stop after the last non-zero one (most of a small image's table is zeros)
            raw = rt.tobytes()
            n = -(-(len(raw) - trailing_zeros(raw)) // 8)
        for i in range(n):
            ent = rt[i]
            off = ent & REFT_OFFSET_MASK
            cluster = off >> self.cbits
            if ent & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.find("reftable-reserved-bits", table="refcount table", index=i)
                rebuild = True
                continue
            if off & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                self.res.corruptions += 1
                self.find("refblock-unaligned", table="refcount table", index=i,
                          host_offset=off)
                rebuild = True
                continue
            if cluster >= self.nb:
                self.res.corruptions += 1
                self.msg(f"{'Repairing' if fix_errors else 'ERROR'} refcount block {i} is "
                         "outside image")
                if fix_errors and off <= INT64_MAX - self.cs and \
                        off + self.cs <= self.file_len + MAX_IMRT_BYTES:
                    self.host.truncate(off + self.cs)
                    self.file_len = self.host.size()
                    self.grow_imrt(max(self.nb, self.size_to_clusters(self.file_len)))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.find("refblock-outside-image", True, table="refcount table",
                              index=i, host_offset=off)
                    self.inc(off, self.cs, "refcount block")
                    continue
                if fix_errors:
                    rebuild = True
                    why = "Invalid argument" if off > INT64_MAX - self.cs else "File too large"
                    self.msg(f"ERROR could not resize image: {why}")
                self.find("refblock-outside-image", table="refcount table", index=i,
                          host_offset=off)
                continue
            if off:
                self.inc(off, self.cs, "refcount block")
                rc = self.imrt[cluster]
                if rc != 1:
                    self.msg(f"ERROR refcount block {i} refcount={rc}")
                    self.res.corruptions += 1
                    self.find("refblock-refcount", table="refcount table", index=i,
                              host_offset=off)
                    rebuild = True
        return rebuild
