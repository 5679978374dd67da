"""``diskimg`` entry point: qemu-img compatible argument parsing and the global error
handler (``diskimg: message`` on stderr, exit 1, no traceback unless ``--debug`` or
``DISKIMG_DEBUG=1``)."""

from __future__ import annotations

import os
import sys

from diskimg import __version__
from diskimg.cli import errors
from diskimg import progname
from diskimg.cli.errors import CommandLineError, prog

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

#: ``--version``: the first line is the one scripts match (OpenStack's
#: ``re.match(r"qemu-img version ([0-9\.]*)", out)``, ``grep 'qemu-img version' | cut -d ' '
#: -f 3``): the qemu-img release whose behaviour diskimg follows, then, where qemu-img puts
#: its distribution's build, diskimg's own name and version
VERSION_TEXT = (f"qemu-img version 7.2.0 (diskimg {__version__})\n"
                f"diskimg {__version__}: a pure-Python clone of qemu-img 7.2 (qcow2, raw, vmdk); "
                "it is not QEMU\n")

# Start-up (issue 20): this module loads only what ``--version`` needs.  argparse and the
# parser (diskimg.cli.parser), the command table (diskimg.cli.commands, which loads the
# format layer) and the storage-pool entry are imported in main() once a command is known.


def _main_help() -> str:
    lines = [f"usage: {prog()} [--untrusted] [--debug] COMMAND [command options]",
             "diskimg: qcow2, raw and vmdk disk images (qemu-img 7.2 compatible)", "",
             "  -h, --help      display this help and exit",
             "  -V, --version   output version information and exit",
             "  -T, --trace [[enable=]PATTERN][,events=FILE][,file=FILE]",
             "                  qemu-img's tracing options (accepted; diskimg has no trace "
             "events)",
             "  --untrusted     open no file outside the image's own directory",
             "  --debug         show Python tracebacks (also DISKIMG_DEBUG=1)", "",
             "Command syntax:"]
    from diskimg.cli import commands
    from diskimg.cli.commands import pool as pool_entry

    lines += [f"  {cmd} {commands.load(cmd).USAGE}" for cmd in commands.NAMES]
    lines += ["", "Example:", "  diskimg create -f qcow2 disk.qcow2 10G",
              "  diskimg convert -O raw disk.qcow2 disk.raw", "",
              *pool_entry.HELP, "",
              f"'{prog()} COMMAND --help' describes one command."]
    return "\n".join(lines) + "\n"


