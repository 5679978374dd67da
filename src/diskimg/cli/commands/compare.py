"""qemu-img compare: guest contents of two images (exit 0 same, 1 differ, 2 error)."""

from __future__ import annotations

import argparse
import sys

from diskimg.cli.commands._shared import Context, add_common, open_image
from diskimg.cli import errors
from diskimg.cli.errors import CommandLineError
from diskimg.errors import DiskImgError

USAGE = '[-f FMT] [-F FMT] [-s] [-p] [-U] [--object OBJ] [--image-opts] FILE1 FILE2'
DESCRIPTION = 'Compare the guest contents of two images (exit 0 same, 1 differ, 2 error).'
EXAMPLE = 'diskimg compare disk.raw disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, src_cache=2)
    p.add_argument("-F", dest="format2", metavar="FMT", help="format of FILE2")
    p.add_argument("-s", dest="strict", action="store_true", help="strict mode")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")


def cmd_compare(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img compare: 0 identical, 1 different, 2 error."""
    from diskimg.ops import compare as conv
    from diskimg.cli.progress import SIZE_MISMATCH, QemuProgress, Schedule, compare_schedule

    if len(a.files) != 2:
        raise CommandLineError("Expecting two image file names")
    printer = QemuProgress(a.progress and not a.quiet, 2.0)
    prog = Schedule(printer, 0)
    try:
        with open_image(ctx, a.files[0], "r", a.format, image_opts=a.image_opts,
                    force_share=a.force_share) as d1, \
             open_image(ctx, a.files[1], "r", a.format2 or a.format, image_opts=a.image_opts,
                    force_share=a.force_share) as d2:
            if printer.enabled:
                prog = compare_schedule(printer, d1, d2)
            same, off, msg = conv.compare(d1, d2, strict=a.strict,
                                          progress=prog if prog.enabled else None)
    except (DiskImgError, OSError) as e:
        prog.stop()  # qemu-img started its (empty) progress line before opening
        raise errors.exit_code(e, 2) from e
    # qemu-img prints 0 before its first check, then a line per chunk it finished
    prog.advance(2**63 if same else off if off is not None else -1)
    if prog.printed(SIZE_MISMATCH) and msg.startswith(SIZE_MISMATCH):
        msg = msg[len(SIZE_MISMATCH):]  # already printed between the progress lines
    if not a.quiet:
        sys.stdout.write(msg + "\n")
    prog.stop()
    return 0 if same else 1



run = cmd_compare
