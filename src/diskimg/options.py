"""``-o key=value,...`` option lists: qemu's parsing (``,,`` escapes a comma), per-format
option schemas (type, default, help), ``-o help`` text and the ``Formatting ...`` line of
``create``, all as qemu-img 7.2 prints them.
"""

from __future__ import annotations

from diskimg.errors import UsageError
from diskimg.slotted import FrozenRecord, set_field
from diskimg.units import parse_size

SIZE_PARAM_HELP = ("expects a non-negative number below 2^64\n"
                   "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                   "and exabytes, respectively.")


class OptionDesc(FrozenRecord):
    """One ``-o`` option: ``kind`` is ``str``, ``bool``, ``num`` or ``size`` (qemu's types)."""

    __slots__ = ("name", "kind", "help", "default")
    name: str
    kind: str
    help: str
    default: str | None

    def __init__(self, name: str, kind: str, help: str, default: str | None = None) -> None:
        set_field(self, "name", name)
        set_field(self, "kind", kind)
        set_field(self, "help", help)
        set_field(self, "default", default)


def _o(name: str, kind: str, help: str, default: str | None = None) -> OptionDesc:  # noqa: A002
    return OptionDesc(name, kind, help, default)


_ENCRYPT = [
    _o("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    _o("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    _o("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    _o("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    _o("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    _o("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    _o("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    _o("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
]
_SIZE = _o("size", "size", "Virtual disk size")
_BACKING_FILE = _o("backing_file", "str", "File name of a base image")

#: Options of each format, in qemu's internal order (the order of the ``Formatting`` line).
FORMAT_OPTIONS: dict[str, list[OptionDesc]] = {
    "qcow2": [
        _o("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor "
           "of encrypt.format=aes)"),
        *_ENCRYPT,
        _o("cluster_size", "size", "qcow2 cluster size", "65536"),
        _o("extended_l2", "bool", "Extended L2 tables", "off"),
        _o("preallocation", "str",
           "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        _o("compression_type", "str", "Compression method used for image cluster compression",
           "zlib"),
        _SIZE,
        _o("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        _BACKING_FILE,
        _o("backing_fmt", "str", "Image format of the base image"),
        _o("data_file", "str", "File name of an external data file"),
        _o("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
        _o("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
        _o("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
    ],
    "raw": [_SIZE],
    "luks": [
        _SIZE,
        _o("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
        *(_o(d.name.removeprefix("encrypt."), d.kind, d.help) for d in _ENCRYPT[2:]),
    ],
    "vmdk": [
        _SIZE,
        _o("adapter_type", "str", "Virtual adapter type, can be one of ide (default), "
           "lsilogic, buslogic or legacyESX"),
        _BACKING_FILE,
        _o("backing_fmt", "str", "Must be 'vmdk' if present"),
        _o("compat6", "bool", "VMDK version 6 image", "off"),
        _o("hwversion", "str", "VMDK hardware version", "undefined"),
        _o("toolsversion", "str", "VMware guest tools version"),
        _o("subformat", "str", "VMDK flat extent format, can be one of {monolithicSparse "
           "(default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | "
           "streamOptimized} "),
        # qemu-img lists zeroed_grain on the Formatting line only when it was given
        _o("zeroed_grain", "bool",
           "Enable efficient zero writes using the zeroed-grain GTE feature"),
    ],
}

#: Options of the host-file protocol driver, appended after the format's own.
PROTOCOL_OPTIONS = [
    _o("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    _o("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    _o("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
]


def schema(fmt: str, with_protocol: bool = True) -> list[OptionDesc]:
    """The option list of ``fmt`` (plus the file protocol's), first definition winning."""
    out: list[OptionDesc] = []
    seen: set[str] = set()
    for d in FORMAT_OPTIONS[fmt] + (PROTOCOL_OPTIONS if with_protocol else []):
        if d.name not in seen:
            seen.add(d.name)
            out.append(d)
    return out


def split_list(text: str) -> list[str]:
    """Split on single commas; ``,,`` is a literal comma.  Empty items are qemu's error."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def valid_list(text: str) -> bool:
    """qemu-img's check of one ``-o`` argument before it is parsed: not empty, not starting
    with a comma, and not ending in an odd number of commas (a lone trailing separator)."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def check_list(text: str) -> str:
    """``text`` when :func:`valid_list`, else qemu's ``Invalid option list: TEXT``."""
    if not valid_list(text):
        raise UsageError(f"Invalid option list: {text}")
    return text


def _items(text: str) -> list[tuple[str, str | None]]:
    """QemuOpts' item grammar: a name runs to ``=`` or ``,`` (no escapes in names); after
    ``=`` the value runs to a single comma (``,,`` is a literal one).  ``(name, None)`` is
    an item without ``=`` (a flag)."""
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            val: list[str] = []
            j += 1
            while j < n:
                if text[j] == ",":
                    if text[j + 1 : j + 2] != ",":
                        break
                    j += 1
                val.append(text[j])
                j += 1
            out.append((name, "".join(val)))
        else:
            out.append((name, None))
        i = j + 1  # past the separating comma
    return out


def parse_list(text: str) -> list[tuple[str, str]]:
    """Parse ``k=v,k2=v2`` into pairs like qemu's QemuOpts (``key`` alone is ``key=on``,
    ``nokey`` is ``key=off``; ``a,,b`` is the flags ``a``, ``''`` and ``b``, as in qemu),
    after :func:`check_list`."""
    return parse_items(check_list(text))


def parse_items(text: str) -> list[tuple[str, str]]:
    """:func:`parse_list` without qemu-img's ``-o`` check (``-l`` and ``--object`` lists,
    where a trailing comma is allowed)."""
    pairs: list[tuple[str, str]] = []
    for k, v in _items(text):
        if v is None:
            k, v = (k[2:], "off") if k.startswith("no") else (k, "on")
        pairs.append((k, v))
    return pairs


def is_help(text: str | None) -> bool:
    """True when an option list asks for help: an item ``help`` or ``?`` without a value,
    found by the same grammar as :func:`parse_list` (so ``x,,help`` asks, ``x=,,help``
    does not), as in qemu."""
    if not text:
        return False
    return any(v is None and k in ("help", "?") for k, v in _items(text))


def help_text(fmt: str, with_protocol: bool = False) -> str:
    """``-o help`` output of qemu-img 7.2 (``with_protocol``: a filename was given)."""
    opts = sorted(schema(fmt, with_protocol), key=lambda d: d.name)
    lines = ["Supported options:" if with_protocol else f"Supported {fmt} options:"]
    for d in opts:
        kind = {"bool": "bool (on/off)"}.get(d.kind, d.kind)
        lines.append(f"  {f'{d.name}=<{kind}>':<22} - {d.help}")
    if not with_protocol:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def validate(fmt: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Check names and value syntax against the schema; return ``{name: value}``
    (later duplicates win, as in qemu).  Raises :class:`UsageError` with qemu's wording."""
    by_name = {d.name: d for d in schema(fmt)}
    out: dict[str, str] = {}
    for k, v in pairs:
        d = by_name.get(k)
        if d is None:
            raise UsageError(f"Invalid parameter '{k}'")
        if d.kind == "bool":
            parse_bool(k, v, strict=True)
        if d.kind == "num":
            try:
                int(v, 0)
            except ValueError:
                raise UsageError(f"Parameter '{k}' expects a number") from None
        if d.kind == "size":
            v = str(parse_param_size(k, v))
        out[k] = v
    return out


#: qemu-img 7.2's format drivers that cannot create an image (its protocol drivers and the
#: formats it creates but diskimg does not are "Unknown file format" here)
NO_CREATE_FORMATS = frozenset({
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "null-aio", "null-co", "preallocate",
    "quorum", "replication", "snapshot-access", "throttle", "vvfat"})


def creatable(fmt: str, *, named: bool = True) -> str:
    """``fmt`` when diskimg can create an image of it; else qemu-img's refusal: a read-only
    driver qemu knows "does not support image creation", any other name is an "Unknown
    file format" (``named=False``: dd's wording, without the name)."""
    if fmt in FORMAT_OPTIONS:
        return fmt
    if fmt in NO_CREATE_FORMATS:
        raise UsageError(f"Format driver '{fmt}' does not support image creation")
    raise UsageError(f"Unknown file format '{fmt}'" if named else "Unknown file format")


#: every preallocation mode qemu knows (each format allows some of them)
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def check_preallocation(fmt: str, mode: str, allowed: tuple[str, ...]) -> str:
    """``mode`` when ``fmt`` allows it; else qemu's wording: a mode qemu knows but ``fmt``
    does not take is "Unsupported preallocation mode", an unknown word is refused by the
    option parser of the format (qcow2's QAPI: "Parameter 'preallocation' does not accept
    value", the others' "invalid parameter value")."""
    if mode in allowed:
        return mode
    if mode in PREALLOCATION_MODES:
        raise UsageError(f"Unsupported preallocation mode: {mode}")
    if fmt == "qcow2":
        raise UsageError(f"Parameter 'preallocation' does not accept value '{mode}'")
    raise UsageError(f"invalid parameter value: {mode}")


def parse_param_size(name: str, text: str) -> int:
    """A size-typed option value; qemu's three-line message on error."""
    try:
        return parse_size(text)
    except UsageError:
        raise UsageError(f"Parameter '{name}' {SIZE_PARAM_HELP}") from None


def _escape(v: str) -> str:
    return v.replace(",", ",,")


def formatting_line(filename: str, fmt: str, opts: dict[str, str]) -> str:
    """``Formatting 'FILE', fmt=FMT k=v ...``: set values or defaults, in qemu's order."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for d in schema(fmt):
        v = opts.get(d.name, d.default)
        if v is not None:
            parts.append(f"{d.name}={_escape(v)}")
    return " ".join(parts)


_TRUE = ("on", "yes", "true")
_FALSE = ("off", "no", "false")


def parse_bool(name: str, value: object, *, strict: bool = False) -> bool:
    """The one boolean option parser.  A ``bool`` passes through.  ``strict``: the ``-o``
    syntax qemu-img checks (only ``on``/``off``); otherwise library callers may also write
    ``yes``/``no``/``true``/``false`` in any case.  Anything else is qemu's UsageError."""
    if isinstance(value, bool):
        return value
    s = str(value) if strict else str(value).lower()
    if s in _TRUE[:1] or (not strict and s in _TRUE):
        return True
    if s in _FALSE[:1] or (not strict and s in _FALSE):
        return False
    raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")


def to_bool(v: str) -> bool:
    """``-o`` bool value (already validated) as a bool; see :func:`parse_bool`."""
    return parse_bool("value", v, strict=True)


# compat= values to qcow2 header versions: qemu-img's spellings, then the QAPI names that
# create and amend also accept (measure does not)
COMPAT_LEVELS = {"0.10": 2, "1.1": 3}
_QAPI_COMPAT = {"v2": 2, "v3": 3}


def compat_version(value: object, *, qapi_names: bool = True) -> int | None:
    """The one qcow2 ``compat`` parser: the header version ``value`` names, or None when
    it names none (each command raises qemu's own message for that)."""
    s = str(value)
    v = COMPAT_LEVELS.get(s)
    if v is None and qapi_names:
        v = _QAPI_COMPAT.get(s)
    return v

#: the raw driver's window options (``offset=``, ``size=``: a disk inside a bigger file,
#: e.g. an OVA or a tar); every other format refuses them by name, as qemu does
RAW_WINDOW_OPTIONS = ("offset", "size")
