"""The copy operations behind ``diskimg convert``, ``compare``, ``dd``, ``commit`` and
``rebase``, one job per module:

- this package itself: what every copy operation shares (chunk size, source type,
  opening a source, telling a URL or stream target from a file; :mod:`.common` re-exports
  it by its old names);
- zero detection and sparse runs of a copy buffer (``-S``), below (:mod:`.zero`
  re-exports them by their old names);
- :mod:`.readahead`: block-status plans of the sources, background reads and decoding;
- :mod:`.copier`: the convert copy loop writing a plan to the target;
- :mod:`.copy_options`: the copy's ``-r`` rate limit and ``--salvage`` (loaded with them);
- :mod:`.convert`, :mod:`.compare`, :mod:`.dd`: the commands;
- :mod:`.chain`: ``commit`` and ``rebase`` over backing chains;
- :mod:`.checksum`: ovirt-imageio's blkhash checksum of the guest content;
- :mod:`.bench`: qemu-img bench's sequential I/O benchmark;
- :mod:`.commands`: ``info``, ``check``, ``map``, ``measure``, ``amend``, ``snapshot``,
  ``resize`` by path (the module-level functions of :mod:`diskimg`).

Loaded on first use (``diskimg.convert`` ...): the CLI's ``info``/``check``/``map`` never
load it.  Importing the package loads none of its modules: ``diskimg.convert`` loads
:mod:`.convert` and what it uses, not :mod:`.chain` or :mod:`.compare` (start-up, issue 20:
the shared names live here, not in a module of their own, which every command would load).
``diskimg.operations`` re-exports every name that lived there before."""

from __future__ import annotations

import os
import stat
import sys

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.hostio import all_zero

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeAlias, TypeGuard

CHUNK = 2 << 20  # qemu-img convert's buffer: 4096 sectors
SECTOR = 512
_ZEROS = bytes(CHUNK)

Source = str | os.PathLike[str] | BlockDevice
#: (a string at run time: start-up, issue 20, loads no collections.abc for it)
ProgressFn: TypeAlias = "Callable[[float], None]"


def _open(src: Source, fmt: str | None, kw: Mapping[str, Any],
          mode: str = "r") -> tuple[BlockDevice, bool]:
    """``(device, owned)``: ``owned`` devices were opened here (in ``mode``) and must be
    closed."""
    if isinstance(src, BlockDevice):
        return src, False
    return api.open(src, mode, fmt, **kw), True


