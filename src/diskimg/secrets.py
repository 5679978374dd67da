"""``--object secret,id=ID,data=S|file=PATH[,format=raw|base64]`` → ``{id: bytes}``.

Only QEMU's ``secret`` object type is understood; errors use qemu-img's wording.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from diskimg.errors import UsageError
from diskimg.options import parse_list

_KEYS = {"qom-type", "id", "data", "file", "format", "keyid", "iv"}


def parse_object(text: str) -> tuple[str, bytes]:
    """Parse one ``--object`` string; return ``(id, secret bytes)``."""
    pairs = parse_list(text)
    if pairs and "=" not in text.split(",", 1)[0]:
        pairs[0] = ("qom-type", text.split(",", 1)[0])
    props = dict(pairs)
    qtype = props.get("qom-type")
    if qtype != "secret":
        raise UsageError(f"Parameter 'qom-type' does not accept value '{qtype}'")
    for k, _ in pairs:
        if k not in _KEYS:
            raise UsageError(f"Parameter '{k}' is unexpected")
    if "id" not in props:
        raise UsageError("Parameter 'id' is missing")
    if props.get("keyid") or props.get("iv"):
        raise UsageError("Encrypted secrets (keyid=, iv=) are not supported by diskimg")
    if "data" in props and "file" in props:
        raise UsageError("'file' and 'data' are mutually exclusive")
    if "data" in props:
        data = props["data"].encode()
    elif "file" in props:
        try:
            with open(props["file"], "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"Unable to read {props['file']}: Failed to open file "
                             f"\u201c{props['file']}\u201d: {e.strerror}") from None
    else:
        raise UsageError("Either 'file' or 'data' must be provided")
    fmt = props.get("format", "raw")
    if fmt == "base64":
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("Unable to decode base64 secret data") from None
    elif fmt != "raw":
        raise UsageError(f"Parameter 'format' does not accept value '{fmt}'")
    return props["id"], data


def parse_objects(texts: Iterable[str]) -> dict[str, bytes]:
    """Parse every ``--object``; duplicate ids are an error as in qemu."""
    out: dict[str, bytes] = {}
    for t in texts:
        sid, data = parse_object(t)
        if sid in out:
            raise UsageError(f"attempt to add duplicate property '{sid}' to object "
                             "(type 'container')")
        out[sid] = data
    return out
