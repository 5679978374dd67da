"""VMware-acceptance lint of a streamOptimized extent: its records walked against VMware's
published layout.  Loaded by :meth:`VmdkImage.lint <diskimg.vmdk.image.VmdkImage.lint>`
(``check`` of a streamOptimized image) only: opening and reading an image do not import it
(start-up, issue 20).  The records are decoded by :mod:`diskimg.vmdk.sparse` and
:mod:`diskimg.vmdk.markers`.
"""

from __future__ import annotations

from diskimg.errors import FormatError
from diskimg.vmdk.markers import (
    GRAIN_MARKER,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    Marker,
)
from diskimg.vmdk.sparse import (
    COMPRESSION_DEFLATE,
    EOL_CHARS,
    FLAG_COMPRESS,
    FLAG_MARKER,
    FLAG_NL_DETECT,
    GD_AT_END,
    MAX_GTES,
    SECTOR,
    SparseHeader,
    le_u32_array,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def lint_stream(read: Callable[[int, int], bytes], file_size: int,
                descriptor: str | None) -> list[dict[str, object]]:
    """Structural check of a streamOptimized extent against VMware's published layout
    (Virtual Disk Format 1.1, "Stream-Optimized Compressed Sparse Extents").

    ``read(offset, n)`` reads the file.  Returns findings ``{"offset", "problem"}``; empty
    when VMware's importers would accept the structure.  Walks every record once, so time
    is linear in the number of grains and memory bounded by one grain table.
    """
    out: list[dict[str, object]] = []

    def bad(off: int, msg: str) -> None:
        if len(out) < 100:
            out.append({"offset": off, "problem": msg})

    try:
        h = SparseHeader.parse(read(0, SECTOR))
    except FormatError as err:
        return [{"offset": 0, "problem": str(err)}]
    if h.version != 3:
        bad(4, f"version is {h.version}, VMware expects 3 for streamOptimized")
    want = FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER
    if h.flags & want != want:
        bad(8, f"flags {h.flags:#x} lack newline detection, compressed grains or markers")
    if h.compress_algorithm != COMPRESSION_DEFLATE:
        bad(77, f"compressAlgorithm is {h.compress_algorithm}, expected 1 (deflate)")
    if h.grain_size != 128:
        bad(20, f"grainSize is {h.grain_size} sectors; VMware writes 128 (64 KiB)")
    if h.num_gtes_per_gt != MAX_GTES:
        bad(44, f"numGTEsPerGT is {h.num_gtes_per_gt}, expected 512")
    if h.gd_offset != GD_AT_END:
        bad(56, "gdOffset is not GD_AT_END (-1): the grain directory must follow the grains")
    if h.eol != EOL_CHARS:
        bad(73, "newline detection characters are not '\\n \\r\\n'")
    if file_size % SECTOR:
        bad(file_size, "file size is not a multiple of 512")
    if descriptor is not None:
        if 'createType="streamOptimized"' not in descriptor:
            bad(h.desc_offset * SECTOR, 'descriptor lacks createType="streamOptimized" '
                "(quoted)")
        for key in ("ddb.virtualHWVersion", "ddb.toolsVersion", "ddb.adapterType"):
            if key not in descriptor:
                bad(h.desc_offset * SECTOR, f"descriptor lacks {key}")
    if h.grain_size == 0 or h.num_gtes_per_gt == 0 or h.overhead == 0:
        return out
    gb = h.grain_size * SECTOR
    pos = h.overhead * SECTOR
    gt_sectors = -(-h.num_gtes_per_gt * 4 // SECTOR)
    gd_entries = -(-h.capacity // (h.grain_size * h.num_gtes_per_gt))
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_entries: dict[int, int] = {}     # grain sector -> lba, since the last grain table
    gts: dict[int, int] = {}            # GT sector -> the table index its entries imply
    gd: list[int] | None = None
    last_lba = -1
    seen_footer = seen_eos = False
    while pos + 12 <= file_size and not seen_eos:
        val, size = GRAIN_MARKER.unpack(read(pos, 12))
        if size:
            if size > gb + (gb >> 8) + 1024 or pos + 12 + size > file_size:
                bad(pos, f"grain marker size {size} is impossible")
                break
            if val % h.grain_size or val <= last_lba or val >= h.capacity:
                bad(pos, f"grain lba {val} is unaligned, out of order or past capacity")
            last_lba = val
            gt_entries[pos // SECTOR] = val
            pos += -(-(12 + size) // SECTOR) * SECTOR
            continue
        m = Marker.parse(read(pos, SECTOR))
        body = pos + SECTOR
        if m.type == MARKER_EOS:
            seen_eos = True
            if body != file_size:
                bad(pos, "end-of-stream marker is not the last sector")
        elif m.type in (MARKER_GT, MARKER_GD):
            n = m.value * SECTOR
            expect = gt_sectors if m.type == MARKER_GT else gd_sectors
            if body + n > file_size:
                bad(pos, "table marker runs past the end of the file")
                break
            if m.value != expect:
                bad(pos, f"{'GT' if m.type == MARKER_GT else 'GD'} marker claims {m.value} "
                         f"sectors; the table has {expect}")
                if m.value > expect:    # a size that lies: stop before reading it
                    break
            ents = le_u32_array(read(body, n)).tolist()
            if m.type == MARKER_GT:
                ents = ents[:h.num_gtes_per_gt]
                first = next((j for j, g in enumerate(ents) if g), None)
                gti = -1
                if first is not None and ents[first] in gt_entries:
                    gti = gt_entries[ents[first]] // h.grain_size // h.num_gtes_per_gt
                for j, g in enumerate(ents):
                    if g and gt_entries.get(g) != (gti * h.num_gtes_per_gt + j) * h.grain_size:
                        bad(body + 4 * j, f"grain table entry {j} does not point at the "
                                          "grain marker of its lba")
                        break
                gts[body // SECTOR] = gti
                gt_entries.clear()
            else:
                gd = ents
            pos = body + n
            continue
        elif m.type == MARKER_FOOTER:
            seen_footer = True
            try:
                f = SparseHeader.parse(read(body, SECTOR))
                if f.gd_offset == GD_AT_END or (gd is None) or f.capacity != h.capacity:
                    bad(body, "footer gdOffset/capacity do not match the stream")
            except FormatError as err:
                bad(body, f"footer: {err}")
            pos = body + SECTOR
            continue
        else:
            bad(pos, f"unknown marker type {m.type}")
            break
        pos = body
    if not seen_footer:
        bad(file_size, "no footer marker")
    if not seen_eos:
        bad(file_size, "no end-of-stream marker")
    if gd is not None:
        per_gt = h.grain_size * h.num_gtes_per_gt
        for i, sec in enumerate(gd[: -(-h.capacity // per_gt)]):
            if not sec:
                continue
            if gts.get(sec) != i:
                bad(sec * SECTOR, f"grain directory entry {i} does not point at grain "
                                  f"table {i}")
    return out
