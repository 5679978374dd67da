"""qemu-img amend: change format options of an existing qcow2 image."""

from __future__ import annotations

import argparse
import sys

from diskimg import options as opts
from diskimg.cli.commands._shared import (Context, add_common, collect_o, open_image,
                                          option_list, path_and_format, probe_name, target_cache)
from diskimg.cli.errors import CommandLineError
from diskimg.cli.progress import QemuProgress, f32
from diskimg.errors import DiskImgError
from diskimg.luks import LuksImage, keyslot_request

USAGE = '[-f FMT] [--force] -o K=V,... [--object OBJ] [--image-opts] FILE'
DESCRIPTION = 'Change format options of an existing image (compat, refcount_bits, ...).'
EXAMPLE = 'diskimg amend -o compat=0.10 disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, share=False)
    p.add_argument("-o", dest="options", action="append", metavar="K=V,...",
                   type=option_list)
    p.add_argument("--force", action="store_true", help="allow risky changes")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)


def cmd_amend(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img amend -o K=V,... FILE (qcow2)."""
    from diskimg.qcow2 import amend as am

    olist = collect_o(a.options)
    if olist is None:
        raise CommandLineError("Must specify options (-o)")
    if opts.is_help(olist):
        fmt = a.format or (probe_name(a.files[0]) if a.files else None)
        if fmt in ("qcow2", "luks"):
            from diskimg.luks import AMEND_HELP

            sys.stdout.write(am.AMEND_HELP if fmt == "qcow2" else AMEND_HELP)
            return 0
        if fmt is None:
            raise CommandLineError("Expecting one image file name")
        raise DiskImgError(f"Format driver '{fmt}' does not support option amendment")
    if len(a.files) != 1:
        raise DiskImgError("Expecting one image file name")  # qemu: no --help hint here
    target_cache(a)
    printer = QemuProgress(a.progress and not a.quiet, 1.0)
    started: list[bool] = []
    try:
        _amend(ctx, a, olist, printer, started)
    except BaseException:
        if started:  # qemu prints 100 whether or not the driver's amend failed
            printer.report(100.0, 0)
        printer.end()
        raise
    printer.report(100.0, 0)
    printer.end()
    return 0


def _amend(ctx: Context, a: argparse.Namespace, olist: str, printer: QemuProgress,
           started: list[bool]) -> None:
    """The amend itself; ``printer`` gets qemu's progress calls from its 0 onwards (the
    qcow2 driver's, which amend reports through ``progress=``: upgrade, refcount-width
    walks, downgrade); ``started`` gets an item once the 0 is printed (after the options
    parsed and the image opened)."""
    from diskimg.qcow2 import amend as am

    name = str(a.files[0])
    # the image stays open (and unlocked: key slots are re-wrapped with its master key)
    # until amend's header rewrites, which amend.amend starts by closing it
    with open_image(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        fmt = dev.format
        if isinstance(dev, LuksImage):  # key slots only, with qemu's luks option names
            printer.report(0.0, 100)
            started.append(True)
            dev.amend_keyslots(keyslot_request(dict(opts.parse_list(olist))), force=a.force)
            return
        if fmt != "qcow2":
            raise DiskImgError(f"Format driver '{fmt}' does not support option amendment")
        path, _fmt, iopts = path_and_format(a, name)
        values = am.validate_amend_options(opts.parse_list(olist))
        printer.report(0.0, 100)
        started.append(True)

        def status(offset: int, total: int) -> None:  # qemu-img's amend_status_cb
            printer.report(f32(f32(100.0 * f32(offset)) / f32(total)), 0)

        am.amend(path, values, format="qcow2", force=a.force, secrets=ctx.secrets,
                 untrusted=ctx.untrusted, image_options=iopts, device=dev,
                 progress=status if printer.enabled else None)



run = cmd_amend
