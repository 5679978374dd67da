"""Human and JSON renderers with qemu-img 7.2's text, key names and layout."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from diskimg.errors import DiskImgError
from diskimg.units import size_to_str

if TYPE_CHECKING:  # a type only: device.ImageInfo.__str__ imports this module on use
    from diskimg.device import MapEntry


def to_json(obj: Any) -> str:
    """qemu's JSON pretty printer: 4-space indent, ``": "`` separators, newline at end;
    strings escaped as QEMU does (every character outside printable ASCII as ``\\uXXXX``
    in upper case, bytes that are not UTF-8 as U+FFFD)."""
    import json  # human output needs none of it

    text = json.dumps(_valid_text(obj), indent=4, separators=(",", ": "), ensure_ascii=True)
    return _UESCAPE.sub(_qemu_escape, text) + "\n"


# a \u escape (an odd run of backslashes before the u) or a DEL, which json leaves as is
_UESCAPE = re.compile(r"(\\+)u([0-9a-f]{4})|\x7f")


def _qemu_escape(m: re.Match[str]) -> str:
    if m.group(1) is None:
        return "\\u007F"
    if len(m.group(1)) % 2 == 0:  # an escaped backslash, then a plain "u"
        return m.group(0)
    return m.group(1) + "u" + m.group(2).upper()


def _valid_text(obj: Any) -> Any:
    """``obj`` with the lone surrogates of ``surrogateescape`` text (bytes that were not
    UTF-8: image names, snapshot names) replaced by U+FFFD, one per byte, like qemu."""
    if isinstance(obj, str):
        try:
            return obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, Mapping):
        return {k: _valid_text(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_valid_text(v) for v in obj]
    return obj


def _ljust_bytes(text: str, width: int) -> str:
    """``text`` padded to ``width`` bytes of output (printf's ``%-Ns``, which counts
    bytes, as qemu's tables do)."""
    return text + " " * (width - len(text.encode("utf-8", "surrogateescape")))


def _qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in QEMU's QDict (tdb hash mod 512), which fixes its JSON order."""
    v = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, ch in enumerate(key.encode()):
        v = (v + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_order(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with its keys in the order QEMU's JSON output iterates a QDict."""
    return {k: d[k] for k in sorted(d, key=_qdict_bucket)}


def qdict_order_deep(obj: Any) -> Any:
    """``obj`` with every object inside it (lists followed) in QEMU's QDict order."""
    if isinstance(obj, Mapping):
        return {k: qdict_order_deep(v) for k, v in qdict_order(obj).items()}
    if isinstance(obj, list | tuple):
        return [qdict_order_deep(v) for v in obj]
    return obj


# --- info ---------------------------------------------------------------------------


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _dump(indent: int, obj: Any, out: list[str]) -> None:
    """qemu's ``dump_qobject`` for a dict/list: keys with '-' shown as ' ', in the order
    QEMU iterates its QDict (the same hash order as its JSON output)."""
    pad = " " * (indent * 4)
    items: Iterable[tuple[str, Any]]
    if isinstance(obj, Mapping):
        items = ((str(k).replace("-", " "), v) for k, v in qdict_order(obj).items())
    else:
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    for key, v in items:
        if isinstance(v, Mapping | list | tuple):
            out.append(f"{pad}{key}:")
            _dump(indent + 1, v, out)
        else:
            out.append(f"{pad}{key}: {_scalar(v)}")


def _clock(nsec: int) -> str:
    secs = nsec // 1_000_000_000
    return (f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
            f"{(nsec // 1_000_000) % 1000:03d}")


def snapshot_header() -> str:
    """Header line of qemu's snapshot table."""
    return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def snapshot_row(sn: Mapping[str, Any]) -> str:
    """One row of qemu's snapshot table from a snapshot's JSON dict."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(sn.get("date-sec", 0))))
    clock = _clock(int(sn.get("vm-clock-sec", 0)) * 1_000_000_000
                   + int(sn.get("vm-clock-nsec", 0)))
    icount = sn.get("icount")
    ic = "" if icount is None else str(icount)
    return (f"{_ljust_bytes(sn.get('id', ''), 9)} {_ljust_bytes(sn.get('name', ''), 16)} "
            f"{size_to_str(int(sn.get('vm-state-size', 0))):>8}{date:>20}{clock:>13}{ic:>11}")


def info_human(info: Mapping[str, Any]) -> str:
    """``qemu-img info`` text for one image, from its JSON dict."""
    vsize = info["virtual-size"]
    asize = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(vsize)} ({vsize} bytes)",
        f"disk size: {size_to_str(asize) if asize is not None else 'unavailable'}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        bf = info["backing-filename"]
        full = info.get("full-backing-filename")
        line = f"backing file: {bf}"
        if full is None:
            line += " (cannot determine actual path)"
        elif full != bf:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(snapshot_header())
        lines.extend(snapshot_row(sn) for sn in info["snapshots"])
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        _dump(1, spec.get("data", {}), lines)
    return "\n".join(lines) + "\n"


def info_chain_human(infos: Sequence[Mapping[str, Any]]) -> str:
    """``info --backing-chain``: images separated by a blank line."""
    return "\n".join(info_human(i) for i in infos)


# --- map ----------------------------------------------------------------------------


def _b(v: bool) -> str:
    return "true" if v else "false"


def map_entry_json(e: MapEntry) -> str:
    """One ``map --output=json`` entry on one line, qemu's spacing."""
    s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
         f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
    if e.offset is not None:
        s += f', "offset": {e.offset}'
    return s + "}"


def map_json(entries: Iterable[MapEntry]) -> str:
    """The whole JSON array, one object per line."""
    return "[" + ",\n".join(map_entry_json(e) for e in entries) + "]\n"


MAP_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def map_human_line(e: MapEntry, filename: str) -> str | None:
    """A table row for a data run; None for runs qemu does not print.  Data without a
    host offset (external, encrypted or compressed) is qemu's error."""
    if not e.data or e.zero:
        return None
    if e.offset is None:
        raise DiskImgError("File contains external, encrypted or compressed clusters.")
    return f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{filename}"


# --- check --------------------------------------------------------------------------


def check_human(r: Mapping[str, Any]) -> str:
    """The summary ``qemu-img check`` prints on stdout, from the check JSON dict."""
    lines: list[str] = []
    corr = r.get("corruptions", 0)
    leaks = r.get("leaks", 0)
    errs = r.get("check-errors", 0)
    if not (corr or leaks or errs):
        lines.append("No errors were found on the image.")
    else:
        if corr:
            lines += ["", f"{corr} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if leaks:
            lines += ["", f"{leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if errs:
            lines += ["", f"{errs} internal errors have occurred during the check."]
    total = r.get("total-clusters", 0)
    alloc = r.get("allocated-clusters", 0)
    if total and alloc:
        frag = r.get("fragmented-clusters", 0)
        comp = r.get("compressed-clusters", 0)
        lines.append(f"{alloc}/{total} = {alloc * 100.0 / total:0.2f}% allocated, "
                     f"{frag * 100.0 / alloc:0.2f}% fragmented, "
                     f"{comp * 100.0 / alloc:0.2f}% compressed clusters")
    if "image-end-offset" in r:
        lines.append(f"Image end offset: {r['image-end-offset']}")
    return "\n".join(lines) + "\n"


def check_repaired_human(leaks_fixed: int, corruptions_fixed: int) -> str:
    """The note qemu-img prints after a repair, before re-checking."""
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {leaks_fixed} leaked clusters\n"
            f"    {corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")
