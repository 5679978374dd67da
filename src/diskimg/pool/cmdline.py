"""The virsh command-line grammar shared by every ``diskimg virsh`` command: options
(``--opt value``, ``--opt=value`` or positional in virsh's order), error lines, tables and
``Name:  value`` blocks, sizes, and the :class:`Ctx` a command runs in.

Invariant: a command reports failure only by raising :class:`CmdError` (each line printed
as ``error: LINE``); :class:`Fail` turns a library error into one with virsh's context line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from diskimg.errors import DiskImgError, PoolError
from diskimg.pool.pool import Pool
from diskimg.pool.registry import PoolRegistry
from diskimg.pool.scale import parse_scaled
from diskimg.pool.volume import Volume

# --- option grammar -------------------------------------------------------------------------

BOOL, STR, NUM = "bool", "string", "number"


@dataclass(frozen=True)
class Opt:
    name: str
    kind: str = STR
    required: bool = False
    positional: bool = True  # string/number options may also be given without their name
    help: str = ""


class CmdError(Exception):
    """A virsh error: each line is printed as ``error: LINE``."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = [ln for ln in lines if ln]


def parse_args(cmd: str, spec: list[Opt], args: Sequence[str]) -> dict[str, Any]:
    byname = {o.name: o for o in spec}
    got: dict[str, Any] = {}
    data_only = False
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if not data_only and a == "--":
            data_only = True
            continue
        if not data_only and a.startswith("--") and len(a) > 2:
            name, eq, val = a[2:].partition("=")
            o = byname.get(name)
            if o is None:
                raise CmdError(f"command '{cmd}' doesn't support option --{name}")
            if name in got:
                raise CmdError(f"option --{name} already seen")
            if o.kind == BOOL:
                if eq:
                    raise CmdError(f"invalid '=' after option --{name}")
                got[name] = True
                continue
            if not eq:
                if i >= len(args):
                    raise CmdError(f"expected syntax: --{name} <{o.kind}>")
                val = args[i]
                i += 1
            got[name] = val
            continue
        for o in spec:
            if o.kind != BOOL and o.positional and o.name not in got:
                got[o.name] = a
                break
        else:
            raise CmdError(f"unexpected data '{a}'")
    for o in spec:
        if o.required and o.name not in got:
            raise CmdError(f"command '{cmd}' requires <{o.name}> option")
    for o in spec:
        if o.kind == NUM and o.name in got:
            v = got[o.name]
            if not v.isdigit():
                raise CmdError(f"Numeric value '{v}' for <{o.name}> option is malformed or "
                               "out of range")
            got[o.name] = int(v)
    return got


# --- output helpers -------------------------------------------------------------------------

def pretty(value: int) -> str:
    """virsh's vshPrettyCapacity: ``1.00 GiB``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v = float(value)
    i = 0
    while i < len(units) - 1 and value >= 1024 ** (i + 1):
        i += 1
    return f"{v / 1024 ** i:.2f} {units[i]}"


def table(header: list[str], rows: list[list[str]], quiet: bool) -> str:
    """virsh's vshTable layout: a leading space, columns padded and 3 spaces apart, a dash
    line 2 longer than the header; the header is omitted with ``-q``."""
    shown = rows if quiet else [header, *rows]
    widths = [max((len(r[c]) for r in shown), default=0) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[c].ljust(widths[c]) if c < len(cells) - 1 else cells[c]
                 for c in range(len(cells))]
        return " " + "   ".join(parts)

    out = []
    if not quiet:
        h = line(header)
        out.append(h)
        out.append("-" * (1 + sum(widths) + 3 * (len(widths) - 1) + 2))
    out.extend(line(r) for r in rows)
    return "".join(s + "\n" for s in out)


def kv(label: str, value: str) -> str:
    return f"{label + ':':<15} {value}\n"


# --- context ---------------------------------------------------------------------------------

class ProgressLine(Protocol):
    """A progress printer (the diskimg CLI's ``convert -p`` lines): called with each
    percentage; ``end`` finishes the line."""

    def __call__(self, percent: float) -> None: ...

    def end(self) -> None: ...


class Ctx:
    def __init__(self, registry: PoolRegistry, quiet: bool, out: TextIO,
                 secrets: dict[str, bytes],
                 progress_line: Callable[[TextIO], ProgressLine] | None = None) -> None:
        self.reg = registry
        self.quiet = quiet
        self.out = out
        self.secrets = secrets
        #: makes the printer of ``--progress`` (None: ``--progress`` prints nothing)
        self.progress_line = progress_line

    def print(self, text: str) -> None:
        self.out.write(text)

    def extra(self, text: str) -> None:
        """vshPrintExtra: informational, suppressed by -q."""
        if not self.quiet:
            self.out.write(text)

    def pool(self, name: str) -> Pool:
        try:
            return self.reg.lookup(name)
        except PoolError as e:
            raise CmdError(f"failed to get pool '{name}'", str(e)) from None

    def vol(self, name: str, pool: str | None, hint: str = "") -> Volume:
        """virsh's lookup: by name in ``pool`` if given, then by key, then by path."""
        err = None
        if pool is not None:
            p = self.pool(pool)
            try:
                return p.volume(name)
            except PoolError as e:
                err = e
                if "not active" in str(e):
                    raise CmdError(f"failed to get vol '{name}'", str(e)) from None
        try:
            return self.reg.find_volume(name)
        except PoolError as e:
            err = e
        raise CmdError(f"failed to get vol '{name}'{hint}",
                       f"Storage volume not found: no storage vol with matching path "
                       f"'{name}'" if err else "")


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(10 << 20)
    except OSError as e:
        raise CmdError(f"Failed to open file '{path}': {e.strerror}") from None


def size_arg(text: str) -> int:
    try:
        return parse_scaled(text)
    except PoolError as e:
        raise CmdError(f"Malformed size {text}",
                       str(e) if "suffix" in str(e) else "") from None


@dataclass
class Fail:
    """Context for errors of one command: ``error: <message>`` then the cause."""

    message: str

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: object) -> None:
        if e is None or isinstance(e, CmdError):
            return
        if isinstance(e, DiskImgError | OSError):
            detail = str(e)
            if isinstance(e, OSError) and e.strerror:
                detail = f"{e.strerror}" + (f": '{e.filename}'" if e.filename else "")
            raise CmdError(self.message, *detail.splitlines()) from e


def esc(text: str) -> str:
    """Escape text for XML the way virsh's virBufferEscapeString does."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


#: one command: (function, its options in virsh's order, the one-line description)
Command = tuple[Callable[["Ctx", dict[str, Any]], None], list[Opt], str]

#: the ``--pool NAME`` option of the commands that act on one pool
POOL_OPTS = [Opt("pool", required=True)]
