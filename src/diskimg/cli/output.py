"""Human and JSON renderers with qemu-img 7.2's text, key names and layout (info's human
text and QEMU's QDict key order live in :mod:`diskimg.info_text`, below the CLI)."""

from __future__ import annotations

# collections.abc's Mapping is _collections_abc's, which os has loaded: importing it from
# there does not load the collections package (start-up, issue 20)
from _collections_abc import Mapping

from diskimg.errors import DiskImgError
from diskimg.info_text import info_chain_human as info_chain_human  # re-exported
from diskimg.info_text import info_human as info_human
from diskimg.info_text import qdict_order as qdict_order
from diskimg.info_text import qdict_order_deep as qdict_order_deep
from diskimg.info_text import snapshot_header as snapshot_header
from diskimg.info_text import snapshot_row as snapshot_row

TYPE_CHECKING = False
if TYPE_CHECKING:  # types only
    import re
    from collections.abc import Iterable
    from typing import Any

    from diskimg.device import MapEntry


def to_json(obj: Any) -> str:
    """qemu's JSON pretty printer: 4-space indent, ``": "`` separators, newline at end;
    strings escaped as QEMU does (every character outside printable ASCII as ``\\uXXXX``
    in upper case, bytes that are not UTF-8 as U+FFFD)."""
    import json  # human output needs none of it
    import re

    text = json.dumps(_valid_text(obj), indent=4, separators=(",", ": "), ensure_ascii=True)
    return re.sub(_UESCAPE, _qemu_escape, text) + "\n"


# a \u escape (an odd run of backslashes before the u) or a DEL, which json leaves as is
# (compiled on first use: re caches it)
_UESCAPE = r"(\\+)u([0-9a-f]{4})|\x7f"


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


# --- map ----------------------------------------------------------------------------


_JSON_BOOL = {True: "true", False: "false"}


def map_entry_json(e: MapEntry) -> str:
    """One ``map --output=json`` entry on one line, qemu's spacing."""
    b = _JSON_BOOL
    s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
         f'"present": {b[e.present]}, "zero": {b[e.zero]}, "data": {b[e.data]}')
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
