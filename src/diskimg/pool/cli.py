"""``diskimg virsh ...`` / ``diskimg pool ...``: virsh's storage commands without libvirtd.

Command names, arguments, output layout (tables, ``Name:  value`` blocks, the blank line
after each command, ``-q``) and messages (``Pool p1 defined``, ``error: ...`` on stderr, exit
status 0/1) follow virsh 9.0.  Options may be given as ``--opt value``, ``--opt=value`` or
positionally in virsh's order.  Global options (before the command):

``-c/--connect URI``  ``qemu:///system`` → libvirt's ``/etc/libvirt/storage``,
                      ``qemu:///session`` → ``$XDG_CONFIG_HOME/libvirt/storage``
``--config-dir DIR``  where pool definitions live (default: see :func:`default_config_dir`)
``--state-dir DIR``   where started-pool markers live
``--object secret,id=UUID,data=PW|file=PATH``  passphrases for ``<encryption>`` secrets
``-q/--quiet``        no informational messages, no table headers
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from diskimg.errors import DiskImgError
from diskimg.pool.cmdline import (
    BOOL,
    CmdError,
    Command,
    Ctx,
    ProgressLine,
    parse_args,
    pretty,
    table,
)
from diskimg.pool.paths import LIBVIRT_SYSTEM_DIR, libvirt_session_dir
from diskimg.pool.pool_commands import POOL_COMMANDS
from diskimg.pool.registry import PoolRegistry
from diskimg.pool.vol_commands import VOL_COMMANDS

#: every command, pool-* then vol-*, in the order ``--help`` lists them
COMMANDS: dict[str, Command] = {**POOL_COMMANDS, **VOL_COMMANDS}


def _usage() -> str:
    lines = ["Usage: diskimg virsh [-c URI] [--config-dir DIR] [--state-dir DIR] [-q] "
             "[--object secret,id=UUID,data=PW] COMMAND [ARGS...]", "",
             " Storage Pool and Volume commands (virsh's names and arguments):"]
    lines += [f"    {name:<20} {desc}" for name, (_f, _s, desc) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def _help(cmd: str) -> str:
    _f, spec, desc = COMMANDS[cmd]
    syn = []
    for o in spec:
        if o.kind == BOOL:
            syn.append(f"[--{o.name}]")
        elif o.required:
            syn.append(f"<{o.name}>")
        else:
            syn.append(f"[--{o.name} <{o.kind}>]")
    return f"  NAME\n    {cmd} - {desc}\n\n  SYNOPSIS\n    {cmd} {' '.join(syn)}\n\n"


def _connect(uri: str) -> Path:
    if uri in ("qemu:///system", "libvirt:///system"):
        return LIBVIRT_SYSTEM_DIR
    if uri in ("qemu:///session", "libvirt:///session"):
        return libvirt_session_dir()
    raise CmdError("failed to connect to the hypervisor",
                   f"diskimg only knows qemu:///system and qemu:///session, not '{uri}'")


def main(argv: list[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         progress_line: Callable[[TextIO], ProgressLine] | None = None) -> int:
    """Run one virsh storage command; returns the exit status (0 ok, 1 error).

    ``argv`` is what follows ``diskimg virsh`` (a leading ``virsh``/``pool`` word is
    tolerated), e.g. ``["pool-list", "--all"]``.  ``progress_line(stdout)`` makes the
    printer of ``--progress`` (the diskimg command line passes its ``convert -p``
    printer; without it ``--progress`` prints nothing).
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = list(argv)
    if args and args[0] in ("virsh", "pool"):
        args = args[1:]
    config_dir: str | os.PathLike[str] | None = None
    state_dir: str | None = None
    quiet = False
    objects: list[str] = []
    try:
        while args and args[0].startswith("-"):
            a = args.pop(0)
            opt, eq, val = a.partition("=")
            if opt in ("-h", "--help"):
                out.write(_usage())
                return 0
            if opt in ("-q", "--quiet"):
                quiet = True
                continue
            if opt in ("-c", "--connect", "--config-dir", "--state-dir", "--object"):
                if not eq:
                    if not args:
                        raise CmdError(f"option {opt} needs an argument")
                    val = args.pop(0)
                if opt in ("-c", "--connect"):
                    config_dir = _connect(val)
                elif opt == "--config-dir":
                    config_dir = val
                elif opt == "--state-dir":
                    state_dir = val
                else:
                    objects.append(val)
                continue
            raise CmdError(f"unsupported option '{a}'. See --help.")
        if not args:
            out.write(_usage())
            return 0
        cmd = args.pop(0)
        if cmd == "help":
            if args and args[0] in COMMANDS:
                out.write(_help(args[0]))
            else:
                out.write(_usage())
            return 0
        if cmd not in COMMANDS:
            raise CmdError(f"unknown command: '{cmd}'")
        func, spec, _desc = COMMANDS[cmd]
        parsed = parse_args(cmd, spec, args)
    except CmdError as e:
        for line in e.lines:
            err.write(f"error: {line}\n")
        return 1
    secrets: dict[str, bytes] = {}
    rc = 0
    try:
        if objects:
            from diskimg.secrets import parse_objects

            try:
                secrets = parse_objects(objects)
            except DiskImgError as e:
                raise CmdError(str(e)) from None
        ctx = Ctx(PoolRegistry(config_dir, state_dir), quiet, out, secrets, progress_line)
        func(ctx, parsed)
    except CmdError as e:
        for line in e.lines:
            err.write(f"error: {line}\n")
        rc = 1
    except (DiskImgError, OSError) as e:  # an error no command wrapped: still no traceback
        err.write(f"error: {e}\n")
        rc = 1
    if not quiet:
        out.write("\n")
    out.flush()
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))


__all__ = ["COMMANDS", "main", "pretty", "table"]
