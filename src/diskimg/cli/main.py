"""``diskimg`` entry point: qemu-img compatible argument parsing and the global error
handler (``diskimg: message`` on stderr, exit 1, no traceback unless ``--debug`` or
``DISKIMG_DEBUG=1``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from diskimg import __version__
from diskimg.cli import commands as c
from diskimg.errors import DiskImgError, UsageError

PROG = "diskimg"
TRY_HELP = f"Try '{PROG} --help' for more information"


class _Usage(Exception):
    """A command-line mistake: message plus the "Try ... --help" line, exit 1."""


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of exiting, with getopt-style messages."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            opt = message.split(":", 1)[0].split()[1].split("/")[0]
            if "expected one argument" in message:
                if opt.startswith("--"):
                    raise _Usage(f"option '{opt}' requires an argument")
                raise _Usage(f"option requires an argument -- '{opt.lstrip('-')}'")
        if message.startswith("unrecognized arguments: "):
            raise _Usage(f"unrecognized option '{message.split(': ', 1)[1].split()[0]}'")
        raise _Usage(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _common(p: Parser, *, fmt: bool = True, share: bool = True, obj: bool = True,
            image_opts: bool = True, quiet: bool = True, out: bool = False,
            fmt_help: str = "image format (probed if absent)") -> None:
    if fmt:
        p.add_argument("-f", "--format", metavar="FMT", help=fmt_help)
    if share:
        p.add_argument("-U", "--force-share", action="store_true",
                       help="open without taking QEMU's image locks")
    if obj:
        p.add_argument("--object", action="append", default=[], metavar="OBJ",
                       help="secret,id=ID,data=S|file=PATH")
    if image_opts:
        p.add_argument("--image-opts", action="store_true",
                       help="FILE is an option string (driver=...,file.filename=...)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="quiet mode")
    if out:
        p.add_argument("--output", metavar="human|json", help="output format")
    p.add_argument("-T", "--source-cache", dest="src_cache", help=argparse.SUPPRESS)
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)


class _Tagged(argparse.Action):
    """Append ``(tag, value)`` to the destination list (snapshot's -c/-a/-d)."""

    def __init__(self, *args: object, tag: str = "", **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.tag = tag

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        cur = list(getattr(ns, self.dest, None) or [])
        cur.append((self.tag, values))
        setattr(ns, self.dest, cur)


CmdFn = Callable[[c.Context, argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("[-f FMT] [--output=human|json] [--backing-chain] [-U] [--object OBJ] "
             "[--image-opts] FILE", "Show information about a disk image.",
             "diskimg info --output=json disk.qcow2"),
    "create": ("[-f FMT] [-o K=V[,K=V...]] [-b BACKING -F BACKING_FMT] [-u] [--object OBJ] "
               "FILE [SIZE]", "Create a new disk image.",
               "diskimg create -f qcow2 -o cluster_size=64k disk.qcow2 10G"),
    "convert": ("[-f FMT] [-O FMT] [-c] [-o K=V,...] [-B BACKING -F BACKING_FMT] [-n] [-p] "
                "[-W] [-m N] [-S SIZE] [-l SNAPSHOT] [-U] [--object OBJ] [--image-opts] "
                "[--target-image-opts] SRC... DST",
                "Convert (copy) one or more images into a new image, sparsely.",
                "diskimg convert -p -O qcow2 disk.raw disk.qcow2"),
    "check": ("[-f FMT] [-r leaks|all] [--output=human|json] [-U] [--object OBJ] "
              "[--image-opts] FILE",
              "Check an image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 63 n/a).",
              "diskimg check -r leaks disk.qcow2"),
    "compare": ("[-f FMT] [-F FMT] [-s] [-p] [-U] [--object OBJ] [--image-opts] FILE1 FILE2",
                "Compare the guest contents of two images (exit 0 same, 1 differ, 2 error).",
                "diskimg compare disk.raw disk.qcow2"),
    "map": ("[-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] [-U] "
            "[--object OBJ] [--image-opts] FILE",
            "Show how the image's guest ranges map to host files.",
            "diskimg map --output=json disk.qcow2"),
    "dd": ("[-f FMT] [-O FMT] [-U] [bs=N] [count=N] [skip=N] if=IN of=OUT",
           "Copy blocks from one image into a new one, like dd(1).",
           "diskimg dd -O qcow2 bs=1M count=16 if=disk.raw of=head.qcow2"),
    "resize": ("[-f FMT] [--shrink] [--preallocation=MODE] [--object OBJ] [--image-opts] "
               "FILE [+|-]SIZE", "Change the virtual size of an image.",
               "diskimg resize disk.qcow2 +1G"),
    "measure": ("[--output=human|json] [-O FMT] [-o K=V] (--size SIZE | [-f FMT] [-l SNAP] "
                "FILE)", "Calculate the file size needed for a new image.",
                "diskimg measure -O qcow2 --size 10G"),
    "commit": ("[-f FMT] [-b BASE] [-d] [-p] [--object OBJ] [--image-opts] FILE",
               "Write an overlay's data into its backing file (then empty the overlay).",
               "diskimg commit overlay.qcow2"),
    "rebase": ("[-f FMT] [-u] [-p] -b BACKING [-F BACKING_FMT] [--object OBJ] "
               "[--image-opts] FILE",
               "Change the backing file of an image (safe: guest content unchanged).",
               "diskimg rebase -b new-base.qcow2 -F qcow2 overlay.qcow2"),
    "snapshot": ("[-l | -c NAME | -a NAME | -d NAME] [-U] [--object OBJ] [--image-opts] FILE",
                 "List, create, apply (revert to) or delete internal snapshots.",
                 "diskimg snapshot -c before-upgrade disk.qcow2"),
    "amend": ("[-f FMT] [--force] -o K=V,... [--object OBJ] [--image-opts] FILE",
              "Change format options of an existing image (compat, refcount_bits, ...).",
              "diskimg amend -o compat=0.10 disk.qcow2"),
}


def _build(cmd: str) -> tuple[Parser, CmdFn]:
    usage, desc, example = _COMMANDS[cmd]
    p = Parser(prog=f"{PROG} {cmd}", usage=f"{PROG} {cmd} {usage}", description=desc,
               epilog=f"example:\n  {example}", allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    fn: CmdFn
    if cmd == "info":
        _common(p, out=True)
        p.add_argument("--backing-chain", action="store_true", help="show the whole chain")
        fn = c.cmd_info
    elif cmd == "map":
        _common(p, out=True)
        p.add_argument("--start-offset", metavar="OFF", help="first guest offset")
        p.add_argument("--max-length", metavar="LEN", help="bytes to map at most")
        fn = c.cmd_map
    elif cmd == "check":
        _common(p, out=True)
        p.add_argument("-r", "--repair", metavar="leaks|all", help="repair the image")
        fn = c.cmd_check
    elif cmd == "create":
        _common(p, share=False, image_opts=False, fmt_help="image format (default raw)")
        p.add_argument("-o", dest="options", action="append", metavar="K=V,...",
                       help="format options (-o help lists them)")
        p.add_argument("-b", "--backing", metavar="BACKING", help="backing file")
        p.add_argument("-F", "--backing-format", dest="backing_fmt", metavar="FMT",
                       help="backing file format")
        p.add_argument("-u", dest="unsafe", action="store_true",
                       help="do not open the backing file")
        fn = c.cmd_create
    elif cmd == "convert":
        _common(p)
        p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
        p.add_argument("-o", dest="options", action="append", metavar="K=V,...")
        p.add_argument("-B", dest="backing", metavar="BACKING", help="target backing file")
        p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="its format")
        p.add_argument("-c", dest="compress", action="store_true", help="compress (qcow2)")
        p.add_argument("-n", dest="target_exists", action="store_true",
                       help="write into an existing target")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        p.add_argument("-W", dest="unordered", action="store_true",
                       help="out-of-order writes (accepted)")
        p.add_argument("-m", dest="coroutines", metavar="N", help="parallel requests (1-16)")
        p.add_argument("-S", dest="sparse", metavar="SIZE", help="zero run size for holes")
        p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help="source snapshot")
        p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
        p.add_argument("-C", dest="copy_range", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--target-image-opts", action="store_true",
                       help="DST is an option string")
        p.add_argument("--target-is-zero", action="store_true", help=argparse.SUPPRESS)
        fn = c.cmd_convert
    elif cmd == "compare":
        _common(p)
        p.add_argument("-F", dest="format2", metavar="FMT", help="format of FILE2")
        p.add_argument("-s", dest="strict", action="store_true", help="strict mode")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        fn = c.cmd_compare
    elif cmd == "dd":
        _common(p, obj=False, quiet=False)
        p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
        fn = c.cmd_dd
    elif cmd == "measure":
        _common(p, quiet=False, out=True)
        p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
        p.add_argument("-o", dest="options", action="append", metavar="K=V,...")
        p.add_argument("-l", dest="snapshot", metavar="SNAP", help="input snapshot")
        p.add_argument("--size", metavar="SIZE", help="virtual size of a new image")
        fn = c.cmd_measure
    elif cmd == "commit":
        _common(p, share=False)
        p.add_argument("-b", dest="base", metavar="BASE", help="commit down to this image")
        p.add_argument("-d", dest="drop", action="store_true",
                       help="do not empty the image afterwards")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
        p.add_argument("-r", dest="rate", help=argparse.SUPPRESS)
        fn = c.cmd_commit
    elif cmd == "rebase":
        _common(p)
        p.add_argument("-b", dest="backing", metavar="BACKING", help="new backing file")
        p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="its format")
        p.add_argument("-u", dest="unsafe", action="store_true",
                       help="only rewrite the backing file name")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
        fn = c.cmd_rebase
    elif cmd == "snapshot":
        _common(p, fmt=False)
        p.set_defaults(actions=[])
        for flag, act in (("-l", "list"), ("-c", "create"), ("-a", "apply"),
                          ("-d", "delete")):
            if act == "list":
                p.add_argument(flag, dest="actions", action="append_const",
                               const=(act, None), help="list snapshots")
            else:
                p.add_argument(flag, dest="actions", action=_Tagged, tag=act,
                               metavar="NAME", help=f"{act} snapshot NAME")
        fn = c.cmd_snapshot
    elif cmd == "amend":
        _common(p, share=False)
        p.add_argument("-o", dest="options", action="append", metavar="K=V,...")
        p.add_argument("--force", action="store_true", help="allow risky changes")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
        fn = c.cmd_amend
    else:  # resize
        _common(p, share=False)
        p.add_argument("--shrink", action="store_true", help="allow shrinking")
        p.add_argument("--preallocation", metavar="MODE", help="off|falloc|full|metadata")
        fn = c.cmd_resize
    return p, fn


def _main_help() -> str:
    lines = [f"usage: {PROG} [--untrusted] [--debug] COMMAND [command options]",
             "diskimg: qcow2, raw and vmdk disk images (qemu-img 7.2 compatible)", "",
             "  -h, --help      display this help and exit",
             "  -V, --version   output version information and exit",
             "  --untrusted     open no file outside the image's own directory",
             "  --debug         show Python tracebacks (also DISKIMG_DEBUG=1)", "",
             "Command syntax:"]
    lines += [f"  {cmd} {u}" for cmd, (u, _, _) in _COMMANDS.items()]
    lines += ["", "Example:", "  diskimg create -f qcow2 disk.qcow2 10G",
              "  diskimg convert -O raw disk.qcow2 disk.raw", "",
              "Storage pools (libvirt dir pools, virsh's commands):",
              "  diskimg virsh pool-define-as NAME dir --target PATH",
              "  diskimg virsh vol-create-as NAME VOL 10G --format qcow2", "",
              f"'{PROG} COMMAND --help' describes one command."]
    return "\n".join(lines) + "\n"


def _parse(cmd: str, argv: list[str]) -> tuple[argparse.Namespace, CmdFn]:
    p, fn = _build(cmd)
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
            raise _Usage(f"unrecognized option '{x}'")
    ns, extra = p.parse_known_intermixed_args(argv)
    for x in extra:
        if x.startswith("-") and x != "-":
            raise _Usage(f"unrecognized option '{x}'")
        ns.files.append(x)
    return ns, fn


def _print_error(msg: str) -> None:
    lines = msg.split("\n")
    every = "You may use k, M, G, T, P or E" in msg
    out = []
    for i, line in enumerate(lines):
        if i == 0 or every or line.startswith("\0"):
            out.append(f"{PROG}: {line.lstrip(chr(0))}")
        else:
            out.append(line)
    # qemu appends this hint to the error without a newline of its own
    end = "" if lines[-1].startswith("Detected format of ") else "\n"
    sys.stderr.write("\n".join(out) + end)


def _raw_bytes_out() -> None:
    """Let text that came from bytes which are not UTF-8 (file names from the command
    line, snapshot names from an image) go out as those bytes, as qemu-img prints them,
    rather than fail with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "encoding", "").lower() in (
                "utf-8", "utf8"):
            reconfigure(errors="surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 success, 1 error, command-specific codes)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _raw_bytes_out()
    debug = os.environ.get("DISKIMG_DEBUG") == "1"
    ctx = c.Context(prog=PROG)
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt == "--debug":
            debug = True
        elif opt == "--untrusted":
            ctx.untrusted = True
        elif opt in ("-h", "--help"):
            sys.stdout.write(_main_help())
            return 0
        elif opt in ("-V", "--version"):
            sys.stdout.write(f"{PROG} version {__version__} (qemu-img 7.2 compatible)\n")
            return 0
        else:
            _print_error(f"unrecognized option '{opt}'\n{TRY_HELP}")
            return 1
    if not args:
        _print_error(f"Not enough arguments\n{TRY_HELP}")
        return 1
    cmd = args.pop(0)
    if cmd in ("virsh", "pool"):
        from diskimg.pool.cli import main as pool_main

        return pool_main(args)
    if cmd not in _COMMANDS:
        _print_error(f"Command not found: {cmd}\n{TRY_HELP}")
        return 1
    try:
        ns, fn = _parse(cmd, args)
        objects = getattr(ns, "object", []) or []
        if objects:
            from diskimg.secrets import parse_objects

            ctx.secrets = parse_objects(objects)
        return fn(ctx, ns)
    except _Exit as e:
        return e.code
    except _Usage as e:
        _print_error(f"{e}\n{TRY_HELP}")
        return 1
    except c.ExitCode as e:
        _print_error(str(e))
        return e.code
    except UsageError as e:
        if debug:
            raise
        msg = str(e)
        if msg in ("Expecting one image file name", "Expecting image file name",
                   "Expecting two image file names", "Not enough arguments") or \
                msg.startswith(("Unexpected argument:", "Unknown option value for -r",
                                "Cannot mix '-l'", "Must specify backing file (-b)",
                                "Must specify options (-o)")):
            msg += f"\n{TRY_HELP}"
        _print_error(msg)
        return 1
    except BrokenPipeError:
        # stdout's reader went away (`diskimg map ... | head`): stop quietly, as qemu-img
        # does when SIGPIPE kills it, with the shell's status for that (128 + SIGPIPE)
        _silence_stdout()
        return 141
    except (DiskImgError, OSError) as e:
        if debug:
            raise
        _print_error(str(e) if isinstance(e, DiskImgError) else _os_message(e))
        return 1
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except Exception as e:
        if debug:
            raise
        _print_error(f"internal error: {type(e).__name__}: {e}")
        return 1


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
        pass


def _os_message(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"Could not open '{e.filename}': {e.strerror}"
    return e.strerror or str(e)


if __name__ == "__main__":
    sys.exit(main())
