"""qemu-img rebase: change an image's backing file, safely or with -u."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from diskimg import api
from diskimg.cli.commands._shared import (Context, add_common, basic_schedule,
                                          check_backing_keys, one_file, open_image,
                                          path_and_format, resolve_backing, same_file,
                                          target_cache)
from diskimg.cli.errors import CommandLineError
from diskimg.errors import DiskImgError, UsageError

if TYPE_CHECKING:
    from diskimg.cli.progress import QemuProgress, Schedule

USAGE = '[-f FMT] [-u] [-p] -b BACKING [-F BACKING_FMT] [--object OBJ] [--image-opts] FILE'
DESCRIPTION = 'Change the backing file of an image (safe: guest content unchanged).'
EXAMPLE = 'diskimg rebase -b new-base.qcow2 -F qcow2 overlay.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, src_cache=1)
    p.add_argument("-b", dest="backing", metavar="BACKING", help="new backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="its format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the backing file name")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)


def rebase_progress(ctx: Context, a: argparse.Namespace, printer: QemuProgress, path: str,
                    fmt: str | None, backing: str | None) -> Schedule:
    """qemu-img rebase's ``-p`` lines for ``path`` after the first (nothing without
    ``-p``)."""
    from diskimg.cli.progress import Schedule, rebase_schedule

    if not printer.enabled:
        return Schedule(printer, 0)
    if a.unsafe:
        return basic_schedule(printer)
    try:
        with api.open(path, "r", fmt, force_share=True, untrusted=ctx.untrusted,
                      secrets=ctx.secrets) as dev:
            prefix = None
            if backing is not None:
                new = resolve_backing(backing, path)
                chain = dev.chain()
                prefix = next((k for k in range(1, len(chain))
                               if same_file(new, chain[k].filename)), None)
            return rebase_schedule(printer, dev, prefix)
    except (DiskImgError, OSError):
        return basic_schedule(printer)  # the rebase itself reports the problem



def cmd_rebase(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img rebase [-u] [-p] -b BACKING [-F FMT] [--image-opts] FILE."""
    name = one_file(a)
    if not a.unsafe and a.backing is None:
        raise CommandLineError("Must specify backing file (-b) or use unsafe mode (-u)")
    from diskimg.cli.progress import QemuProgress

    printer = QemuProgress(a.progress and not a.quiet, 2.0)
    printer.report(0.0, 100)  # qemu-img's first line, printed before it opens anything
    try:
        _rebase(ctx, a, name, printer)
    finally:
        printer.end()  # after 100, or wherever a failure stopped it
    return 0


def _rebase(ctx: Context, a: argparse.Namespace, name: str, printer: QemuProgress) -> None:
    """The part of :func:`cmd_rebase` after qemu-img has started its progress line."""
    from diskimg.ops import chain as conv

    if a.backing_fmt is not None and a.backing_fmt not in api.BACKING_FORMATS:
        raise UsageError(f"Invalid format name: '{a.backing_fmt}'")
    target_cache(a)
    backing = a.backing or None
    with open_image(ctx, name, "r+", a.format, backing=not a.unsafe,
                image_opts=a.image_opts) as dev:
        fmt = dev.format
        if not a.unsafe:
            check_backing_keys(name, dev)
    path, path_fmt, img_opts = path_and_format(a, name)
    if fmt != "qcow2":
        raise DiskImgError(f"Could not change the backing file to '{a.backing or ''}': "
                           "Operation not supported")
    if backing is not None and a.backing_fmt is None:
        # qemu-img copies first and then fails on this; diskimg fails before writing
        raise DiskImgError(f"Could not change the backing file to '{backing}': backing "
                           "format must be specified")
    if backing is not None and not a.unsafe:
        bpath = resolve_backing(backing, path)
        if not os.path.exists(bpath):
            raise DiskImgError(f"Could not open new backing file '{backing}': Could not open "
                               f"'{bpath}': No such file or directory")
    prog = rebase_progress(ctx, a, printer, path, path_fmt, backing)
    conv.rebase(path, backing, a.backing_fmt, unsafe=a.unsafe, format=path_fmt,
                progress=prog if prog.enabled else None, untrusted=ctx.untrusted,
                secrets=ctx.secrets, force_share=a.force_share, options=img_opts)
    prog.complete()



run = cmd_rebase
