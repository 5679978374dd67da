"""Image options (``--image-opts``, a ``json:{...}`` name, the API's ``options=``): which
ones qemu 7.2 takes, which of those diskimg implements or may ignore, and qemu's refusal
of the rest, written once.

Every option is one of:

- *implemented*: the format acts on it (qcow2 ``encrypt.key-secret`` and ``data-file``,
  luks ``key-secret``, raw ``offset``/``size``, ``read-only``, ``force-share`` (``-U``);
  ``backing.*`` options go to the backing file, ``backing.driver`` names its format);
- *harmless*: qemu's caches, host I/O knobs and node names, which change how qemu
  schedules I/O, never what is read or written: accepted, their values checked as qemu
  checks them, then unused;
- *writes only*: it changes how qemu writes (``discard``, ``detect-zeroes``,
  ``lazy-refcounts`` ...), which diskimg does not do: harmless when the image is opened
  read-only, refused by name when it is opened read-write;
- *not implemented*: refused by name, never silently ignored;
- anything else: qemu's own refusal, ``Block format 'qcow2' does not support the option
  'X'`` (``Block protocol 'file' doesn't support the option 'X'`` under ``file.``).
"""

from __future__ import annotations

from collections.abc import Mapping

from diskimg.errors import UsageError

#: the formats' options, kind by kind: "bool", "size" and "number" values are checked as
#: qemu checks them, a tuple lists the values qemu allows, "any" is not checked
_COMMON_HARMLESS: dict[str, object] = {
    "node-name": "any", "cache.direct": "bool", "cache.no-flush": "bool",
    "auto-read-only": "bool",
}
_HARMLESS: dict[str, dict[str, object]] = {
    "qcow2": {
        "cache-size": "size", "l2-cache-size": "size", "l2-cache-entry-size": "size",
        "refcount-cache-size": "size", "cache-clean-interval": "number",
        "overlap-check": ("none", "constant", "cached", "all"),
        **{f"overlap-check.{k}": "bool" for k in (
            "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
            "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory")},
        "overlap-check.template": ("none", "constant", "cached", "all"),
    },
    "raw": {}, "luks": {}, "vmdk": {},
}
#: what the format acts on (the values are checked where they are used; ``read-only`` and
#: ``force-share`` by :func:`check`)
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "qcow2": ("encrypt.key-secret", "data-file"), "luks": ("key-secret",),
    "raw": ("offset", "size"), "vmdk": (),
}
#: options that change only how qemu writes: harmless when the image is opened read-only,
#: refused by name when diskimg would write without acting on them
_DISCARD = ("ignore", "off", "unmap", "on")
_COMMON_WRITES: dict[str, object] = {"discard": _DISCARD,
                                     "detect-zeroes": ("off", "on", "unmap")}
_WRITES: dict[str, dict[str, object]] = {
    "qcow2": {"lazy-refcounts": "bool", "pass-discard-request": "bool",
              "pass-discard-snapshot": "bool", "pass-discard-other": "bool"},
}
#: options qemu takes that diskimg does not act on at all
_NOT_IMPLEMENTED: dict[str, tuple[str, ...]] = {"qcow2": ("encrypt.format",)}
#: the ``file`` protocol's options under ``file.`` (``file.filename`` names the file)
_PROTOCOL_HARMLESS: dict[str, object] = {
    **_COMMON_HARMLESS, "driver": ("file",), "locking": ("on", "off", "auto"),
    "aio": ("threads", "native", "io_uring"), "aio-max-batch": "number",
    "drop-cache": "bool", "x-check-cache-dropped": "bool",
}


def _check_value(key: str, value: str, kind: object) -> None:
    """A harmless option's value, refused in qemu's words when qemu refuses it."""
    if kind == "bool":
        from diskimg.options import parse_bool

        parse_bool(key, value, strict=True)
    elif kind == "size":
        from diskimg.options import parse_param_size

        parse_param_size(key, value)
    elif kind == "number" and not value.isdigit():
        raise UsageError(f"Parameter '{key}' expects a number")
    elif isinstance(kind, tuple) and value not in kind:
        if key.startswith("overlap-check"):
            raise UsageError(f"Unsupported value '{value}' for qcow2 option '{key}'. Allowed "
                             f"are any of the following: {', '.join(map(str, kind))}")
        raise UsageError(f"invalid parameter value: {value}")


def check_protocol(options: Mapping[str, str]) -> None:
    """The ``file.`` options of an image (without the prefix; ``filename`` excluded)."""
    for key, value in options.items():
        kind = _PROTOCOL_HARMLESS.get(key)
        if kind is None:
            raise UsageError(f"Block protocol 'file' doesn't support the option '{key}'")
        _check_value(key, value, kind)
    if options.get("aio") == "native" and options.get("cache.direct") != "on":
        raise UsageError("aio=native was specified, but it requires cache.direct=on, which "
                         "was not specified.")


