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
    _leave(main())


def _leave(code: int) -> NoReturn:
    """End the ``diskimg`` process with ``code``.  The interpreter's own exit finalizes
    every object still alive, module by module, and runs the atexit callbacks: 3.4-4.1 M
    instructions of an ``info``, ``check``, ``map`` or convert (about 1 ms of CPU, issue
    20), after the command's work is done.
    When :func:`_finalization_needed` finds nothing for it to do and stdout and stderr
    flush, the process ends at once (``os._exit``), as a C program ends after closing its
    files: everything written with a system call is the kernel's already.  Otherwise
    (and whenever in doubt) the ordinary ``sys.exit``, with what :func:`_settle` froze
    handed back to the collector first: a frozen object is never collected, so an image
    held only by a cycle through frozen objects (a function and its module's globals,
    once the interpreter drops the module) would never be finalized, and never flushed."""
    try:
        if not _finalization_needed():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    except Exception:  # a stream that cannot flush: the ordinary exit reports it
        pass
    import gc

    gc.unfreeze()
    sys.exit(code)


def _finalization_needed() -> bool:
    """Whether the interpreter's exit has work a command may need: an atexit callback
    (worker pools, logging, coverage), a thread other than this one, or a live object
    with a finalizer that is not closed (an unclosed image flushes its metadata when
    finalized, a Python file its buffer, a generator runs its ``finally``).  Images are
    counted as they open and close (``BlockDevice.open_devices``); the other
    objects are the collector's, and :func:`_settle` froze what was alive before the
    command opened anything, so what the command made is all there.  The standard
    streams are left to :func:`_leave`, which flushes them."""
    import atexit
    import gc

    ncallbacks = getattr(atexit, "_ncallbacks", None)
    if ncallbacks is None or ncallbacks():
        return True
    device = sys.modules.get("diskimg.device")
    if device is not None and device.BlockDevice.open_devices:  # frozen ones too
        return True
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() != 1:
        return True
    objects = gc.get_objects()
    final = {t for t in {type(o) for o in objects} if hasattr(t, "__del__")}
    if not final:
        return False
    streams = {id(s) for s in (sys.stdin, sys.stdout, sys.stderr,
                                sys.__stdin__, sys.__stdout__, sys.__stderr__)}
    return any(type(o) in final and id(o) not in streams
               and getattr(o, "closed", False) is not True     # files, images, sockets
               and getattr(o, "gi_frame", o) is not None       # a generator not finished
               for o in objects)


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
