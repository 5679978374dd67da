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

Package layout (QEMU's seams): ``state`` (one pass's state, reference counting and the
abort signals; the result is the format-neutral :class:`diskimg.check_report.CheckReport`,
alias ``CheckResult``, and the stored refcount blocks), ``walk`` (L1/L2 traversal),
``refcounts`` (compare, OFLAG_COPIED, repair).  Loaded only when
needed (start-up, issue 20): ``overlap`` (overlap protection and corruption signalling,
for writes and findings), ``snapshots`` (an image with a snapshot table, or a bad table
pointer), ``rebuild`` (``-r all`` of a broken refcount structure).
"""

from __future__ import annotations

from diskimg.errors import CorruptImageError, FormatError, UsageError
from diskimg.check_report import CheckReport
from diskimg.qcow2.check.refcounts import _Refcounts
from diskimg.qcow2.check.state import CheckResult, _Abort
from diskimg.qcow2.layout import (
    HDR_NB_SNAPSHOTS,
    HDR_SNAPSHOTS_OFFSET,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    Header,
    read_fields,
)
from diskimg.qcow2.layout import check_table_pointer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host

__all__ = ["CheckReport", "CheckResult", "check_image"]


class _Pass(_Refcounts):
    """One run of qemu's ``qcow2_co_check_locked`` (with or without a fix mode)."""

    def run(self) -> None:
        nb, off = read_fields(self.host, HDR_NB_SNAPSHOTS, HDR_SNAPSHOTS_OFFSET)
        if nb or check_table_pointer(0, off, self.cs) is not None:
            from diskimg.qcow2.check.snapshots import read_snapshots

            read_snapshots(self, nb, off)
        else:  # no snapshot table (and a valid offset): nothing to read, count or repair
            self.snapshots_offset = off
        try:
            self.check_refcounts()
        finally:
            self.res.corruptions += self.snap_corruptions
            if self.rb_dirty and not self.dead:
                self.flush_refblocks()


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


def check_image(host: Host, header: Header, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` "leaks"/"all", repair) the qcow2 image in ``host``.

    ``header`` is the parsed header of ``host``.  Repair writes through ``host.pwrite`` and
    flushes; callers must drop their metadata caches afterwards (the refcount table may
    have moved).  Raises FormatError subclasses only for images too broken to check.
    """
    if repair not in _FIX:
        raise UsageError(f"Invalid repair mode '{repair}' (expected 'leaks' or 'all')")
    fix = _FIX[repair]
    if fix and not host.writable:
        raise UsageError(f"'{host.name}' must be opened read-write to repair it")
    filename = host.name
    res = _one_pass(host, header, fix, filename)
    if fix:
        first = res
        if fix & 2 and first.error is None and first.snapshot_repairs \
                and not first.marked_corrupt:
            from diskimg.qcow2.check.snapshots import _rewrite_snapshot_table

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
        # qemu also marks the image clean when it closes it after a repair that left
        # refcount errors (``-r leaks`` where a rebuild is needed); diskimg keeps the dirty
        # bit then, so that the next read-write open rebuilds the refcounts before anything
        # is allocated over a cluster whose refcount is too low (compatibility.md)
        host.flush()
    return res


def _reread_header(host: Any, old: Header) -> Header:
    try:
        return Header.parse(host.pread(0, old.cluster_size), None)
    except FormatError as exc:  # pragma: no cover - we only rewrote the reftable pointer
        raise CorruptImageError(f"qcow2 header unreadable after repair: {exc}") from exc


def _clear_incompat(host: Any, header: Header, bits: int) -> None:
    if header.version < 3:
        return
    from diskimg.qcow2 import header_io  # (the writer: repairs only)

    if header_io.update_incompat(host, clear_bits=bits):
        host.flush()