def check(fmt: str, options: Mapping[str, str], *, backing: bool = True,
          writable: bool = False) -> None:
    """Refuse, by name, an option of a ``fmt`` image that is neither implemented nor
    harmless.  ``backing=False``: the image is opened without its backing file (qemu's
    ``info``, ``rebase -u``), so ``backing.*`` options are unknown to it, as in qemu.
    ``writable``: the image is opened read-write."""
    if fmt == "file":  # the protocol driver itself (``driver=file``): its own options
        check_protocol(options)
        return
    harmless = {**_COMMON_HARMLESS, **_HARMLESS.get(fmt, {}), "read-only": "bool",
                "force-share": "bool"}
    writes = {**_COMMON_WRITES, **_WRITES.get(fmt, {})}
    for key, value in options.items():
        if key.startswith("backing.") and backing and fmt in ("qcow2", "vmdk"):
            continue  # the backing file's own (checked when it opens)
        if key == "backing" and backing and fmt in ("qcow2", "vmdk"):  # a node's name
            raise UsageError(f"Could not open backing file: Cannot find device='{value}' "
                             f"nor node-name='{value}'", field=key)
        if key in IMPLEMENTED.get(fmt, ()):
            continue
        if key in harmless:
            _check_value(key, value, harmless[key])
        elif key in writes:
            if key == "discard" and value not in _DISCARD:
                raise UsageError("Invalid discard option", field=key)
            _check_value(key, value, writes[key])
            if writable:
                raise UsageError(f"Block format '{fmt}' option '{key}' is not supported by "
                                 "diskimg for writing", field=key)
        elif key in _NOT_IMPLEMENTED.get(fmt, ()):
            raise UsageError(f"Block format '{fmt}' option '{key}' is not supported by "
                             "diskimg", field=key)
        else:
            raise UsageError(f"Block format '{fmt}' does not support the option '{key}'",
                             field=key)
    if fmt == "qcow2":
        _check_cache_sizes(options)
    if options.get("detect-zeroes") == "unmap" and options.get("discard") not in ("unmap",
                                                                                  "on"):
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap", field="detect-zeroes")
    if writable and options.get("read-only") == "on":
        raise UsageError("Block node is read-only", field="read-only")
    if options.get("force-share") == "on" and (writable or options.get("read-only") == "off"):
        raise UsageError("force-share=on can only be used with read-only images",
                         field="force-share")


def _check_cache_sizes(options: Mapping[str, str]) -> None:
    """qcow2's cache sizes as qemu relates them (the values are checked already)."""
    from diskimg.units import parse_size

    names = ("cache-size", "l2-cache-size", "refcount-cache-size")
    if all(k in options for k in names):
        raise UsageError("cache-size, l2-cache-size and refcount-cache-size may not be set "
                         "at the same time")
    if "cache-size" in options:
        total = parse_size(options["cache-size"])
        for k in names[1:]:
            if k in options and parse_size(options[k]) > total:
                raise UsageError(f"{k} may not exceed cache-size", field=k)


def check_l2_cache_entry_size(options: Mapping[str, str], cluster_size: int) -> None:
    """qcow2's ``l2-cache-entry-size``, which qemu checks against the image's cluster
    size once the header is read."""
    if "l2-cache-entry-size" not in options:
        return
    from diskimg.units import parse_size

    n = parse_size(options["l2-cache-entry-size"])
    if not 512 <= n <= cluster_size or n & (n - 1):
        raise UsageError("L2 cache entry size must be a power of two between 512 and the "
                         f"cluster size ({cluster_size})", field="l2-cache-entry-size")


def force_share(options: Mapping[str, str]) -> bool:
    """``force-share=on``: open without QEMU's image locks, as ``-U`` (checked by
    :func:`check`)."""
    return options.get("force-share") == "on"


def backing_options(options: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """The backing file's format (``backing.driver``) and image options (qemu's
    ``backing.`` prefix removed: ``backing.encrypt.key-secret=s`` unlocks an encrypted
    backing file)."""
    sub = {k[len("backing."):]: v for k, v in options.items() if k.startswith("backing.")}
    return sub.pop("driver", None), sub


def json_options(text: str) -> dict[str, str]:
    """The options of a ``json:{...}`` image name, flattened as qemu flattens them
    (``{"file": {"filename": "x"}}`` is ``file.filename=x``; booleans are ``on``/``off``)."""
    import json

    try:
        obj = json.loads(text[len("json:"):])
    except ValueError as e:
        raise UsageError(f"Could not parse the JSON options: JSON parse error, {e}") from None
    except RecursionError:  # hostile nesting
        raise UsageError("Could not parse the JSON options: JSON parse error, nesting too "
                         "deep") from None
    if not isinstance(obj, dict):
        raise UsageError("Invalid JSON object given")
    out: dict[str, str] = {}

    def walk(prefix: str, d: dict[str, object]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, bool):
                out[prefix + k] = "on" if v else "off"
            elif isinstance(v, (str, int, float)):
                out[prefix + k] = str(v)
            else:
                raise UsageError(f"Invalid value for option '{prefix}{k}'")

    try:
        walk("", obj)
    except RecursionError:
        raise UsageError("Could not parse the JSON options: JSON parse error, nesting too "
                         "deep") from None
    return out