def _raw_bytes_out() -> None:
    """Let text that came from bytes which are not UTF-8 (file names from the command
    line, snapshot names from an image) go out as those bytes, as qemu-img prints them,
    rather than fail with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "encoding", "").lower() in (
                "utf-8", "utf8"):
            reconfigure(errors="surrogateescape")


def _stderr_line(line: str) -> None:
    sys.stdout.flush()  # keep the order qemu-img's unbuffered stderr has with stdout
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _fail(e: BaseException) -> int:
    """Print ``e`` as qemu-img words it (:mod:`diskimg.cli.errors`); its exit code."""
    text, code = errors.render(e)
    sys.stderr.write(text)
    return code


#: The CLI uses numpy (the ``diskimg[fast]`` XTS kernel) but never its BLAS: OpenBLAS
#: starting its thread pool when numpy loads took ~60 ms of a LUKS convert on two cores
#: (issue 20).  Set for the command's duration unless the caller set it.
_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


#: True in the ``diskimg`` process (:func:`run`), False for a caller running :func:`main`
#: in its own process, whose objects the CLI must not freeze
_PROCESS = False


def run() -> NoReturn:
    """The ``diskimg`` process (the script, ``python -m diskimg``): :func:`main` on
    sys.argv, then exit with its code.  Start-up (issue 20): once the command's modules are
    loaded, and before it opens anything, what is alive (modules, classes, the parsed
    command line) is moved out of the cyclic collector's reach (:func:`gc.freeze`), so
    that neither a collection during the command nor the interpreter's full collections
    at exit walk it again: about 2 ms of an ``info``.  Images, hosts and files are made
    after that point, so an unclosed one is still finalized (and closed) at exit.  Until
    then the collector is off: the young-generation collections that loading the modules
    triggers would only walk objects that are about to be frozen (0.5-0.8 M instructions
    of an ``info`` or a convert); :func:`_settle` turns it back on."""
    global _PROCESS
    _PROCESS = True
    import gc

    gc.disable()
    sys.exit(main())


def _settle() -> None:
    """In the ``diskimg`` process (:func:`run`), once the command's modules are loaded and
    before it opens anything: freeze what is alive and turn the collector back on."""
    if _PROCESS:
        import gc

        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 success, 1 error, command-specific codes).
    Without ``argv`` (a real command line), messages speak under argv[0]'s basename.
    The program name and the message sink (stderr) are set for this call only: a caller
    that runs the CLI in-process gets the library's quiet defaults back."""
    name, sink = progname.name(), progname.message_sink()
    blas = os.environ.get(_BLAS_THREADS)
    if blas is None:
        os.environ[_BLAS_THREADS] = "1"
    try:
        return _main(argv)
    finally:
        progname.set_name(name)
        progname.set_message_sink(sink)
        if blas is None:
            os.environ.pop(_BLAS_THREADS, None)


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    progname.set_name(progname.from_argv0(sys.argv[0]) if argv is None and sys.argv else
                      progname.DEFAULT)
    _raw_bytes_out()
    progname.set_message_sink(_stderr_line)
    debug = os.environ.get("DISKIMG_DEBUG") == "1"
    untrusted = False
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt == "--debug":
            debug = True
        elif opt == "--untrusted":
            untrusted = True
        elif opt in ("-h", "--help"):
            sys.stdout.write(_main_help())
            return 0
        elif opt in ("-V", "--version"):
            sys.stdout.write(VERSION_TEXT)
            return 0
        elif opt in ("-T", "--trace") or opt.startswith(("--trace=", "-T")):
            if opt in ("-T", "--trace") and not args:
                return _fail(CommandLineError(f"missing argument for option '{opt}'"))
            value = args.pop(0) if opt in ("-T", "--trace") else \
                opt.split("=", 1)[1] if opt.startswith("--") else opt[2:]
            from diskimg.cli import trace  # only a command line with -T pays for it

            try:
                rc = trace.apply(prog(), value)
            except Exception as e:
                return _fail(e)
            if rc:
                return rc
        else:
            return _fail(CommandLineError(f"unrecognized option '{opt}'"))
    if not args:
        return _fail(CommandLineError("Not enough arguments"))
    cmd = args.pop(0)
    from diskimg.cli import commands

    if cmd in commands.POOL_ALIASES:
        from diskimg.cli.commands import pool as pool_entry

        _settle()
        return pool_entry.run_argv(args)
    if cmd not in commands.NAMES:
        return _fail(CommandLineError(f"Command not found: {cmd}"))
    from diskimg.cli import quickparse

    ctx = commands.Context(prog=prog(), untrusted=untrusted)
    parsed = False
    try:
        # argparse (diskimg.cli.parser) only for what the quick reader does not read
        ns: object
        got = quickparse.parse(cmd, args)
        if got is not None:
            ns, mod = got
        else:
            from diskimg.cli.parser import _parse

            ns, mod = _parse(cmd, args)
        parsed = True
        objects = getattr(ns, "object", []) or []
        if objects:
            from diskimg.secrets import parse_objects

            ctx.secrets = parse_objects(objects)
        _settle()  # the modules loaded so far; nothing opened yet (see run())
        code: int = mod.run(ctx, ns)
        return code
    except quickparse.Exit as e:
        return e.code
    except BrokenPipeError:
        # stdout's reader went away (`diskimg map ... | head`): stop quietly, as qemu-img
        # does when SIGPIPE kills it, with the shell's status for that (128 + SIGPIPE)
        _silence_stdout()
        return 141
    except (errors.ExitCode, KeyboardInterrupt) as e:
        return _fail(e)
    except CommandLineError as e:
        if debug and parsed:
            raise
        return _fail(e)
    except Exception as e:
        if debug:
            raise
        return _fail(e)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
        pass


if __name__ == "__main__":
    run()
