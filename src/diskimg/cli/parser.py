"""The argparse side of the CLI (imported once a sub-command is known, and only for a
command line :mod:`diskimg.cli.quickparse` leaves to it, so ``diskimg --version`` and a
plain ``diskimg info FILE`` load no argparse): a parser that raises instead of exiting,
with getopt-style messages, built for one sub-command by that command's own module."""

from __future__ import annotations

import argparse
import sys

from diskimg.cli import commands
from diskimg.cli.errors import CommandLineError, prog
from diskimg.cli.quickparse import Exit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of exiting, with getopt-style messages."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            opt = message.split(":", 1)[0].split()[1].split("/")[0]
            if "expected one argument" in message:
                if not self.prog.endswith(" measure"):  # qemu-img's ":..." optstrings
                    raise CommandLineError(f"missing argument for option '{opt}'")
                if opt.startswith("--"):  # measure's plain getopt
                    raise CommandLineError(f"option '{opt}' requires an argument")
                raise CommandLineError(f"option requires an argument -- '{opt.lstrip('-')}'")
        if message.startswith("unrecognized arguments: "):
            raise _unrecognized(message.split(": ", 1)[1].split()[0])
        raise CommandLineError(message)

    #: True while the options are being added: argparse then builds a formatter per option
    #: only to check its metavar, and a formatter asks the terminal's width, which costs
    #: importing shutil (and with it bz2, lzma, fnmatch); help text is formatted after
    _registering = True

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self._registering:  # only its _format_args (metavar check) is used
            return argparse.HelpFormatter(prog=self.prog, width=80)
        return super()._get_formatter()

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise Exit(status)


def _build(cmd: str) -> tuple[Parser, ModuleType]:
    """The parser of sub-command ``cmd``, filled in by its own module, and the module."""
    mod = commands.load(cmd)
    p = Parser(prog=f"{prog()} {cmd}", usage=f"{prog()} {cmd} {mod.USAGE}",
               description=mod.DESCRIPTION, epilog=f"example:\n  {mod.EXAMPLE}",
               allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.register(p)
    p._registering = False
    return p, mod


def _parse(cmd: str, argv: list[str]) -> tuple[argparse.Namespace, ModuleType]:
    p, mod = _build(cmd)
    # getopt takes "-5" for an option (argparse for a number); qemu-img resize alone
    # takes its last argument as the size before parsing options
    opts_end = argv.index("--") if "--" in argv else len(argv)
    if cmd == "resize" and opts_end == len(argv) and argv:
        opts_end -= 1
        if argv[-1].startswith("-") and argv[-1] != "-":
            argv = [*argv[:-1], "--", argv[-1]]  # "-1M" is the size, not an option
    takes_value = {o for o, act in p._option_string_actions.items() if act.nargs != 0}
    for i, x in enumerate(argv[:opts_end]):
        if i and argv[i - 1] in takes_value:
            continue  # an option's argument ("-S -1" is getopt's too)
        if len(x) > 1 and x[0] == "-" and (x[1].isdigit() or x[1] == "."):
            raise _unrecognized(x)
    ns, extra = p.parse_known_intermixed_args(argv)
    for x in extra:
        if x.startswith("-") and x != "-":
            raise _unrecognized(x)
        ns.files.append(x)
    return ns, mod


#: the options ``diskimg`` takes before the sub-command only
GLOBAL_OPTIONS = ("--untrusted", "--debug")


def _unrecognized(opt: str) -> CommandLineError:
    """getopt's "unrecognized option"; a global option given after the sub-command gets a
    note saying where it goes."""
    notes: tuple[str, ...] = ()
    if opt.split("=", 1)[0] in GLOBAL_OPTIONS:
        notes = (f"note: '{opt}' is a global option: put it before the sub-command "
                 f"({prog()} {opt} COMMAND ...)",)
    return CommandLineError(f"unrecognized option '{opt}'", notes=notes)
