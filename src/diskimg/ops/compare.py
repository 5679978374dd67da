"""``compare``: the first guest offset where two images differ (qemu-img compare);
``strict`` also tells allocated zeros from holes.  Reads only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diskimg.device import BlockDevice

if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    pass

from diskimg.ops import _ZEROS, CHUNK, SECTOR, ProgressFn, Source, _nonzero_at, _open
from diskimg.params import renamed

# --- compare ------------------------------------------------------------------------


def _first_diff_sector(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Byte offset (sector aligned) of the first 512-byte sector where a and b differ."""
    lo, hi = 0, len(a)
    # binary search on prefix equality: C-speed slices
    while hi - lo > SECTOR:
        mid = lo + max(SECTOR, (hi - lo) // 2 // SECTOR * SECTOR)
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def compare(
    a: Source,
    b: Source,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    progress: ProgressFn | None = None,
    *,
    format: str | tuple[str | None, str | None] | None = None,  # noqa: A002
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> tuple[bool, int | None, str]:
    """Compare guest contents like ``qemu-img compare``.

    Returns ``(identical, mismatch_offset, message)``; ``message`` is what qemu-img prints
    (possibly two lines).  Without ``strict`` a longer image whose tail reads as zeros is
    identical (with a size warning); with ``strict`` any size or allocation difference is a
    mismatch.  ``format`` is both images' format, or a ``(format of a, format of b)``
    pair (None probes); the positional ``fmt_a``/``fmt_b`` are deprecated.
    """
    fa, fb = format if isinstance(format, tuple) else (format, format)
    fmt_a = renamed("format", fa, "fmt_a", fmt_a)
    fmt_b = renamed("format", fb, "fmt_b", fmt_b)
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    d1, own1 = _open(a, fmt_a, kw)
    try:
        d2, own2 = _open(b, fmt_b, kw)
        try:
            return _compare(d1, d2, strict, progress)
        finally:
            if own2:
                d2.close()
    finally:
        if own1:
            d1.close()


def _compare(d1: BlockDevice, d2: BlockDevice, strict: bool,
             progress: ProgressFn | None) -> tuple[bool, int | None, str]:
    s1, s2 = d1.size, d2.size
    if strict and s1 != s2:
        return False, None, "Strict mode: Image size mismatch!"
    common, total = min(s1, s2), max(s1, s2)
    if progress is not None:
        progress(0.0)
    pos = 0
    while pos < common:
        st1, _ = d1.block_status(pos, common - pos)
        st2, _ = d2.block_status(pos, common - pos)
        n = min(st1.length, st2.length, CHUNK)
        z1 = st1.zero or (not st1.allocated and not st1.data)
        z2 = st2.zero or (not st2.allocated and not st2.data)
        if strict and (st1.allocated, z1) != (st2.allocated, z2):
            return False, pos, f"Strict mode: Offset {pos} block status mismatch!"
        if not (z1 and z2):
            b1 = _ZEROS[:n] if z1 else d1.read(pos, n)
            b2 = _ZEROS[:n] if z2 else d2.read(pos, n)
            if b1 != b2:
                off = pos + _first_diff_sector(b1, b2)
                return False, off, f"Content mismatch at offset {off}!"
        pos += n
        if progress is not None:
            progress(pos * 100.0 / total if total else 100.0)
    msg = ""
    if s1 != s2:
        msg = "Warning: Image size mismatch!\n"
        longer = d1 if s1 > s2 else d2
        while pos < total:
            st, _ = longer.block_status(pos, total - pos)
            n = min(st.length, CHUNK)
            if not (st.zero or (not st.allocated and not st.data)):
                data = longer.read(pos, n)
                nz = _nonzero_at(data, 0, n)
                if nz < n:
                    off = pos + (nz // SECTOR) * SECTOR
                    return False, off, f"{msg}Content mismatch at offset {off}!"
            pos += n
            if progress is not None:
                progress(pos * 100.0 / total)
    return True, None, msg + "Images are identical."
