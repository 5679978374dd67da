"""``qemu-img info``'s human text, and the QDict key order QEMU prints objects in.

Below the CLI in the layer diagram: ``str(ImageInfo)`` (device.py) and the CLI's
renderers (:mod:`diskimg.cli.output`) both use it.
"""

from __future__ import annotations

import time

# collections.abc's Mapping is _collections_abc's, which os has loaded: importing it from
# there does not load the collections package (start-up, issue 20)
from _collections_abc import Mapping

from diskimg.units import size_to_str

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence
    from typing import Any


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


def image_name(driver: str, filename: str, options: Mapping[str, Any],
               strong: Collection[str]) -> str:
    """The name qemu-img prints for an image: its file's, or, when open options that change
    what the image is (the driver's ``strong`` options: raw's ``offset``/``size``, qcow2's
    ``encrypt.key-secret``, luks's ``key-secret``) are given, the ``json:{...}`` form QEMU
    builds from them."""
    opts = {k: v for k, v in options.items() if k in strong}
    if not opts:
        return filename
    spec = {**opts, "driver": driver, "file": {"driver": "file", "filename": filename}}
    import json  # only a json: name needs it (human info of a plain image does not)

    return "json:" + json.dumps(qdict_order_deep(spec))


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
