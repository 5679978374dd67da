"""qemu-img commit: write an overlay's data into its backing file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from diskimg import api
from diskimg.cli.commands._shared import (Context, add_common, basic_schedule,
                                          check_backing_keys, one_file, open_image,
                                          path_and_format, same_file, size_arg, target_cache)
from diskimg.errors import DiskImgError

if TYPE_CHECKING:
    from diskimg.cli.progress import QemuProgress, Schedule

USAGE = '[-f FMT] [-b BASE] [-d] [-p] [-r RATE] [--object OBJ] [--image-opts] FILE'
DESCRIPTION = "Write an overlay's data into its backing file (then empty the overlay)."
EXAMPLE = 'diskimg commit overlay.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, share=False)
    p.add_argument("-b", dest="base", metavar="BASE", help="commit down to this image")
    p.add_argument("-d", dest="drop", action="store_true",
                   help="do not empty the image afterwards")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
    p.add_argument("-r", dest="rate", metavar="RATE",
                   help="commit at most RATE bytes per second (k, M, G... suffixes)")


def commit_progress(ctx: Context, a: argparse.Namespace, printer: QemuProgress, path: str,
                    fmt: str | None) -> Schedule:
    """qemu-img commit's ``-p`` lines for ``path`` after the first (nothing without
    ``-p``)."""
    from diskimg.cli.progress import Schedule, commit_schedule

    if not printer.enabled:
        return Schedule(printer, 0)
    try:
        with api.open(path, "r", fmt, force_share=True, untrusted=ctx.untrusted,
                      secrets=ctx.secrets) as top:
            chain = top.chain()
            depth = 1
            if a.base is not None:
                for k in range(1, len(chain)):
                    parent = os.path.dirname(chain[k - 1].filename)
                    if same_file(os.path.join(parent, a.base), chain[k].filename):
                        depth = k
                        break
            return commit_schedule(printer, top, depth)
    except (DiskImgError, OSError):
        return basic_schedule(printer)  # the commit itself reports the problem



def cmd_commit(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img commit [-b BASE] [-d] [-p] [--image-opts] FILE."""
    from diskimg.ops import chain as conv

    rate = size_arg(a.rate, "rate limit") if a.rate is not None else None
    name = one_file(a)
    target_cache(a)
    # open once the way qemu-img does, for its error messages (and the probed-raw warning)
    with open_image(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        backed = dev.backing is not None
        if backed:
            check_backing_keys(name, dev)
    from diskimg.cli.progress import QemuProgress

    printer = QemuProgress(a.progress and not a.quiet, 1.0)
    printer.report(0.0, 100)  # qemu-img's first line, once the image is open
    try:
        if not backed:
            raise DiskImgError("Image does not have a backing file")
        path, fmt, img_opts = path_and_format(a, name)
        prog = commit_progress(ctx, a, printer, path, fmt)
        conv.commit(path, base=a.base, drop=a.drop, progress=prog if prog.enabled else None,
                    format=fmt, untrusted=ctx.untrusted, secrets=ctx.secrets,
                    options=img_opts, rate_limit=rate)
        prog.complete()
    finally:
        printer.end()  # after 100, or wherever a failure stopped it
    if not a.quiet:
        sys.stdout.write("Image committed.\n")
    return 0


run = cmd_commit
