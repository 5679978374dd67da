"""The extent lines of a vmdk descriptor file (``ACCESS SECTORS TYPE "FILE" [OFFSET]``):
their grammar, read without the re module, and :class:`ExtentLine`'s parse and pack.
Imported when a separate descriptor file is read or written (an embedded descriptor's
extent lines are ignored, as qemu does): opening a monolithicSparse image does not load
it (start-up, issue 20).
"""

from __future__ import annotations

from diskimg.errors import FormatError
from diskimg.slotted import FrozenRecord, set_fields

#: more extent lines than this are refused (qemu opens one file per line, unbounded)
MAX_EXTENTS = 1024
#: longest line accepted (qemu's sscanf widths bound names to 511 bytes)
MAX_LINE = 4096
ACCESS = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW",
                "SESPARSE")
#: sector counts above this overflow qemu's int64 byte arithmetic
MAX_SECTORS = (1 << 63) // 512 - 1

# The line grammar, read without the re module (its import costs every vmdk command's
# start-up, issue 20).  "Whitespace" is what str.isspace() (and re's \s) calls so.
#   extent line:  ^\s*(RW|RDONLY|NOACCESS)\s+(-?\d+)\s+([A-Za-z]+)
#                   (?:\s+"([^"\r\n]*)"(?:\s+(-?\d+))?)?\s*$


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


def extent_lines(lines: list[str]) -> list[ExtentLine]:
    """The extent lines among a descriptor's ``lines`` (numbered from 1 in errors), each
    parsed; lines and the number of extents are bounded."""
    out: list[ExtentLine] = []
    for i, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE:
            raise FormatError(f"Descriptor line {i} is longer than {MAX_LINE} bytes")
        line = raw.rstrip("\r")
        if line.lstrip().startswith(ACCESS):
            first = line.split(None, 1)[0] if line.strip() else ""
            if first in ACCESS:
                out.append(ExtentLine.parse(line, i))
                if len(out) > MAX_EXTENTS:
                    raise FormatError(f"Descriptor has more than {MAX_EXTENTS} extents")
    return out
