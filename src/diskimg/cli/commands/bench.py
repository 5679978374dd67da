"""qemu-img bench: a simple sequential I/O benchmark of an image.

Every option is checked as qemu-img 7.2 checks it, in command-line order (the ``type=``
callables raise :class:`ExitCode`, which argparse lets through), with its words.  The
output is qemu-img's: the "Sending ..." line (and "Sending flush every ..." with
``--flush-interval``) before the run, "Run completed in X.XXX seconds." after it; as in
qemu-img, ``-q`` does not silence them.  ``-t``/``-n``/``-i`` are checked and then unused
(the host page cache and AIO backend are not diskimg's to choose), but ``-n``/``-i
native`` need ``-t none|off|directsync`` as in qemu."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from diskimg.cli.commands._shared import (CACHE_MODES, Context, add_common, one_file,
                                          open_image, size_arg)
from diskimg.cli.errors import ExitCode
from diskimg.errors import DiskImgError, UsageError
from diskimg.units import INT64_MAX

USAGE = ('[-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=FLUSH_INTERVAL] [-i AIO] [-n] '
         '[--no-drain] [-o OFFSET] [--pattern=PATTERN] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] '
         '[-t CACHE] [-w] [-U] [--object OBJ] [--image-opts] FILE')
DESCRIPTION = '''Run a simple sequential I/O benchmark on the image (qemu-img bench).

COUNT requests (default 75000) of BUFFER_SIZE bytes (default 4k), the first at OFFSET,
each next one STEP_SIZE further (default: the buffer size), wrapping at the image end;
reads, or with -w writes of the PATTERN byte (default 0).  DEPTH (default 64) is the
queue depth: diskimg makes the requests one at a time in order, and the depth decides,
as in qemu, when the flushes of --flush-interval happen (every FLUSH_INTERVAL requests,
after the queue is drained unless --no-drain).  -t, -n and -i are checked, then unused.'''
EXAMPLE = 'diskimg bench -w -c 1000 -s 64k disk.qcow2'

INT_MAX = 2**31 - 1
AIO_MODES = ("threads", "native", "io_uring")


def _ulong(what: str, maximum: int) -> Callable[[str], int]:
    """An integer option as qemu-img bench reads it (``qemu_strtoul``, base 0: decimal,
    ``0x`` hex, leading-``0`` octal, leading blanks and a sign allowed, nothing after the
    digits), at most ``maximum``: else ``Invalid WHAT specified``."""
    from diskimg.qcow2.amend_plan import qemu_number

    def parse(text: str) -> int:
        try:
            value = qemu_number(what, text)  # a "-" wraps modulo 2^64: out of range
        except UsageError:
            value = -1
        if not 0 <= value <= maximum or text != text.rstrip() or "_" in text \
                or not text.isascii():
            raise ExitCode(f"Invalid {what} specified", 1)
        return value

    return parse


def _size(what: str, maximum: int) -> Callable[[str], int]:
    """A size option (``cvtnum_full``): k/M/G... suffixes, 0 to ``maximum``."""

    def parse(text: str) -> int:
        try:
            return size_arg(text, what, 0, maximum)
        except UsageError as e:  # qemu prints each line of the suffix help with its prefix
            first, *rest = str(e).split("\n")
            raise ExitCode(first, 1, notes=tuple(rest)) from None

    return parse


def _choice(message: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ExitCode(message.format(text), 1)
        return text

    return parse


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p)
    p.add_argument("-c", dest="count", type=_ulong("request count", INT_MAX),
                   metavar="COUNT", help="number of requests (default 75000)")
    p.add_argument("-d", dest="depth", type=_ulong("queue depth", INT_MAX),
                   metavar="DEPTH", help="queue depth (default 64)")
    p.add_argument("-o", dest="offset", type=_size("offset", INT64_MAX), default=0,
                   metavar="OFFSET", help="offset of the first request")
    p.add_argument("-s", dest="buffer_size", type=_size("buffer size", INT_MAX),
                   metavar="BUFFER_SIZE", help="bytes per request (default 4k)")
    p.add_argument("-S", dest="step", type=_size("step_size", INT_MAX), default=0,
                   metavar="STEP_SIZE", help="offset increment (default: the buffer size)")
    p.add_argument("-w", dest="write", action="store_true", help="write test")
    p.add_argument("--pattern", type=_ulong("pattern byte", 0xFF), default=0,
                   metavar="PATTERN", help="byte written by -w (default 0)")
    p.add_argument("--flush-interval", dest="flush_interval",
                   type=_ulong("flush interval", INT_MAX), default=0,
                   metavar="FLUSH_INTERVAL", help="flush every FLUSH_INTERVAL writes")
    p.add_argument("--no-drain", dest="drain", action="store_false",
                   help="flush without draining the request queue first")
    p.add_argument("-t", dest="cache", type=_choice("Invalid cache mode", CACHE_MODES),
                   metavar="CACHE", help="cache mode (checked, unused)")
    p.add_argument("-n", dest="native", action="store_true",
                   help="native AIO (checked, unused)")
    p.add_argument("-i", dest="aio", action="append", default=[],
                   type=_choice("Invalid aio option: {}", AIO_MODES), metavar="AIO",
                   help="threads, native or io_uring (checked, unused)")


def cmd_bench(ctx: Context, a: argparse.Namespace) -> int:
    """Print qemu-img bench's lines around the run."""
    from diskimg.ops.bench import BUFFER_SIZE, COUNT, DEPTH, check_params
    from diskimg.ops.bench import run as run_bench

    name = one_file(a)
    count = COUNT if a.count is None else a.count
    depth = DEPTH if a.depth is None else a.depth
    bufsize = BUFFER_SIZE if a.buffer_size is None else a.buffer_size
    check_params(count=count, depth=depth, write=a.write, flush_interval=a.flush_interval)
    native = a.native or "native" in a.aio  # qemu adds each one's flag: none takes it back
    if native and a.cache not in ("none", "off", "directsync"):  # cache.direct=on
        raise DiskImgError(f"Could not open '{name}': aio=native was specified, but it "
                           "requires cache.direct=on, which was not specified.")
    if a.write and a.force_share:
        raise DiskImgError(f"Could not open '{name}': force-share=on can only be used with "
                           "read-only images")
    step = a.step or bufsize
    with open_image(ctx, name, "r+" if a.write else "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share) as dev:
        out = sys.stdout
        out.write(f"Sending {count} {'write' if a.write else 'read'} requests, {bufsize} "
                  f"bytes each, {depth} in parallel (starting at offset {a.offset}, step "
                  f"size {step})\n")
        if a.flush_interval:
            out.write(f"Sending flush every {a.flush_interval} requests\n")
        out.flush()  # before a failed request's error, as qemu's line is
        res = run_bench(dev, count=count, buffer_size=bufsize, depth=depth,
                        offset=a.offset, step=step, write=a.write, pattern=a.pattern,
                        flush_interval=a.flush_interval, drain=a.drain)
    out.write(f"Run completed in {res.seconds:.3f} seconds.\n")
    return 0


run = cmd_bench
