"""qcow2 consistency check and repair, at parity with ``qemu-img check`` (QEMU 7.2).

The check rebuilds, in memory, the refcount every host cluster should have (header, active
and snapshot L1/L2 tables, data and compressed clusters, snapshot table, refcount table and
blocks, LUKS header area, bitmap directory and tables) and compares it with the refcounts
stored in the image.  Counting rules, the order of the per-problem messages and the repair
strategy follow qemu-img 7.2 as observed:

* stored refcount too high -> one leak (``Leaked cluster N refcount=A reference=B``);
* stored refcount too low -> one corruption (``ERROR cluster N ...``); a stored refcount of
  0 for a referenced cluster also forces a rebuild of the whole refcount structure;
* OFLAG_COPIED must be set exactly when the refcount is 1 (active L1 and L2 entries), each
  mismatch is one corruption -- so a zeroed refcount of a data cluster counts twice, and a
  bumped one counts as one leak plus one corruption;
* with repair, a first pass fixes, then the image is checked again without repair and the
  result of that second pass is reported together with the fixed counts.

Invariants: a plain check (``repair=None``) never writes.  Reads past the end of the file
read as zeros (as QEMU's file driver does).  Memory is bounded by the file size (the
in-memory refcount array has one entry per host cluster, capped at :data:`MAX_IMRT_BYTES`)
and by QEMU's table caps; the amount of L2 work is bounded by :data:`MAX_L2_ENTRIES`.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

from diskimg.errors import CorruptImageError, FormatError, UsageError
from diskimg.hostio import HostFile
from diskimg.qcow2 import header_io
from diskimg.qcow2.bitmaps import BME_TABLE_OFFSET_MASK as BME_TABLE_ENTRY_OFFSET_MASK
from diskimg.qcow2.bitmaps import (
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    BitmapEntry,
    BitmapsExt,
)
from diskimg.qcow2.cache import be_u64_array, pack_be_u64_array
from diskimg.qcow2.entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    ClusterType,
    cluster_type,
    decode_compressed,
)
from diskimg.qcow2.entries import QCOW_OFLAG_COPIED as OFLAG_COPIED
from diskimg.qcow2.entries import QCOW_OFLAG_ZERO as OFLAG_ZERO
from diskimg.qcow2.layout import (
    HDR_NB_SNAPSHOTS,
    HDR_SNAPSHOTS_OFFSET,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_SNAPSHOTS,
    Header,
)
from diskimg.qcow2.refcount import (
    REFT_OFFSET_MASK,
    decode_refblock,
    encode_refblock,
    refcount_typecode,
)
from diskimg.qcow2.snapshot import (
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS_SIZE,
    EntryHeader,
    c_bytes,
)

__all__ = ["CheckResult", "check_image"]

REFT_RESERVED_MASK = 0x1FF
L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

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


@dataclass
class CheckResult:
    """Outcome of :func:`check_image`; field names mirror qemu's ``ImageCheck``.

    ``messages`` holds what qemu-img writes to stderr (per-problem lines, ``Repairing ...``,
    and ``diskimg: ...`` error reports) in order; :meth:`summary_lines` what it writes to
    stdout in human mode.  ``error`` is set (strerror text) when the check could not
    complete: the CLI then prints ``Check failed: <error>`` and exits 1.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    #: stderr lines of the repairing pass (before "The following inconsistencies...").
    repair_messages: list[str] = field(default_factory=list)
    repaired: bool = False
    #: a repair attempt hit inconsistent metadata and set the image's corrupt bit
    marked_corrupt: bool = False
    #: indexes of v3 snapshot table entries with less than 16 bytes of extra data
    incomplete_snapshots: list[int] = field(default_factory=list)
    #: snapshot table problems a rewrite of the table repairs (qemu counts each as a
    #: corruption): incomplete entries, cut extra data, dropped overhanging entries
    snapshot_repairs: int = 0
    #: entries kept and bytes used by the snapshot table as the check read it
    snapshots_kept: int = 0
    snapshots_size: int = 0

    # --- output -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """qemu-img 7.2's JSON object (optional keys only when non-zero) plus ``findings``."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        opt = [("image-end-offset", self.image_end_offset), ("corruptions", self.corruptions),
               ("leaks", self.leaks), ("corruptions-fixed", self.corruptions_fixed),
               ("leaks-fixed", self.leaks_fixed), ("total-clusters", self.total_clusters),
               ("allocated-clusters", self.allocated_clusters),
               ("fragmented-clusters", self.fragmented_clusters),
               ("compressed-clusters", self.compressed_clusters)]
        for k, v in opt:
            if v:
                out[k] = v
        out["findings"] = self.findings
        return out

    def summary_lines(self) -> list[str]:
        """What qemu-img check prints on stdout in human mode (empty when it failed)."""
        out: list[str] = []
        if self.repaired:
            out += ["The following inconsistencies were found and repaired:", "",
                    f"    {self.leaks_fixed} leaked clusters",
                    f"    {self.corruptions_fixed} corruptions", "",
                    "Double checking the fixed image now..."]
        if self.error is not None:
            return out
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out += ["", f"{self.corruptions} errors were found on the image.",
                        "Data may be corrupted, or further writes to the image may corrupt it."]
            if self.leaks:
                out += ["", f"{self.leaks} leaked clusters were found on the image.",
                        "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                out += ["", f"{self.check_errors} internal errors have occurred during the "
                        "check."]
        if self.total_clusters and self.allocated_clusters:
            a, t = self.allocated_clusters, self.total_clusters
            out.append(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
                       f"{self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                       f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return out

    @property
    def failure_message(self) -> str | None:
        """The final error line qemu-img prints (without program name), if any."""
        if self.error is not None:
            return f"Check failed: {self.error}"
        if self.check_errors:
            return "Check failed"
        return None

    def human_lines(self) -> list[str]:
        """Everything ``qemu-img check`` prints, in logical order (stderr problem lines of
        the repairing pass, the repair block, the re-check's lines, the summary, and the
        ``diskimg: Check failed`` line when applicable)."""
        out = list(self.repair_messages) if self.repaired else []
        summary = self.summary_lines()
        if self.repaired:
            out += summary[:6]
            summary = summary[6:]
        out += self.messages
        out += summary
        if self.failure_message:
            out.append(f"diskimg: {self.failure_message}")
        return out

    @property
    def exit_code(self) -> int:
        """0 clean (or fully repaired), 1 check failed, 2 corruptions, 3 only leaks."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


@dataclass
class _Snap:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_data_size: int
    entry_offset: int


class _Pass:
    """One run of qemu's ``qcow2_co_check_locked`` (with or without a fix mode)."""

    def __init__(self, host: HostFile, header: Header, fix: int, res: CheckResult) -> None:
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
        self.itemsize = array(self.tc).itemsize
        self.work = 0
        self._l2_bad_bits: int | None = None  # see _plain_hosts
        self.snap_corruptions = 0
        self.signaled = False  # qemu's s->signaled_corruption
        self.marked_corrupt = False
        self.dead = False  # a fatal corruption was signalled (qemu: bs->drv = NULL)
        self.rb_cache: dict[int, array[int]] = {}
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
        self.imrt = array(self.tc)
        self.nb = 0

    # --- small helpers ----------------------------------------------------------------
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

    def _read_u64s(self, offset: int, n: int) -> array[int]:
        return be_u64_array(self.pread(offset, n * 8))

    def write(self, offset: int, data: bytes) -> None:
        self.host.pwrite(offset, data)

    def signal_corruption(self, message: str, fatal: bool = True) -> None:
        """qemu's qcow2_signal_corruption: report once; when writable, set the corrupt bit
        and stop using the image."""
        if not self.fix:
            fatal = False
        if self.signaled and (not fatal or self.marked_corrupt):
            return
        if fatal:
            self.msg(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                     "will be suppressed")
            if self.h.version >= 3:
                header_io.set_incompat(self.host, header_io.read_incompat(self.host)
                                       | QCOW2_INCOMPAT_CORRUPT)
                self.host.flush()
            self.marked_corrupt = True
            self.dead = True
        else:
            self.msg(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                     "will be suppressed")
        self.signaled = True

    def overlap(self, ign: str, offset: int, size: int) -> str | None:
        """qemu's metadata overlap check ("cached" mode): the first kind of metadata the
        byte range would overwrite, or None.  ``ign`` names one kind to ignore."""
        if not size:
            return None
        cs = self.cs
        if ign != "qcow2_header" and offset < cs:
            return "qcow2_header"
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        def hit(o: int, n: int) -> bool:
            return n > 0 and o < offset + size and offset < o + n

        h = self.h
        if ign != "active L1 table" and h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if ign != "refcount table" and hit(self.reftable_offset, len(self.reftable) * 8):
            return "refcount table"
        if hit(self.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        if ign != "inactive L1 table":
            for sn in self.snapshots:
                if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                    return "inactive L1 table"
        if ign != "active L2 table":
            for e in self.l1:
                if e & L1E_OFFSET_MASK and hit(e & L1E_OFFSET_MASK, cs):
                    return "active L2 table"
        if ign != "refcount block":
            for e in self.reftable:
                if e & REFT_OFFSET_MASK and hit(e & REFT_OFFSET_MASK, cs):
                    return "refcount block"
        bm = self.bitmap_dir()
        if bm and hit(*bm):
            return "bitmap directory"
        return None

    def checked_write(self, ign: str, offset: int, data: bytes) -> bool:
        """Write after the overlap check; False (corruption signalled) if it overlaps."""
        what = self.overlap(ign, offset, len(data))
        if what is not None:
            self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                   f"{what})")
            return False
        self.write(offset, data)
        return True

    def bitmap_dir(self) -> tuple[int, int] | None:
        bx = BitmapsExt.of(self.h)
        if bx is None or not bx.nb_bitmaps:
            return None
        return bx.directory_offset, bx.directory_size

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cs - 1) >> self.cbits

    def grow_imrt(self, new_nb: int) -> None:
        """qemu's realloc_refcount_array: the backing array covers whole clusters."""
        per_cluster = self.cs * 8 // self.rc_bits
        need = -(-new_nb // per_cluster) * per_cluster
        if need * self.itemsize > MAX_IMRT_BYTES:
            self.res.check_errors += 1
            raise _Abort("ENOMEM")
        if need > len(self.imrt):
            self.imrt.frombytes(bytes((need - len(self.imrt)) * self.itemsize))
        self.nb = new_nb

    def count_work(self, n: int) -> None:
        self.work += n
        if self.work > MAX_L2_ENTRIES:
            raise CorruptImageError(
                f"qcow2 metadata too large to check: more than {MAX_L2_ENTRIES} table entries "
                "visited (L1/L2 tables shared by too many snapshots?)")

    # --- stored refcounts -------------------------------------------------------------
    def refblock(self, idx: int, *, quiet: bool = False) -> array[int] | None:
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

    # --- counting references (qcow2_inc_refcounts_imrt) ---------------------------------
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
                self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                self.res.corruptions += 1
                self.find("refcount-overflow", table=what, host_offset=k << self.cbits)
                continue
            imrt[k] = r + 1

    # --- snapshot table (qcow2_check_read_snapshot_table) -------------------------------
    def read_snapshots(self) -> None:
        nb_u, off_u = header_io.read_fields(self.host, HDR_NB_SNAPSHOTS, HDR_SNAPSHOTS_OFFSET)
        nb = nb_u - (1 << 32) if nb_u >> 31 else nb_u  # qemu reads both as signed
        off = off_u - (1 << 64) if off_u >> 63 else off_u
        fix_errors = bool(self.fix & 2)
        dropped = 0
        if nb_u > QCOW_MAX_SNAPSHOTS:
            if fix_errors:
                raise CorruptImageError(f"Too many snapshots ({nb_u}); repairing the snapshot "
                                        "table is not supported", offset=60)
            self.res.check_errors += 1
            self.msg("diskimg: ERROR snapshot table too large")
            self.msg(f"You can force-remove all {nb_u - QCOW_MAX_SNAPSHOTS} overhanging "
                     "snapshots with diskimg check -r all")
            self.find("too-many-snapshots", table="snapshot-table", count=nb_u)
            raise _Abort("EFBIG")
        nb = max(nb, 0)
        if off & (self.cs - 1) or off < 0 or INT64_MAX - nb * 40 < off:
            self.res.check_errors += 1
            self.msg("diskimg: ERROR snapshot table is invalid: Invalid argument")
            self.find("snapshot-table-invalid", table="snapshot-table", host_offset=off)
            raise _Abort("EINVAL")
        pos = entry_end = off
        snaps = []
        for i in range(nb):
            pos = (pos + 7) & ~7
            entry_offset = pos
            eh = EntryHeader.parse(self.pread(pos, EntryHeader.SIZE))
            l1_off, l1_size, extra = eh.l1_table_offset, eh.l1_size, eh.extra_data_size
            pos += EntryHeader.SIZE
            truncate = False
            if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                if not fix_errors:
                    self.res.check_errors += 1
                    self.msg("diskimg: ERROR failed to read the snapshot table: Too much extra "
                             f"metadata in snapshot table entry {i}")
                    self.msg("You can force-remove this extra metadata with diskimg check "
                             "-r all")
                    self.find("snapshot-extra-data", table="snapshot-table", index=i)
                    raise _Abort("EFBIG")
                self.msg(f"Discarding too much extra metadata in snapshot table entry {i} "
                         f"({extra} > {QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
                self.find("snapshot-extra-data", True, table="snapshot-table", index=i)
                dropped += 1
                truncate = True
            pos += min(24, extra)
            if extra > 24:
                end = pos + extra - 24
                if truncate:
                    extra = QCOW_MAX_SNAPSHOT_EXTRA_DATA
                pos = end
            id_str = c_bytes(self.pread(pos, eh.id_len)).decode("utf-8", "replace")
            pos += eh.id_len
            name = c_bytes(self.pread(pos, eh.name_len)).decode("utf-8", "replace")
            pos += eh.name_len
            if pos - off > QCOW_MAX_SNAPSHOTS_SIZE and fix_errors:
                self.msg(f"Discarding {nb - i} overhanging snapshots (snapshot table is too "
                         "big)")
                self.find("snapshot-table-too-big", True, table="snapshot-table",
                          host_offset=off, count=nb - i)
                dropped += nb - i
                pos = entry_end  # the table ends with the last entry kept
                break
            if pos - off > QCOW_MAX_SNAPSHOTS_SIZE:
                self.res.check_errors += 1
                self.msg("diskimg: ERROR failed to read the snapshot table: Snapshot table is "
                         "too big")
                self.find("snapshot-table-too-big", table="snapshot-table", host_offset=off)
                raise _Abort("EFBIG")
            snaps.append(_Snap(l1_off, l1_size, id_str, name, extra, entry_offset))
            entry_end = pos
        self.res.snapshots_kept = len(snaps)
        self.snapshots = snaps
        self.snapshots_offset = off
        self.snapshots_size = pos - off if snaps else 0
        self.snap_corruptions += dropped
        self.res.snapshot_repairs += dropped
        self.res.snapshots_size = self.snapshots_size
        if self.h.version >= 3:
            # v3 entries must carry the 64-bit VM state size and the disk size
            for i, sn in enumerate(snaps):
                if sn.extra_data_size < 16:
                    self.msg(f"{'Repairing' if fix_errors else 'ERROR'} snapshot table entry "
                             f"{i} is incomplete")
                    self.snap_corruptions += 1
                    self.res.snapshot_repairs += 1
                    self.res.incomplete_snapshots.append(i)
                    self.find("snapshot-incomplete", table="snapshot-table", index=i,
                              host_offset=sn.entry_offset, repaired=fix_errors,
                              extra_data_size=sn.extra_data_size)

    # --- L1 / L2 walking --------------------------------------------------------------
    def _plain_hosts(self, raw: bytes) -> list[int] | None:
        """Host offsets of the entries of a standard L2 table (non-zero ones, in order)
        when every one is a plain data cluster: no flag but COPIED, no reserved bit, a
        non-zero cluster-aligned offset inside the file.  None when any entry needs the
        entry-by-entry check (or the image has extended L2 entries or a data file).

        Decided with one big-integer AND over the whole table (the bits no plain entry
        has: 56-62 and those below the cluster size), so a clean table costs no Python
        work per entry but one list comprehension."""
        if self.ext_l2 or self.data_file:
            return None
        bad = self._l2_bad_bits
        if bad is None:
            lane = ((1 << 63) - (1 << 56)) | (self.cs - 1)
            bad = self._l2_bad_bits = int.from_bytes(lane.to_bytes(8, "big") * self.l2_size,
                                                      "big")
        if int.from_bytes(raw, "big") & bad:
            return None
        tab = be_u64_array(raw)
        mask = L2E_OFFSET_MASK
        hosts = [e & mask for e in tab if e]
        if not hosts or 0 in hosts or max(hosts) >= self.file_len:
            return None
        return hosts

    def _count_plain(self, hosts: list[int], frag: bool) -> bool:
        """check_l2 for a table of plain data clusters (:meth:`_plain_hosts`): one
        reference each, the allocation and fragmentation counts.  False, with nothing
        counted, when a refcount could reach its maximum (the full check reports that)."""
        cb = self.cbits
        ks = [h >> cb for h in hosts]
        need = max(ks) + 1
        if need > self.nb:
            self.grow_imrt(need)
        imrt = self.imrt
        if max(imrt[k] for k in ks) + len(ks) >= self.rc_max:
            return False
        for k in ks:
            imrt[k] += 1
        if frag:
            cs = self.cs
            self.res.allocated_clusters += len(hosts)
            self.res.fragmented_clusters += sum(1 for a, b in zip(hosts, hosts[1:])
                                                if b != a + cs)
        return True

    def _all_copied_once(self, raw: bytes, hosts: list[int]) -> bool:
        """True when every entry of a plain table (:meth:`_plain_hosts`) has COPIED set and
        a stored refcount of exactly 1: check_oflag_copied has nothing to say about it.
        Reads refcount blocks quietly (:meth:`refblock`), so answering False has no side
        effect but filling the block cache."""
        if raw[::8].count(0x80) != len(hosts):
            return False
        cb, rb_bits, m = self.cbits, self.rb_bits, self.rb_entries - 1
        cur, blk = -1, None
        for h in hosts:
            k = h >> cb
            idx = k >> rb_bits
            if idx != cur:
                blk, cur = self.refblock(idx, quiet=True), idx
            if blk is None or blk[k & m] != 1:
                return False
        return True

    def check_l1(self, l1_offset: int, l1_size: int, frag: bool, active: bool,
                 label: str) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8, f"{label} L1")
        l1 = self.l1 if active else self._read_u64s(l1_offset, l1_size)
        self.count_work(l1_size)
        for i, e in enumerate(l1):
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
                self.find("l1-reserved-bits", table=f"{label} L1", index=i,
                          host_offset=l1_offset + 8 * i)
            l2_off = e & L1E_OFFSET_MASK
            self.inc(l2_off, self.cs, f"{label} L2")
            if l2_off & (self.cs - 1):
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry "
                         "corrupted")
                self.res.corruptions += 1
                self.find("l2-unaligned", table=f"{label} L1", index=i, host_offset=l2_off)
            self.check_l2(l2_off, i, frag, active, label)

    def check_l2(self, l2_off: int, l1_index: int, frag: bool, active: bool,
                 label: str) -> None:
        raw = self.pread(l2_off, self.cs)
        if raw.count(0) == len(raw):
            return
        hosts = self._plain_hosts(raw)
        if hosts is not None and self._count_plain(hosts, frag):
            self.count_work(len(hosts))
            return
        tab = be_u64_array(raw)
        res = self.res
        cs = self.cs
        step = 2 if self.ext_l2 else 1
        next_contig = 0
        nonzero = 0
        for i in range(self.l2_size):
            e = tab[i * step]
            bm = tab[i * step + 1] if self.ext_l2 else 0
            if not e and not bm:
                continue
            nonzero += 1
            typ = cluster_type(e, extended=self.ext_l2, has_data_file=self.data_file)
            guest = ((l1_index * self.l2_size + i) * cs) if active else None
            if typ != _COMPRESSED and e & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
                self.find("l2-reserved-bits", table=f"{label} L2", index=i,
                          host_offset=l2_off + i * self.l2e_size, guest_offset=guest)
            if typ == _COMPRESSED:
                if e & OFLAG_COPIED:
                    coff = decode_compressed(e, self.cbits)[0]
                    self.msg(f"ERROR: coffset=0x{coff:x}: copied flag must "
                             "never be set for compressed clusters")
                    e &= ~OFLAG_COPIED
                    res.corruptions += 1
                    self.find("compressed-copied", table=f"{label} L2", index=i,
                              host_offset=coff, guest_offset=guest)
                if self.data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
                    res.corruptions += 1
                    self.find("compressed-with-data-file", table=f"{label} L2", index=i,
                              guest_offset=guest)
                    continue
                if bm:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{e:x}")
                    res.corruptions += 1
                    self.find("compressed-bitmap", table=f"{label} L2", index=i,
                              guest_offset=guest)
                    continue
                self.inc(*decode_compressed(e, self.cbits), "compressed data")
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif typ in (_NORMAL, _ZERO_ALLOC):
                off = e & L2E_OFFSET_MASK
                if (bm >> 32) & bm:
                    res.corruptions += 1
                    self.msg(f"ERROR offset={off:x}: Allocated cluster has corrupted "
                             "subcluster allocation bitmap")
                    self.find("l2-bitmap", table=f"{label} L2", index=i, host_offset=off,
                              guest_offset=guest)
                if off & (cs - 1):
                    res.corruptions += 1
                    if self.ext_l2:
                        has_data = bool(bm & L2_BITMAP_ALL_ALLOC)
                    else:
                        has_data = not e & OFLAG_ZERO
                    if not has_data:
                        fixing = bool(self.fix & 2)
                        self.msg(f"{'Repairing' if fixing else 'ERROR'} offset={off:x}: "
                                 "Preallocated cluster is not properly aligned; L2 entry "
                                 "corrupted.")
                        self.find("data-unaligned", fixing, table=f"{label} L2", index=i,
                                  host_offset=off, guest_offset=guest)
                        if fixing:
                            if self.ext_l2:
                                nbm = (bm | (bm << 32)) & (L2_BITMAP_ALL_ALLOC << 32)
                                new = struct.pack(">QQ", 0, nbm)
                            else:
                                new = struct.pack(">Q", OFLAG_ZERO)
                            ign = "active L2 table" if active else "inactive L2 table"
                            if not self.checked_write(ign, l2_off + i * self.l2e_size, new):
                                self.msg("ERROR: Overlap check failed")
                                res.check_errors += 1
                                raise _Abort("EIO")
                            self.host.flush()
                            res.corruptions -= 1
                            res.corruptions_fixed += 1
                            continue
                    else:
                        self.msg(f"ERROR offset={off:x}: Data cluster is not properly "
                                 "aligned; L2 entry corrupted.")
                        self.find("data-unaligned", table=f"{label} L2", index=i,
                                  host_offset=off, guest_offset=guest)
                if frag:
                    res.allocated_clusters += 1
                    if next_contig and off != next_contig:
                        res.fragmented_clusters += 1
                    next_contig = off + cs
                if not self.data_file:
                    self.inc(off, cs, "data")
            elif typ == _UNALLOCATED:
                if bm & L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation "
                             "map")
                    self.find("l2-bitmap", table=f"{label} L2", index=i, guest_offset=guest)
        self.count_work(nonzero)

    # --- bitmaps ----------------------------------------------------------------------
    def check_bitmaps(self) -> None:
        bx = BitmapsExt.of(self.h)
        if bx is None or not bx.nb_bitmaps:
            return
        nb, dsize, doff = bx.nb_bitmaps, bx.directory_size, bx.directory_offset
        self.inc(doff, dsize, "bitmap directory")
        if dsize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or doff & (self.cs - 1):
            self.res.corruptions += 1
            self.find("bitmap-directory", table="bitmap directory", host_offset=doff)
            raise _Abort("EINVAL")
        d = self.pread(doff, dsize)
        pos = 0
        tables: list[tuple[int, int]] = []
        while len(tables) < nb:
            try:
                bme, n = BitmapEntry.parse(d, pos, doff)
            except FormatError:  # truncated or runs past the directory: qemu's broken_dir
                break
            tables.append((bme.table_offset, bme.table_size))
            pos += n
        if len(tables) != nb or _tables_bad(tables, self.cs):
            self.res.corruptions += 1
            self.find("bitmap-directory", table="bitmap directory", host_offset=doff)
            raise _Abort("EINVAL")
        for t_off, t_size in tables:
            self.inc(t_off, t_size * 8, "bitmap table")
            tab = self._read_u64s(t_off, t_size)
            for e in tab:
                off = e & BME_TABLE_ENTRY_OFFSET_MASK
                if (e & BME_TABLE_ENTRY_RESERVED_MASK or off & (self.cs - 1)
                        or (off and e & BME_TABLE_ENTRY_FLAG_ALL_ONES)):
                    self.res.corruptions += 1
                    self.find("bitmap-entry", table="bitmap table", host_offset=off)
                    continue
                if off:
                    self.inc(off, self.cs, "bitmap data")

    # --- refcount blocks (check_refblocks) ----------------------------------------------
    def check_refblocks(self) -> bool:
        rebuild = False
        fix_errors = bool(self.fix & 2)
        for i, ent in enumerate(self.reftable):
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

    def calculate_refcounts(self) -> bool:
        if not self.nb:
            self.grow_imrt(self.size_to_clusters(self.file_len))
        h = self.h
        self.inc(0, self.cs, "header")
        self.check_l1(h.l1_table_offset, h.l1_size, True, True, "active")
        if self.data_file and self.snapshots:
            self.msg(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
            self.find("snapshots-with-data-file", table="snapshot-table")
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) "
                         f"l1_offset={_hexc(sn.l1_table_offset)}: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                self.find("snapshot-l1-unaligned", table="snapshot-table",
                          host_offset=sn.l1_table_offset, snapshot=sn.id_str)
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) "
                         f"l1_size={_hexc(sn.l1_size)}: L1 table is too large; snapshot "
                         "table entry corrupted")
                self.res.corruptions += 1
                self.find("snapshot-l1-too-large", table="snapshot-table",
                          snapshot=sn.id_str)
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, False, False,
                          f"snapshot {sn.id_str}")
        self.inc(self.snapshots_offset, self.snapshots_size, "snapshot table")
        self.inc(self.reftable_offset, len(self.reftable) * 8, "refcount table")
        ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        if ext is not None and len(ext.data) >= 16:
            c_off, c_len = struct.unpack_from(">QQ", ext.data)
            if c_len:
                self.inc(c_off, c_len, "crypto header")
        self.check_bitmaps()
        return self.check_refblocks()

    # --- comparison (compare_refcounts) -------------------------------------------------
    def compare(self, fix: int) -> tuple[bool, int]:
        rebuild = False
        highest = 0
        res = self.res
        E = self.rb_entries
        imrt = self.imrt
        nb = self.nb
        for b in range((nb + E - 1) // E):
            lo = b * E
            hi = min(nb, lo + E)
            try:
                blk = self.refblock(b)
                bad = None
            except _RefErr as exc:
                blk, bad = None, exc
            if bad is not None:
                for i in range(lo, hi):
                    self.msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                continue
            comp = imrt[lo:hi]
            stored = blk[: hi - lo] if blk is not None else array(self.tc, bytes(
                (hi - lo) * self.itemsize))
            if stored == comp:
                for j in range(hi - lo - 1, -1, -1):
                    if comp[j]:
                        highest = lo + j
                        break
                continue
            for i in range(lo, hi):
                r1 = blk[i - lo] if blk is not None else 0
                r2 = imrt[i]
                if r1 or r2:
                    highest = i
                if r1 == r2:
                    continue
                counter = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & 1:
                    counter = "leaks_fixed"
                elif r1 < r2 and fix & 2:
                    counter = "corruptions_fixed"
                word = "Repairing" if counter else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {i} refcount={r1} reference={r2}")
                kind = "leak" if r1 > r2 else "refcount-too-low"
                if counter:
                    self.set_refcount(i, r2)
                    if r2 == 0:
                        try:
                            self.host.punch_hole(i << self.cbits, self.cs)
                        except (OSError, AttributeError):  # pragma: no cover
                            pass
                    setattr(res, counter, getattr(res, counter) + 1)
                    self.find(kind, True, table="refcount", index=i,
                              host_offset=i << self.cbits, refcount=r1, reference=r2)
                    continue
                self.find(kind, table="refcount", index=i, host_offset=i << self.cbits,
                          refcount=r1, reference=r2)
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        return rebuild, highest

    # --- rebuild (rebuild_refcount_structure) -------------------------------------------
    def alloc_imrt(self, count: int, first_free: list[int]) -> int:
        cluster = first_free[0]
        first_gap = True
        contig = 0
        imrt = self.imrt
        while cluster < self.nb and contig < count:
            if not imrt[cluster]:
                contig += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contig:
                contig = 0
            cluster += 1
        if contig < count:
            self.grow_imrt(cluster + count - contig)
        cluster -= contig
        for i in range(count):
            imrt[cluster + i] = 1
        return cluster << self.cbits

    def write_refblocks(self, first: int, end: int, reft: list[int]) -> bool:
        grown = False
        first_free = [0]
        E = self.rb_entries
        cluster = first
        while cluster < end:
            if not self.imrt[cluster]:
                cluster += 1
                continue
            idx = cluster >> self.rb_bits
            start = idx << self.rb_bits
            if len(reft) > idx and reft[idx]:
                rb_off = reft[idx]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                rb_off = self.alloc_imrt(1, first_free)
                if rb_off // self.cs >= end:
                    end = rb_off // self.cs + 1
                if len(reft) <= idx:
                    n = -(-((idx + 1) * 8) // self.cs) * self.cs // 8
                    reft.extend([0] * (n - len(reft)))
                    grown = True
                reft[idx] = rb_off
            assert start + E <= len(self.imrt)
            if not self.checked_write("", rb_off, encode_refblock(self.imrt[start:start + E],
                                                                self.order)):
                self.msg("diskimg: ERROR writing refblock: Input/output error")
                self.res.check_errors += 1
                raise _Abort("EIO")
            cluster = start + E
        return grown

    def rebuild(self) -> None:
        self.flush_refblocks()
        self.rb_cache.clear()
        reft: list[int] = []
        grown = self.write_refblocks(0, self.nb, reft)
        assert grown
        rt_off = -1
        while True:
            length = len(reft) * 8
            clusters = self.size_to_clusters(length)
            rt_off = self.alloc_imrt(clusters, [0])
            s = rt_off >> self.cbits
            if not self.write_refblocks(s, s + clusters, reft):
                break
        if not self.checked_write("", rt_off, pack_be_u64_array(array("Q", reft))):
            self.msg("diskimg: ERROR writing reftable: Input/output error")
            self.res.check_errors += 1
            raise _Abort("EIO")
        header_io.set_refcount_table(self.host, rt_off, clusters)
        self.host.flush()
        self.file_len = self.host.size()
        self.reftable = array("Q", reft)
        self.reftable_offset = rt_off
        self.rb_cache.clear()

    # --- OFLAG_COPIED (check_oflag_copied) ----------------------------------------------
    def check_oflag_copied(self) -> None:
        res = self.res
        fix = self.fix
        if fix & 2:
            repair = True
        elif fix & 1:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        step = 2 if self.ext_l2 else 1
        for i in range(len(self.l1)):
            l1e = self.l1[i]
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off:
                continue
            try:
                rc = self.get_refcount(l2_off >> self.cbits)
            except _RefErr:
                rc = None
            if rc is not None and (rc == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                         f"refcount={rc}")
                self.find("oflag-copied", repair, table="active L1", index=i,
                          host_offset=l2_off, refcount=rc)
                if repair:
                    new = l1e | OFLAG_COPIED if rc == 1 else l1e & ~OFLAG_COPIED
                    self.l1[i] = new
                    # qemu writes the 512-byte L1 chunk holding the entry; check that range
                    sector = self.h.l1_table_offset + 8 * (i & ~63)
                    what = self.overlap("active L1 table", sector, 512)
                    if what is not None:
                        self.signal_corruption("Preventing invalid write on metadata "
                                               f"(overlaps with {what})")
                        res.check_errors += 1
                        raise _Abort("EIO")
                    self.write(self.h.l1_table_offset + 8 * i, struct.pack(">Q", new))
                    self.host.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = self.pread(l2_off, self.cs)
            if raw.count(0) == len(raw):
                continue
            hosts = self._plain_hosts(raw)
            if hosts is not None and self._all_copied_once(raw, hosts):
                continue
            tab = be_u64_array(raw)
            dirty = 0
            for j in range(self.l2_size):
                e = tab[j * step]
                if not e:
                    continue
                typ = cluster_type(e, extended=self.ext_l2, has_data_file=self.data_file)
                if typ not in (_NORMAL, _ZERO_ALLOC):
                    continue
                if self.data_file:
                    rc = 1
                else:
                    try:
                        rc = self.get_refcount((e & L2E_OFFSET_MASK) >> self.cbits)
                    except _RefErr:
                        continue
                if (rc == 1) != bool(e & OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} "
                             f"refcount={rc}")
                    self.find("oflag-copied", repair, table="active L2", index=j,
                              host_offset=e & L2E_OFFSET_MASK,
                              guest_offset=(i * self.l2_size + j) * self.cs, refcount=rc)
                    if repair:
                        tab[j * step] = e | OFLAG_COPIED if rc == 1 else e & ~OFLAG_COPIED
                        dirty += 1
            if dirty:
                if not self.checked_write("active L2 table", l2_off, pack_be_u64_array(tab)):
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             "Input/output error")
                    res.check_errors += 1
                    raise _Abort("EIO")
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # --- the whole refcount check (qcow2_check_refcounts) -------------------------------
    def check_refcounts(self) -> None:
        res = self.res
        nb = self.size_to_clusters(self.file_len)
        if nb > INT_MAX:
            res.check_errors += 1
            raise _Abort("EFBIG")
        res.total_clusters = self.size_to_clusters((self.h.size // 512) * 512)
        self.grow_imrt(nb)
        rebuild = self.calculate_refcounts()
        pre = _counts(res)
        n_find = len(res.findings)
        r, highest = self.compare(0)
        rebuild = rebuild or r
        if rebuild and self.fix & 2:
            old = _counts(res)
            self.msg("Rebuilding refcount structure")
            self.rebuild()
            for f in res.findings[n_find:]:
                f["repaired"] = True
            res.corruptions = 0
            res.leaks = 0
            self.imrt = array(self.tc, bytes(len(self.imrt) * self.itemsize))
            fix, self.fix = self.fix, 0
            rebuild = self.calculate_refcounts()
            self.fix = fix
            fresh_leaks = 0
            if self.fix & 1:
                saved = _counts(res)
                _set_counts(res, (0, 0, 0, 0, 0))
                r, highest = self.compare(1)
                if r:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                _set_counts(res, saved)
            if res.corruptions < old[1]:
                res.corruptions_fixed += old[1] - res.corruptions
            if res.leaks < old[2]:
                res.leaks_fixed += old[2] - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Abort("EIO")
            if res.leaks or res.corruptions:
                _set_counts(res, pre)
                # the messages of the dry comparison stay; findings are replaced
                del res.findings[n_find:]
                r, highest = self.compare(self.fix)
        self.check_oflag_copied()
        res.image_end_offset = (highest + 1) * self.cs

    def run(self) -> None:
        self.read_snapshots()
        try:
            self.check_refcounts()
        finally:
            self.res.corruptions += self.snap_corruptions
            if self.rb_dirty and not self.dead:
                self.flush_refblocks()


def _tables_bad(tables: list[tuple[int, int]], cs: int) -> bool:
    return any(t_off & (cs - 1) or t_size * 8 > QCOW_MAX_L1_SIZE for t_off, t_size in tables)


def _hexc(v: int) -> str:
    """C's ``%#x``: 0 prints as ``0``."""
    return f"{v:#x}" if v else "0"


def _counts(res: CheckResult) -> tuple[int, int, int, int, int]:
    return (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
            res.leaks_fixed)


def _set_counts(res: CheckResult, c: tuple[int, int, int, int, int]) -> None:
    (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
     res.leaks_fixed) = c


_FIX = {None: 0, "leaks": 1, "all": 3}


def _one_pass(host: Any, header: Header, fix: int, filename: str) -> CheckResult:
    res = CheckResult(filename=filename)
    p = _Pass(host, header, fix, res)
    try:
        p.run()
    except _Abort as exc:
        res.error = exc.strerror
    res.marked_corrupt = p.marked_corrupt
    return res


def check_image(host: Any, header: Header, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` "leaks"/"all", repair) the qcow2 image in ``host``.

    ``header`` is the parsed header of ``host``.  Repair writes through ``host.pwrite`` and
    flushes; callers must drop their metadata caches afterwards (the refcount table may
    have moved).  Raises FormatError subclasses only for images too broken to check.
    """
    if repair not in _FIX:
        raise UsageError(f"Invalid repair mode '{repair}' (expected 'leaks' or 'all')")
    fix = _FIX[repair]
    if fix and not getattr(host, "writable", True):
        raise UsageError(f"'{host.path}' must be opened read-write to repair it")
    filename = str(getattr(host, "path", ""))
    res = _one_pass(host, header, fix, filename)
    if fix:
        first = res
        if fix & 2 and first.error is None and first.snapshot_repairs \
                and not first.marked_corrupt:
            _rewrite_snapshot_table(host, _reread_header(host, header), first)
        if (first.error is None and not first.check_errors and not first.corruptions
                and not first.marked_corrupt):
            _clear_incompat(host, header, QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)
        if first.error is None and (first.leaks_fixed or first.corruptions_fixed):
            hdr2 = _reread_header(host, header)
            res = _one_pass(host, hdr2, 0, filename)
            res.repair_messages = first.messages
            res.findings = first.findings + res.findings
            res.leaks_fixed = first.leaks_fixed
            res.corruptions_fixed = first.corruptions_fixed
            res.repaired = True
        # qemu marks the image clean when it closes it after opening it read-write (unless a
        # fatal corruption made it drop the image)
        if not first.marked_corrupt:
            _clear_incompat(host, header, QCOW2_INCOMPAT_DIRTY)
        host.flush()
    return res


def _rewrite_snapshot_table(host: Any, header: Header, res: CheckResult) -> None:
    """qemu's qcow2_check_fix_snapshot_table: write the entries the check kept to new
    clusters (oversized extra data cut to 1024 bytes; incomplete v3 entries given full
    extra data, a missing disk size becoming the image size as QEMU reads it), switch the
    header to them with one write, then free (and punch) the old table.  Runs after the
    refcount repair, so the stored refcounts are trusted for allocation."""
    from diskimg.qcow2.refcount import Refcounts
    from diskimg.qcow2.snapshot import pack_table_exact, read_entries

    old_off, keep, old_size = header.snapshots_offset, res.snapshots_kept, res.snapshots_size
    cs = header.cluster_size
    rc = Refcounts(host, header)
    new_off = 0
    if keep:
        snaps = read_entries(host, old_off, keep, min(QCOW_MAX_SNAPSHOTS_SIZE, old_size),
                             cut_extra=True)
        for i in res.incomplete_snapshots:
            if snaps[i].disk_size is None:
                snaps[i].disk_size = header.size
            snaps[i].extra_data_size = 24
        data = pack_table_exact(snaps)
        new_off = rc.alloc(-(-len(data) // cs))
        rc.flush()
        host.flush()
        host.pwrite(new_off, data)
        host.flush()
    header_io.set_snapshots(host, keep, new_off)
    host.flush()
    if old_size:
        first, last_c = old_off // cs, (old_off + old_size - 1) // cs
        if any(rc.get(c) == 0 for c in range(first, last_c + 1)):
            res.messages.append("qcow2_free_clusters failed: Invalid argument")
        else:
            rc.free(old_off, old_size)
            rc.flush()
            host.flush()
            for c in range(first, last_c + 1):
                if rc.get(c) == 0:
                    host.punch_hole(c * cs, cs)  # qemu discards freed snapshot clusters
    res.corruptions -= res.snapshot_repairs
    res.corruptions_fixed += res.snapshot_repairs


def _reread_header(host: Any, old: Header) -> Header:
    try:
        return Header.parse(host.pread(0, old.cluster_size), None)
    except FormatError as exc:  # pragma: no cover - we only rewrote the reftable pointer
        raise CorruptImageError(f"qcow2 header unreadable after repair: {exc}") from exc


def _clear_incompat(host: Any, header: Header, bits: int) -> None:
    if header.version < 3:
        return
    if header_io.update_incompat(host, clear_bits=bits):
        host.flush()
