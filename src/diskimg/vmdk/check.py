"""``check`` of a vmdk (qemu-img check's rules, plus findings qemu does not report):
grain table entries must point inside their file; the redundant grain directory and
tables should equal the primary ones; a streamOptimized file is linted against VMware's
layout (:mod:`diskimg.vmdk.lint`).  Imported by :meth:`VmdkImage.check
<diskimg.vmdk.image.VmdkImage.check>` only: opening, reading and info do not load it
(start-up, issue 20)."""

from __future__ import annotations

from diskimg.check_report import CheckReport
from diskimg.errors import DiskImgError
from diskimg.hostio import all_zero
from diskimg.vmdk import sparse as S
from diskimg.vmdk.sparse_extent import _COMPRESSED, _DATA, SparseExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.vmdk.image import VmdkImage


def check_image(img: VmdkImage) -> CheckReport:
    """qemu-img check for vmdk: grain table entries must point inside their file."""
    res = CheckReport(filename=img.filename, format="vmdk")
    res.findings.extend(img.lint())
    for e in img.extents:
        if isinstance(e, SparseExtent):
            try:
                res.findings.extend(check_redundant(e))
                for _off, msg in check_grains(e):
                    res.messages.append(msg)
                    res.corruptions += 1
                    res.error = "Invalid argument"     # qemu 7.2 fails the check
                    res.findings.append({"extent": e.filename, "problem": msg})
            except DiskImgError as err:
                res.check_errors += 1
                res.messages.append(f"ERROR: {err}")
    return res


def check_redundant(ext: SparseExtent) -> list[dict[str, Any]]:
    """Findings where the redundant grain directory / tables disagree with the primary
    ones (qemu neither reads nor checks them; VMware tools repair from them)."""
    h = ext.header
    if not h.flags & S.FLAG_RGD or ext.compressed:
        return []
    n = ext.geo.gt_bytes
    # (a writable extent's copy in memory is what the file holds: new entries are
    # written through)
    rgd = S.le_u32_array(ext.host.pread_exact(h.rgd_offset * S.SECTOR, len(ext.gd) * 4,
                                              "redundant grain directory"))
    out: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(zip(ext.gd, rgd, strict=True)):
        if bool(a) != bool(b) or (a and ext.host.pread(a * S.SECTOR, n) !=
                                  ext.host.pread(b * S.SECTOR, n)):
            out.append({"extent": ext.filename, "offset": b * S.SECTOR,
                        "problem": f"redundant grain table {i} differs from the primary"})
            if len(out) >= 100:
                break
    return out


def check_grains(ext: SparseExtent) -> list[tuple[int, str]]:
    """(guest offset, message) for grain table entries pointing past the file end.  A
    table whose largest entry points inside the file (an empty one: all zeros) holds none
    and is not walked entry by entry (a 1 TiB image has 16 Mi entries)."""
    out: list[tuple[int, str]] = []
    fsize = ext.host.size()
    for gdi in range(len(ext.gd)):
        t = ext._gt(gdi)
        if t is None or all_zero(t) or max(t) * S.SECTOR < fsize:
            continue
        for idx, gte in enumerate(t):
            if ext._classify(gte) in (_DATA, _COMPRESSED) and gte * S.SECTOR >= fsize:
                g = gdi * ext.geo.gtes + idx
                out.append((g * ext.gb, f"ERROR: cluster offset for sector "
                                         f"{g * ext.gb // S.SECTOR} points after EOF"))
                return out
    return out
