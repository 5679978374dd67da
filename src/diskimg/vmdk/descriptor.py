"""The vmdk text descriptor: parse and serialize, round-trip exact.

A :class:`Descriptor` keeps the original lines; accessors read ``key=value`` lines and
:meth:`Descriptor.set` rewrites one line in place, so :meth:`Descriptor.pack` of an
unmodified descriptor returns the input bytes unchanged (unknown ``ddb.*`` keys, comments,
trailing blanks included).  Decoding is latin-1 (every byte maps to one character), lines
are bounded, NUL bytes end the text (qemu reads the descriptor as a C string).
"""

from __future__ import annotations


from diskimg.errors import FormatError
from diskimg.slotted import FrozenRecord, Record, set_fields

#: a separate descriptor file larger than this is refused (qemu reads at most 1 MiB - 1)
MAX_DESCRIPTOR_FILE = (1 << 20) - 1
#: embedded descriptors read at most this much (qemu reads 20 sectors)
EMBEDDED_DESC_MAX = 1 << 20
#: more extent lines than this are refused (qemu opens one file per line, unbounded)
MAX_EXTENTS = 1024
#: longest line accepted (qemu's sscanf widths bound names to 511 bytes)
MAX_LINE = 4096
NO_PARENT = 0xFFFFFFFF
ACCESS = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW",
                "SESPARSE")
#: sector counts above this overflow qemu's int64 byte arithmetic
MAX_SECTORS = (1 << 63) // 512 - 1

# The line grammar, read without the re module (its import costs every vmdk command's
# start-up, issue 20).  "Whitespace" is what str.isspace() (and re's \s) calls so.
#   extent line:  ^\s*(RW|RDONLY|NOACCESS)\s+(-?\d+)\s+([A-Za-z]+)
#                   (?:\s+"([^"\r\n]*)"(?:\s+(-?\d+))?)?\s*$
#   key line:     ^\s*([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_int(token: str) -> bool:
    """``-?\\d+``: an optional minus, then one or more decimal digits."""
    digits = token[1:] if token.startswith("-") else token
    return digits.isdecimal()


def _word(text: str) -> tuple[str, str]:
    """``text``'s first run of non-whitespace and what follows it."""
    for i, ch in enumerate(text):
        if ch.isspace():
            return text[:i], text[i:]
    return text, ""


def _extent_fields(line: str) -> tuple[str, str, str, str | None, str | None] | None:
    """(access, sectors, type, filename, offset) of an extent line (the grammar above),
    None when it is not one."""
    access, rest = _word(line.lstrip())
    if access not in ACCESS or not rest:
        return None
    sectors, rest = _word(rest.lstrip())
    if not _is_int(sectors) or not rest:
        return None
    typ, rest = _word(rest.lstrip())
    if not (typ.isascii() and typ.isalpha()):
        return None
    if not rest or rest.isspace():
        return access, sectors, typ, None, None
    # a quoted file name after whitespace (a type followed by a quote directly has none)
    rest = rest.lstrip()
    end = rest.find('"', 1)
    if not rest.startswith('"') or end < 0:
        return None
    name, rest = rest[1:end], rest[end + 1:]
    if "\r" in name or "\n" in name:
        return None
    if not rest or rest.isspace():
        return access, sectors, typ, name, None
    if not rest[0].isspace():
        return None
    off, rest = _word(rest.lstrip())
    if not _is_int(off) or (rest and not rest.isspace()):
        return None
    return access, sectors, typ, name, off


def _key_value(line: str) -> tuple[str, str] | None:
    """(key, value) of a ``key = value`` line (the grammar above), None otherwise."""
    text = line.lstrip()
    n = 0
    while n < len(text) and text[n] in _KEY_CHARS:
        n += 1
    rest = text[n:].lstrip()
    if not n or not rest.startswith("="):
        return None
    return text[:n], rest[1:].strip()


class ExtentLine(FrozenRecord):
    """``ACCESS SECTORS TYPE "FILENAME" [OFFSET]``; sizes and offsets are in sectors."""

    __slots__ = ("access", "sectors", "type", "filename", "offset")
    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int | None

    def __init__(self, access: str, sectors: int, type: str, filename: str | None = None,
                 offset: int | None = None) -> None:
        set_fields(self, access, sectors, type, filename, offset)

    @classmethod
    def parse(cls, line: str, lineno: int = 0) -> ExtentLine:
        fields = _extent_fields(line)
        if fields is None:
            raise FormatError(f"Invalid extent line {lineno}: {line[:200]!r}")
        access, sectors, typ, name, off = fields
        n = int(sectors)
        if typ not in EXTENT_TYPES:
            raise FormatError(f"Unsupported extent type '{typ[:40]}' in extent line {lineno}")
        if n <= 0 or n > MAX_SECTORS:
            raise FormatError(f"Invalid extent size {n} sectors in extent line {lineno}")
        if typ != "ZERO" and not name:
            raise FormatError(f"Extent line {lineno} names no file: {line[:200]!r}")
        if off is not None:
            o = int(off)
            if o < 0 or o > MAX_SECTORS:
                raise FormatError(f"Invalid extent offset {o} in extent line {lineno}")
        elif typ == "FLAT":
            raise FormatError(f"Invalid extent line {lineno}: {line[:200]!r} (FLAT extents "
                              "need an offset)")
        return cls(access, n, typ, name, int(off) if off is not None else None)

    def pack(self) -> str:
        s = f"{self.access} {self.sectors} {self.type}"
        if self.filename is not None:
            s += f' "{self.filename}"'
        if self.offset is not None:
            s += f" {self.offset}"
        return s