def is_url_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a URL string (:func:`diskimg.hostio.urls.is_url`), told for a
    file name without importing the URL module (start-up, issue 20): the one pre-test."""
    if not isinstance(name, str) or "://" not in name:
        return False
    from diskimg.hostio.urls import is_url

    return is_url(name)


def is_stream_path(dst: str | os.PathLike[str]) -> bool:
    """Whether the target named ``dst`` is written as a stream (see
    :func:`diskimg.ops.stream_convert.is_stream`): a URL other than an NBD one (a new
    object), or the path of a FIFO or a socket.  Here, not there, so that a convert to a
    file decides without importing the streaming code (start-up, issue 20)."""
    if is_url_name(dst):
        from diskimg.nbd.url import is_nbd_url

        return not is_nbd_url(dst)  # an NBD export is written in place, as a device
    try:
        mode = os.stat(dst).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


# --- zero detection and sparse runs of a copy buffer (qemu-img convert -S) ----------
# Which sectors of a chunk hold any non-zero byte.  Invariant: a run reported zero is all
# zero bytes; nothing else is decided here.

_ZERO_SECTOR = bytes(SECTOR)
_ZERO_WORD = bytes(8)
#: the longest piece compared at once: ``_ZEROS`` (CHUNK bytes) is calloc'd memory whose
#: pages the kernel maps (to its zero page) one fault per 4 KiB page at first read, so
#: comparing whole chunks cost 512 faults (~0.5 ms) on the first zero chunk of a copy;
#: pieces of this size read only its first 64 pages (8 comparisons per chunk instead of 1)
_ZERO_RUN = 256 << 10


def _nonzero_at(buf: Any, pos: int, end: int) -> int:
    """First index in [pos, end) of a non-zero byte, else ``end``.

    Compares views of ``buf`` against one zero ``bytes`` with ``bytes.startswith`` (a
    memcmp that stops at the first difference, no copy of either side: slicing a
    bytearray or an mmap copies), in ``_ZERO_RUN`` pieces first, then 64 KiB and 512-byte
    blocks up to the one that holds the answer, where ``bytes.lstrip`` finds the byte (no
    regex: ``re`` costs start-up, issue 20)."""
    mv = memoryview(buf)
    p = pos
    for step in (_ZERO_RUN, 65536, SECTOR):
        while p < end:
            q = min(end, p + step)
            if not _ZEROS.startswith(mv[p:q]):
                break
            p = q
        else:
            return end
    block = bytes(mv[p : min(end, p + SECTOR)])  # at most one sector
    k = len(block) - len(block.lstrip(b"\0"))
    return p + k if k < len(block) else end


is_zero = all_zero  # the old name of the one zero test (diskimg.hostio.all_zero)


#: :func:`_first_zero_head` tests the 8-byte heads of the sectors whose first byte is
#: zero one by one up to this many of them in a buffer, else all at once
_FEW_ZERO_BYTES = 32


def _first_zero_head(buf: Any, pos: int, end: int) -> int:
    """Start of the first whole sector in [pos, end) (aligned to ``pos``) whose first 8
    bytes are zero, else ``end``.  Reads the first byte of each sector (an extended slice
    of ``buf``: a byte loop in C) and tests the 8-byte head only of the sectors where it
    is zero, when they are few; otherwise one word per sector (a strided memoryview copy,
    which moves each word with its own memcpy call: 150 thousand instructions for a 2 MiB
    buffer, against 15 thousand for the byte slice).  Data without zero sectors is ruled
    out without touching most of its bytes."""
    m = (end - pos) // SECTOR
    if m <= 0:
        return end
    stop = pos + m * SECTOR
    mm = sys.modules.get("mmap")  # (loaded if buf is one)
    if isinstance(buf, bytes | bytearray) or (mm is not None and isinstance(buf, mm.mmap)):
        firsts = buf[pos:stop:SECTOR]  # (bytes: the first byte of each sector)
        if firsts.count(0) <= _FEW_ZERO_BYTES:
            mv = memoryview(buf)
            i = firsts.find(0)
            while i >= 0:
                s = pos + i * SECTOR
                if _ZERO_WORD == mv[s : s + 8]:
                    return s
                i = firsts.find(0, i + 1)
            return end
    heads = memoryview(buf)[pos:stop].cast("Q")[:: SECTOR // 8].tobytes()
    p = heads.find(_ZERO_WORD)
    while p > 0 and p % 8:  # a zero run straddling two heads: not a zero head
        p = heads.find(_ZERO_WORD, p + 8 - p % 8)
    return end if p < 0 else pos + p // 8 * SECTOR


def _next_zero_sector(buf: bytearray, pos: int, end: int) -> int:
    """Start of the first fully zero 512-byte sector at or after ``pos`` (sector aligned)."""
    pos = _first_zero_head(buf, pos, end)  # no zero sector before the first zero head
    i = pos
    while i < end:
        p = buf.find(_ZERO_SECTOR, i, end)
        if p < 0:
            return end
        s = pos + -(-(p - pos) // SECTOR) * SECTOR
        if s + SECTOR > end:
            return end
        nz = _nonzero_at(buf, s, s + SECTOR)
        if nz >= s + SECTOR:
            return s
        i = nz
    return end


def _allocated_sectors(buf: bytearray, pos: int, end: int, sector: int,
                       alignment: int) -> tuple[bool, int]:
    """qemu's ``is_allocated_sectors``: (is data, run length in sectors) at ``pos``."""
    n = -(-(end - pos) // SECTOR)
    first_zero = _nonzero_at(buf, pos, min(end, pos + SECTOR)) >= min(end, pos + SECTOR)
    if first_zero:
        i = (_nonzero_at(buf, pos, end) - pos) // SECTOR
    else:
        i = -(-(_next_zero_sector(buf, pos, end) - pos) // SECTOR)
    if i >= n:
        return not first_zero, n
    data = not first_zero
    tail = (sector + i) & (alignment - 1)
    if tail:
        if not data and i <= tail:
            data = True
        if data:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return data, i


def sparse_runs(buf: bytearray, length: int, min_sparse: int, offset: int,
                alignment: int = 8) -> list[tuple[int, int, bool]]:
    """Split ``buf[:length]`` into (start, length, is_data) runs like qemu-img convert -S:
    zero runs at the start count as holes, inner zero runs need ``min_sparse`` bytes.
    ``offset`` is the guest offset of ``buf[0]``; ``alignment`` is in sectors."""
    out: list[tuple[int, int, bool]] = []
    pos = 0
    min_sec = max(1, min_sparse // SECTOR)
    while pos < length:
        sector = (offset + pos) // SECTOR
        total = -(-(length - pos) // SECTOR)
        mn = min(min_sec, total)
        data, cnt = _allocated_sectors(buf, pos, length, sector, alignment)
        if data:
            used = checked = cnt
            while checked < total:
                p = pos + checked * SECTOR
                d2, c2 = _allocated_sectors(buf, p, length, sector + checked, alignment)
                checked += max(c2, 1)  # always progress
                if d2:
                    used = checked
                elif c2 >= mn:
                    break
            cnt = used
        run = min(max(cnt, 1) * SECTOR, length - pos)  # always progress (tail < 1 sector)
        if out and out[-1][2] == data:
            s, ln, _ = out[-1]
            out[-1] = (s, ln + run, data)
        else:
            out.append((pos, run, data))
        pos += run
    return out
