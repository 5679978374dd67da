"""qemu-img's ``-p`` progress lines, reproduced call for call.

qemu-img prints ``    (NN.NN/100%)\\r`` on stdout from ``qemu_progress_print(delta, max)``
(single-precision arithmetic; a line whenever the value moved by more than ``min_skip``
points, and always at 0 and 100) and ``\\n`` from ``qemu_progress_end()``.  *When* it calls
it depends on the command: convert reports the share of the allocated chunks it has claimed,
compare and rebase add a fixed share per chunk they finish.  :class:`Schedule` lists those
calls for given images (from block status alone, as qemu's own first pass does), each tied
to a guest offset; the library's percentage callbacks release them as the copy passes that
offset, so the same lines come out in the same order as qemu-img's.
"""

from __future__ import annotations

import struct
import sys

from diskimg.device import BlockDevice, Status
from diskimg.slotted import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO

SIZE_MISMATCH = "Warning: Image size mismatch!\n"
IO_BUF = 2 << 20  # qemu-img's IO_BUF_SIZE: the copy and compare chunk
SECTOR = 512
_MAX_REQUEST = (2**31 - 1) // SECTOR * SECTOR  # BDRV_REQUEST_MAX_BYTES (sector aligned)


def f32(x: float) -> float:
    """``x`` rounded to IEEE single precision (C ``float``)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


class QemuProgress:
    """qemu's progress state (``float`` current, last printed value and ``min_skip``).
    Disabled: prints nothing."""

    def __init__(self, enabled: bool, min_skip: float, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.out = out
        self.current = 0.0
        self.last = 0.0

    def report(self, delta: float, max_: int) -> None:
        """``qemu_progress_print(delta, max)``: ``max == 0`` sets the value to ``delta``,
        otherwise ``delta`` percent of ``max`` points are added."""
        if not self.enabled:
            return
        delta = f32(delta)
        cur = delta if max_ == 0 else f32(self.current + f32(f32(delta / 100) * max_))
        cur = min(cur, 100.0)
        self.current = cur
        if (cur > f32(self.last + self.min_skip) or cur < f32(self.last - self.min_skip)
                or cur in (0.0, 100.0)):
            self.last = cur
            out = self.out or sys.stdout
            out.write(f"    ({cur:3.2f}/100%)\r")
            out.flush()

    def end(self) -> None:
        """``qemu_progress_end()``: the newline that ends the progress line."""
        if self.enabled:
            out = self.out or sys.stdout
            out.write("\n")
            out.flush()


class Schedule(Record):
    """qemu's progress calls ``(offset, delta, max, text)`` for one command, in order; a call
    is made once the work has reached ``offset`` (bytes of the library's progress total).
    A step with ``text`` writes that text to the progress stream instead (a message qemu-img
    prints between progress lines).

    Use as the library's ``progress`` callback (it takes percentages of ``total``)."""

    __slots__ = ("printer", "total", "steps", "done")
    printer: QemuProgress
    total: int
    steps: list[tuple[int, float, int, str]]
    done: int

    def __init__(self, printer: QemuProgress, total: int,
                 steps: list[tuple[int, float, int, str]] | None = None, done: int = 0) -> None:
        self.printer = printer
        self.total = total
        self.steps = [] if steps is None else steps
        self.done = done

    @property
    def enabled(self) -> bool:
        """False when ``-p`` was not given (or ``-q`` was): nothing is printed."""
        return self.printer.enabled

    def add(self, offset: int, delta: float, max_: int) -> None:
        """Append the call ``qemu_progress_print(delta, max_)`` made at ``offset``."""
        self.steps.append((offset, delta, max_, ""))

    def add_text(self, offset: int, text: str) -> None:
        """Append ``text``, written at ``offset`` between the progress lines."""
        self.steps.append((offset, 0.0, 0, text))

    def __call__(self, percent: float) -> None:
        """The library's callback: release the calls up to ``percent`` of ``total``."""
        self.advance(round(percent * self.total / 100.0))

    def advance(self, offset: int) -> None:
        """Make every pending call whose offset is at most ``offset``."""
        steps = self.steps
        while self.done < len(steps) and steps[self.done][0] <= offset:
            _, delta, mx, text = steps[self.done]
            self.done += 1
            if not self.printer.enabled:
                continue
            if text:
                out = self.printer.out or sys.stdout
                out.write(text)
                out.flush()
            else:
                self.printer.report(delta, mx)

    def printed(self, text: str) -> bool:
        """Whether the text step ``text`` has been written."""
        return any(t == text for _, _, _, t in self.steps[: self.done])

    def complete(self) -> None:
        """The work is done: make every pending call (the line is not ended)."""
        self.advance(2**63)

    def finish(self) -> None:
        """The command succeeded: make every pending call and end the line."""
        self.complete()
        self.printer.end()

    def stop(self) -> None:
        """The command failed: end the line (qemu-img prints no 100 then)."""
        self.printer.end()


# --- convert -------------------------------------------------------------------------


def _grain(dev: BlockDevice) -> int | None:
    """The cluster size of a sparse vmdk or a qcow2 image, else None."""
    return dev.cluster_size or None


def _alignment(dev: BlockDevice) -> int:
    """Sectors a source's block-status runs are trimmed to (qemu-img's src_alignment:
    the format's cluster size, 1 sector for raw and flat images)."""
    return max(1, (_grain(dev) or 0) // SECTOR)


def _answer_end(dev: BlockDevice, off: int) -> int | None:
    """Where one block-status answer of ``dev``'s own driver for ``off`` ends at the
    latest: a sparse vmdk answers one grain at a time, a qcow2 image within one L2 table;
    None for a driver without such a bound (raw: its file's data and holes)."""
    grain = _grain(dev)
    if dev.format == "vmdk" and grain:
        return (off // grain + 1) * grain
    span = dev.l2_span  # guest bytes one L2 table maps (declared by qcow2)
    if dev.format == "qcow2" and span:
        return (off // span + 1) * span
    return None


def status_run(dev: BlockDevice, off: int, length: int,
               top_only: bool = False) -> tuple[Status, int]:
    """Block status at ``off`` (at most ``length`` bytes) with QEMU's run lengths: a
    sparse vmdk answers one grain at a time, a qcow2 image one run of clusters of the same
    kind (and contiguous host offsets) within one L2 table.  A range a layer leaves to its
    backing file is asked of that file for the length of the layer's own answer, so the
    run also ends where that answer ends (the layer's next cluster of another kind, such
    as unallocated subclusters of an allocated cluster next to an unallocated cluster, or
    its L2 table's end), and where the answering file's own answer ends (its smaller L2
    tables or grains)."""
    def one(o: int, n: int) -> tuple[Status, int]:
        return dev.block_status(o, n, top_only=top_only)

    st, depth = one(off, length)
    end = off + length
    chain = dev.chain()
    cut = _answer_end(chain[depth], off)
    if cut is not None:
        end = min(end, cut)
    for layer in chain[:depth]:  # each layer that left the range to the next one
        own, _ = status_run(layer, off, end - off, top_only=True)
        end = min(end, off + own.length)
    n = min(st.length, end - off)
    if dev.format != "qcow2":
        return Status(n, st.allocated, st.data, st.zero, st.offset, st.filename), depth
    while off + n < end:
        nxt, d2 = one(off + n, end - off - n)
        same = (nxt.allocated, nxt.data, nxt.zero, d2) == (st.allocated, st.data, st.zero, depth)
        if st.offset is not None:
            same = same and nxt.offset == st.offset + n
        elif st.data:
            same = False  # compressed or encrypted clusters: one at a time
        if not same:
            break
        n += min(nxt.length, end - off - n)
    return Status(n, st.allocated, st.data, st.zero, st.offset, st.filename), depth


def convert_schedule(printer: QemuProgress, devs: Sequence[BlockDevice], *,
                     target_backing: bool = False, backing_sectors: int = -1,
                     min_sparse: int = 4096, compress_cluster: int = 0) -> Schedule:
    """qemu-img convert's progress after its first line (0, which qemu-img prints before
    it opens anything: the caller's): after claiming each chunk that will be copied (data,
    or zeros with ``-S 0``) the share of such sectors claimed so far, then 100.  Chunks
    follow qemu's iteration: block-status runs trimmed to the source's cluster alignment,
    data cut at 2 MiB, whole clusters when compressing (``compress_cluster`` bytes, 0 = not
    compressing: ``-c``, or a target that compresses every write).

    ``target_backing`` (``-B``): only the sources' own layers count, a range they leave to
    their backing file is the target's backing file's.  ``backing_sectors``: the size of a
    new target's backing file in sectors (qemu's ``target_backing_sectors``, -1 unknown):
    requests are split there, and zeros past it are left to the target (not counted)."""
    total_sectors = sum(-(-d.size // SECTOR) for d in devs)
    starts = []
    pos = 0
    for d in devs:
        starts.append(pos)
        pos += -(-d.size // SECTOR)
    csec = compress_cluster // SECTOR
    buf = csec or IO_BUF // SECTOR  # compressing: one cluster at a time
    chunks: list[tuple[int, int, bool]] = []  # (sector, sectors, counted)
    status = "data"
    next_status = 0
    sector = 0
    while sector < total_sectors:
        n = min(total_sectors - sector, _MAX_REQUEST // SECTOR)
        post_backing_zero = False
        if backing_sectors >= 0:
            if sector >= backing_sectors:
                post_backing_zero = True
            elif sector + n > backing_sectors:
                n = backing_sectors - sector  # zeros are handled differently from there
        if next_status <= sector:
            k = max(i for i, s in enumerate(starts) if s <= sector)
            dev, base = devs[k], starts[k]
            off = (sector - base) * SECTOR
            want = min(n * SECTOR, dev.size - off)
            st, _ = status_run(dev, off, want, top_only=target_backing)
            if target_backing:
                # this layer alone: where it leaves the range to no backing file, or to
                # one that ends before ``off``, qemu's block status says zeros
                below = dev.backing
                zero = st.zero or (not st.allocated and not st.data
                                   and (below is None or off >= below.size))
                data = st.data and st.allocated
            else:
                zero = st.zero or (not st.allocated and not st.data)
                data = st.data
            n = max(1, -(-min(st.length, want) // SECTOR))
            tail = (sector - base + n) % _alignment(dev)
            if n > tail:
                n -= tail
            if zero:
                status = "backing" if post_backing_zero else "zero"
            else:
                status = "data" if data or not target_backing else "backing"
            next_status = sector + n
        n = min(n, next_status - sector)
        if status == "data":
            n = min(n, buf)
        if csec:
            if n < csec:
                n = min(csec, total_sectors - sector)
                status = "data"
            else:
                n = n // csec * csec
        counted = status == "data" or (min_sparse == 0 and status == "zero")
        if counted and status == "zero":
            n = min(n, buf)
        chunks.append((sector, n, counted))
        sector += n
    allocated = sum(n for _, n, c in chunks if c)
    sched = Schedule(printer, total_sectors * SECTOR)
    done = 0
    for s, n, counted in chunks:
        if counted:
            done += n
            sched.add(s * SECTOR, 100.0 * done / allocated, 0)
    sched.add(total_sectors * SECTOR, 100.0, 0)
    return sched


# --- compare -------------------------------------------------------------------------


def _reads_zero(dev: BlockDevice, off: int, size: int) -> tuple[int, bool]:
    st, _ = status_run(dev, off, size - off)
    return st.length, st.zero or (not st.allocated and not st.data)


def compare_schedule(printer: QemuProgress, d1: BlockDevice, d2: BlockDevice) -> Schedule:
    """qemu-img compare's progress: 0, then after each chunk (a run both images read as
    zeros whole, anything else cut at 2 MiB) its share of the larger size, single
    precision, accumulated; the tail of the longer image likewise."""
    s1, s2 = d1.size, d2.size
    common, total = min(s1, s2), max(s1, s2)
    sched = Schedule(printer, total)
    sched.add(-1, 0.0, 100)
    ftotal = f32(total)

    def step(end: int, chunk: int) -> None:
        sched.add(end, f32(f32(f32(chunk) / ftotal) * 100), 100)

    pos = 0
    while pos < common:
        n1, z1 = _reads_zero(d1, pos, s1)
        n2, z2 = _reads_zero(d2, pos, s2)
        n = min(n1, n2)
        if not (z1 and z2):
            n = min(n, IO_BUF)
        pos += n
        step(pos, n)
    if s1 != s2:
        sched.add_text(common, SIZE_MISMATCH)
    longer = d1 if s1 > s2 else d2
    while pos < total:
        n, z = _reads_zero(longer, pos, total)
        if not z:
            n = min(n, IO_BUF)
        pos += n
        step(pos, n)
    return sched


# --- rebase --------------------------------------------------------------------------


def rebase_schedule(printer: QemuProgress, dev: BlockDevice,
                    prefix_depth: int | None = None) -> Schedule:
    """qemu-img rebase's progress (safe mode) after its first line (0, printed by the
    command before it opens the image): ``100 / (size / 2 MiB)`` points for each run (at
    most 2 MiB) that the image does not allocate itself and so has to be compared with
    the new backing file, then 100.  With ``prefix_depth`` (the new backing
    file is that image of the old chain) only runs some image above it allocates count."""
    size = dev.size
    sched = Schedule(printer, size)
    if size:
        share = f32(f32(100.0) / f32(size // min(size, IO_BUF)))
        pos = 0
        while pos < size:
            run = dev.plan(pos, min(IO_BUF, size - pos))  # this layer only
            n = run.length
            if not run.allocated:
                if prefix_depth is not None:
                    n, counts = _allocated_between(dev, pos, n, prefix_depth)
                else:
                    counts = True
                if counts:
                    sched.add(pos + n, share, 100)
            pos += n
    sched.add(size, 100.0, 0)
    return sched


def _allocated_between(dev: BlockDevice, pos: int, n: int, prefix: int) -> tuple[int, bool]:
    """Length of the run at ``pos`` and whether an image strictly between ``dev`` and the
    chain member at depth ``prefix`` allocates it."""
    chain = dev.chain()
    for d in chain[1:prefix]:
        if pos >= d.size:
            return n, False
        run = d.plan(pos, min(n, d.size - pos))
        n = min(n, run.length)
        if run.allocated:
            return n, True
    return n, False


# --- commit --------------------------------------------------------------------------

_MIRROR_IO = 1 << 20  # the most data one operation of the commit (mirror) job copies
_MIRROR_WINDOW = 16 << 20  # its buffer: the most one of its iterations takes on


def _granularity(base: BlockDevice) -> int:
    """The dirty-bitmap granularity of qemu's commit job: the base's cluster size within
    4 KiB .. 64 KiB, 64 KiB for a base without clusters."""
    cs = base.cluster_size
    return min(65536, max(4096, cs)) if cs else 65536


def commit_schedule(printer: QemuProgress, top: BlockDevice, base_depth: int) -> Schedule:
    """qemu-img commit's progress after its first line (0, printed by the command once the
    image is open): the job's bytes done over its bytes to do, polled as the job runs.
    The job marks dirty every granule (:func:`_granularity`) some image above the base
    allocates, and copies each run of dirty granules (at most 16 MiB at a time) in
    operations that follow the image's block status, 1 MiB at most for data, whole
    granules (cut at the end of the disk).  qemu-img polls on every event, so how often it
    repeats a value depends on timing; this is the sequence of one poll before the job
    starts, one per finished operation and one after it ends."""
    size = top.size
    gran = _granularity(top.chain()[base_depth])
    dirty: list[list[int]] = []  # granule-aligned [start, end) ranges, merged
    pos = 0
    while pos < size:
        st, depth = top.block_status(pos, size - pos)
        if st.allocated and depth < base_depth:
            a, b = pos // gran * gran, -(-(pos + st.length) // gran) * gran
            if dirty and dirty[-1][1] >= a:
                dirty[-1][1] = max(dirty[-1][1], b)
            else:
                dirty.append([a, b])
        pos += st.length
    total = sum(b - a for a, b in dirty)
    sched = Schedule(printer, size)
    sched.add(-1, 0.0, 0)
    done = 0
    for a, b in dirty:
        for w in range(a, b, _MIRROR_WINDOW):
            off, end = w, min(b, w + _MIRROR_WINDOW)
            while off < end:
                st, _ = status_run(top, off, min(end, size) - off) if off < size else \
                    (Status(gran, True, True, False), 0)
                n = st.length
                if st.data and not st.zero:
                    n = min(n, _MIRROR_IO)
                n = max(gran, n - n % gran)
                n = min(n, end - off)
                done += min(n, size - off)  # the last granule is cut at the end of the disk
                off += n
                sched.add(min(off, size), f32(f32(f32(done) / f32(total)) * 100), 0)
    sched.add(size, 100.0, 0)
    sched.add(size, 100.0, 0)
    return sched


class Progress:
    """Callable taking percentages of the whole job: qemu's line whenever the value moved
    by more than ``min_skip`` points, always at 0 and 100 (a simple progress bar for jobs
    without a qemu schedule).  Disabled: does nothing."""

    def __init__(self, enabled: bool, min_skip: float = 1.0, out: TextIO | None = None):
        self.printer = QemuProgress(enabled, min_skip, out)
        self.enabled = enabled

    def __call__(self, percent: float) -> None:
        """Set the progress to ``percent`` (0..100)."""
        self.printer.report(min(100.0, max(0.0, percent)), 0)

    def finish(self) -> None:
        """Print 100 and end the line."""
        self.printer.report(100.0, 0)
        self.printer.end()

    def end(self) -> None:
        """End the progress line."""
        self.printer.end()