class Descriptor(Record):
    """Lines of a descriptor plus parsed views.  ``trailer`` is what followed the last
    newline (NUL padding of an embedded descriptor is not part of the text)."""

    __slots__ = ("lines", "trailer", "extents")
    lines: list[str]
    trailer: str
    extents: list[ExtentLine]

    def __init__(self, lines: list[str], trailer: str = "",
                 extents: list[ExtentLine] | None = None) -> None:
        self.lines = lines
        self.trailer = trailer
        self.extents = [] if extents is None else extents

    # --- parse/pack ----------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, *, max_size: int = MAX_DESCRIPTOR_FILE,
              extents: bool = True) -> Descriptor:
        """``extents=False``: do not interpret extent lines (an embedded descriptor's are
        ignored, as qemu does: the sparse file is its own only extent)."""
        if len(data) > max_size:
            raise FormatError(f"Descriptor of {len(data)} bytes exceeds the {max_size}-byte "
                              "limit", offset=0)
        nul = data.find(b"\0")
        if nul >= 0:
            data = data[:nul]
        text = data.decode("latin-1")
        parts = text.split("\n")
        lines, trailer = parts[:-1], parts[-1]
        d = cls(lines, trailer)
        allx = lines + ([trailer] if trailer else [])
        for i, raw in enumerate(allx, 1):
            if extents and len(raw) > MAX_LINE:
                raise FormatError(f"Descriptor line {i} is longer than {MAX_LINE} bytes")
            line = raw.rstrip("\r")
            if extents and line.lstrip().startswith(ACCESS):
                first = line.split(None, 1)[0] if line.strip() else ""
                if first in ACCESS:
                    d.extents.append(ExtentLine.parse(line, i))
                    if len(d.extents) > MAX_EXTENTS:
                        raise FormatError(f"Descriptor has more than {MAX_EXTENTS} extents")
        return d

    def pack(self) -> bytes:
        return ("".join(line + "\n" for line in self.lines) + self.trailer).encode("latin-1")

    # --- key access -----------------------------------------------------------------
    def _find(self, key: str) -> tuple[int, str] | None:
        for i, raw in enumerate([*self.lines, self.trailer]):
            kv = _key_value(raw.rstrip("\r"))
            if kv is not None and kv[0] == key:
                return i, kv[1]
        return None

    def get(self, key: str) -> str | None:
        """Value of ``key`` with one pair of surrounding double quotes removed."""
        f = self._find(key)
        if f is None:
            return None
        v = f[1]
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = v[1:-1]
        elif v.startswith('"'):
            v = v[1:]
        return v

    def set(self, key: str, value: str) -> None:
        """Replace the line of ``key`` (keeping ``key=value`` or ``key = "value"`` style),
        or append ``key=value`` after the header keys when absent."""
        f = self._find(key)
        if f is None:
            idx = next((i for i, ln in enumerate(self.lines) if ln.startswith("createType")),
                       len(self.lines) - 1)
            self.lines.insert(idx + 1, f"{key}={value}")
            return
        i, _ = f
        old = ([*self.lines, self.trailer])[i]
        eol = "\r" if old.endswith("\r") else ""
        new = f'{key} = "{value}"{eol}' if key.startswith("ddb.") else f"{key}={value}{eol}"
        if i == len(self.lines):
            self.trailer = new
        else:
            self.lines[i] = new

    def _hex(self, key: str, default: int) -> int:
        v = self.get(key)
        if v is None:
            return default
        text = v.lstrip()  # leading whitespace, then hex digits (what follows is ignored)
        n = 0
        while n < len(text) and text[n] in _HEX_DIGITS:
            n += 1
        if not n:
            raise FormatError(f"Invalid {key} value {v[:40]!r} in the descriptor")
        return int(text[:n][:16], 16) & 0xFFFFFFFF

    @property
    def cid(self) -> int:
        return self._hex("CID", 0)

    @property
    def parent_cid(self) -> int:
        return self._hex("parentCID", NO_PARENT)

    @property
    def create_type(self) -> str | None:
        return self.get("createType")

    @property
    def parent_hint(self) -> str | None:
        return self.get("parentFileNameHint")

    def ddb(self) -> dict[str, str]:
        """All ``ddb.*`` keys in file order (values unquoted)."""
        out: dict[str, str] = {}
        for raw in [*self.lines, self.trailer]:
            kv = _key_value(raw.rstrip("\r"))
            if kv is not None and kv[0].startswith("ddb."):
                out[kv[0]] = self.get(kv[0]) or ""
        return out


def build(*, cid: int, parent_cid: int, create_type: str, parent_hint: str | None,
          extents: list[ExtentLine], hw_version: str, cylinders: int, heads: int,
          adapter_type: str, tools_version: str) -> str:
    """The descriptor text ``qemu-img create`` writes (qemu 7.2's template)."""
    # qemu's template: the parent line takes the place of the blank line after createType
    parent = f'parentFileNameHint="{parent_hint}"' if parent_hint else ""
    ext = "".join(e.pack() + "\n" for e in extents)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:x}\n"
        f"parentCID={parent_cid:x}\n"
        f'createType="{create_type}"\n'
        f"{parent}"
        "\n"
        "# Extent description\n"
        f"{ext}"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hw_version}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{tools_version}"\n'
    )


def new_cid(previous: int = 0) -> int:
    """A new content ID: random (qemu: g_random_int()), or with ``SOURCE_DATE_EPOCH`` set
    derived from it and the previous CID (reproducible, still different from it)."""
    from diskimg.reproducible import random_u32

    cid = random_u32("vmdk-cid", previous)
    return cid if cid != previous else cid ^ 1

