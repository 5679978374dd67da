"""The vmdk text descriptor: parse and serialize, round-trip exact.

A :class:`Descriptor` keeps the original lines; accessors read ``key=value`` lines and
:meth:`Descriptor.set` rewrites one line in place, so :meth:`Descriptor.pack` of an
unmodified descriptor returns the input bytes unchanged (unknown ``ddb.*`` keys, comments,
trailing blanks included).  The extent lines of a descriptor file are read by
:mod:`diskimg.vmdk.extent_line`.  Decoding is latin-1 (every byte maps to one character), lines
are bounded, NUL bytes end the text (qemu reads the descriptor as a C string).
"""

from __future__ import annotations

from diskimg.errors import FormatError
from diskimg.slotted import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.vmdk.extent_line import ExtentLine

#: a separate descriptor file larger than this is refused (qemu reads at most 1 MiB - 1)
MAX_DESCRIPTOR_FILE = (1 << 20) - 1
#: embedded descriptors read at most this much (qemu reads 20 sectors)
EMBEDDED_DESC_MAX = 1 << 20
NO_PARENT = 0xFFFFFFFF

# The key line grammar, read without the re module (its import costs every vmdk command's
# start-up, issue 20).  "Whitespace" is what str.isspace() (and re's \s) calls so.
#   key line:     ^\s*([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$
# (extent lines: diskimg.vmdk.extent_line)
_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_."
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _key_value(line: str) -> tuple[str, str] | None:
    """(key, value) of a ``key = value`` line (the grammar above), None otherwise.  A key
    holds neither ``=`` nor whitespace, so it is what precedes the first ``=`` less the
    whitespace before it; str methods test it (no loop over characters: every open reads
    the parent hint, a walk over the descriptor's lines)."""
    text = line.lstrip()
    eq = text.find("=")
    if eq < 0:
        return None
    key = text[:eq].rstrip()
    if not key or key.strip(_KEY_CHARS):   # empty, or a character outside the key's set
        return None
    return key, text[eq + 1:].strip()


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
        if extents:
            from diskimg.vmdk.extent_line import extent_lines  # a descriptor file's: on use

            d.extents = extent_lines(lines + ([trailer] if trailer else []))
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


def new_cid(previous: int = 0) -> int:
    """A new content ID: random (qemu: g_random_int()), or with ``SOURCE_DATE_EPOCH`` set
    derived from it and the previous CID (reproducible, still different from it)."""
    from diskimg.reproducible import random_u32

    cid = random_u32("vmdk-cid", previous)
    return cid if cid != previous else cid ^ 1


def file_name(text: str) -> str:
    """A file the descriptor names (an extent, the parent), as the name that opens it: the
    descriptor's bytes for it (read as latin-1, one character each) decoded by the one
    rule for stored names (:mod:`diskimg.hostio.names`: bytes that are not UTF-8 as lone
    surrogates, as ``os.fsdecode`` gives them), as qemu opens them."""
    from diskimg.hostio.names import name_text  # (a name only an extent file or parent needs)

    return name_text(text.encode("latin-1"))


def stored_text(name: str, what: str) -> str:
    """The descriptor characters that store file name ``name`` (:func:`file_name`'s
    inverse): :func:`diskimg.hostio.names.raw_c_name`'s bytes, one latin-1 character each
    (:class:`UsageError` naming ``what`` for a lone surrogate that stands for no byte, or
    a NUL byte, which ends the descriptor's text)."""
    from diskimg.hostio.names import raw_c_name  # (the creating side only)

    return raw_c_name(name, what).decode("latin-1")
