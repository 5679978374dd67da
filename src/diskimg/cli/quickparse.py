"""A sub-command's command line without argparse, for the plain cases (start-up, issue 20).

argparse (with gettext and locale, which it loads to word its messages) and building the
sub-command's parser cost a few ms of every ``diskimg info``.  :func:`parse` runs the
command module's own ``register(p)`` against a recorder (:class:`_Spec`) and reads a
command line made only of what it can read exactly as argparse would: the registered
option strings spelled out (``-f FMT``, ``--output=json``, ``-U``), values that do not
start with ``-`` and FILE arguments.  Anything else (``--help``, ``--``, an unknown or
abbreviated option, joined short options, ``-fqcow2``, a missing value, a value that starts
with ``-``, a ``type`` that refuses its value, a ``choices`` miss, an option of a command
whose options the recorder does not know, ``resize``) returns None, and the caller parses
with argparse (:mod:`diskimg.cli.parser`), which gives the usual result or message.  So
messages and ``--help`` are argparse's, and the namespace given is the one argparse would
give (tests/cli/test_quickparse.py compares the two).
"""

from __future__ import annotations

import sys

from diskimg.cli import commands

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType, SimpleNamespace
    from typing import Any
else:  # types.SimpleNamespace is this type; importing types costs start-up (issue 20)
    SimpleNamespace = type(sys.implementation)

__all__ = ["Exit", "parse"]


class Exit(Exception):
    """argparse's exit (``--help``, a usage error already printed): the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Unsupported(Exception):
    """The recorder met something it does not read (argparse parses instead)."""


class _Opt:
    __slots__ = ("const", "default", "dest", "kind", "type", "choices")

    def __init__(self, dest: str, kind: str, default: Any, const: Any,
                 type: Callable[[str], Any] | None, choices: Any) -> None:
        self.dest, self.kind, self.default, self.const = dest, kind, default, const
        self.type, self.choices = type, choices


#: add_argument's keywords the recorder reads; any other one makes the command argparse's
_KNOWN = frozenset(("action", "dest", "default", "type", "choices", "metavar", "help",
                    "const"))
#: the actions read, with the number of values each takes
_ACTIONS = {"store": 1, "append": 1, "store_true": 0, "store_false": 0, "store_const": 0}
#: argparse's defaults of the flag actions (the others' is None)
_FLAG_DEFAULTS = {"store_true": False, "store_false": True}


class _Spec:
    """Stands in for the ``argparse.ArgumentParser`` a command's ``register`` fills in."""

    def __init__(self) -> None:
        self.opts: dict[str, _Opt] = {}
        self.order: list[_Opt] = []
        self.files = False

    def __getattr__(self, name: str) -> Any:  # set_defaults, groups ...: argparse's
        raise _Unsupported

    def add_argument(self, *flags: str, **kw: Any) -> None:
        if flags == ("files",) and not self.files and kw in ({"nargs": "*"}, {
                "nargs": "*", "help": kw.get("help")}):  # the one positional read: FILEs
            self.files = True
            return
        action = kw.get("action", "store")
        if not flags or not _KNOWN.issuperset(kw) or not isinstance(action, str) \
                or action not in _ACTIONS or kw.get("default") == "==SUPPRESS==":
            raise _Unsupported  # (a default that leaves the attribute unset)
        for f in flags:
            if f[:1] != "-" or f in ("-h", "--help") or f[1:2].isdigit():
                raise _Unsupported  # a positional, help, "-1" (argparse then reads
                # numbers differently)
        dest = kw.get("dest")
        if dest is None:
            long = [f for f in flags if f.startswith("--")]
            dest = (long or list(flags))[0].lstrip("-").replace("-", "_")
        opt = _Opt(dest, action, kw.get("default", _FLAG_DEFAULTS.get(action)),
                   kw.get("const"), kw.get("type"), kw.get("choices"))
        opts = self.opts
        for f in flags:
            if f in opts:
                raise _Unsupported
            opts[f] = opt
        self.order.append(opt)

    def _value(self, opt: _Opt, text: str) -> Any:
        value: Any = text
        if opt.type is not None:
            try:
                value = opt.type(text)
            except Exception:  # argparse words (or raises) it
                raise _Unsupported from None
        if opt.choices is not None and value not in opt.choices:
            raise _Unsupported
        return value

    def read(self, argv: list[str]) -> SimpleNamespace:
        values: dict[str, Any] = {}
        for opt in self.order:
            values.setdefault(opt.dest, opt.default)
        files: list[str] = []
        i = 0
        while i < len(argv):
            tok = argv[i]
            i += 1
            if not tok.startswith("-"):
                files.append(tok)
                continue
            name, eq, attached = tok.partition("=")
            found = self.opts.get(name if name.startswith("--") else tok)
            if found is None:
                raise _Unsupported
            opt = found
            if _ACTIONS[opt.kind] == 0:
                if eq:
                    raise _Unsupported
                values[opt.dest] = {"store_true": True, "store_false": False}.get(
                    opt.kind, opt.const)
                continue
            if eq:
                if attached == "--":  # argparse drops a value "--" (3.11: [] or None)
                    raise _Unsupported
                text = attached
            elif i < len(argv) and not argv[i].startswith("-"):
                text, i = argv[i], i + 1
            else:
                raise _Unsupported
            value = self._value(opt, text)
            if opt.kind == "append":
                old = values[opt.dest]
                values[opt.dest] = [*(old or ()), value]
            else:
                values[opt.dest] = value
        for opt in self.order:  # argparse converts a string default with the type
            if (opt.type is not None and isinstance(opt.default, str)
                    and values[opt.dest] is opt.default):
                values[opt.dest] = self._value(opt, opt.default)
        if not self.files:
            if files:
                raise _Unsupported
        else:
            values["files"] = files
        return SimpleNamespace(**values)


def parse(cmd: str, argv: list[str]) -> tuple[SimpleNamespace, ModuleType] | None:
    """The namespace argparse would give for ``diskimg CMD ARGV`` and the command's
    module, or None when the command line is not a plain one (argparse parses it)."""
    if cmd == "resize":  # its size argument is read before the options (parser._parse)
        return None
    mod = commands.load(cmd)
    spec = _Spec()
    try:
        mod.register(spec)
        return spec.read(argv), mod
    except _Unsupported:
        return None
