"""qemu-img create, and ``bdrv_img_create``'s validation and wording."""

from __future__ import annotations

import argparse
import os
import sys

from diskimg import api
from diskimg import options as opts
from diskimg.cli.commands._shared import (Context, add_common, collect_o, option_list, print_help,
                                          probe_name, resolve_backing, strip_file_protocol)
from diskimg.cli import errors
from diskimg.cli.errors import CommandLineError, ExitCode
from diskimg.errors import DiskImgError, UsageError
from diskimg.units import parse_size

USAGE = '[-f FMT] [-o K=V[,K=V...]] [-b BACKING -F BACKING_FMT] [-u] [--object OBJ] FILE [SIZE]'
DESCRIPTION = 'Create a new disk image.'
EXAMPLE = 'diskimg create -f qcow2 -o cluster_size=64k disk.qcow2 10G'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, share=False, image_opts=False, fmt_help="image format (default raw)")
    p.add_argument("-o", dest="options", action="append", metavar="K=V,...",
                   type=option_list,
                   help="format options (-o help lists them)")
    p.add_argument("-b", "--backing", metavar="BACKING", help="backing file")
    p.add_argument("-F", "--backing-format", dest="backing_fmt", metavar="FMT",
                   help="backing file format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file")


def create_image(ctx: Context, filename: str, fmt: str, size: int | None,
                 olist: str | None, backing: str | None, backing_fmt: str | None,
                 unsafe: bool, quiet: bool) -> None:
    """qemu's ``bdrv_img_create``: validate, print ``Formatting ...``, create."""

    def fail(msg: str, *, field: str | None = None) -> DiskImgError:
        return DiskImgError(f"{filename}: {msg}", field=field)

    try:
        opts.creatable(fmt)
    except UsageError as e:
        raise fail(str(e)) from None
    pairs = opts.parse_list(olist) if olist else []  # "Invalid option list" as it is
    try:
        values = opts.validate(fmt, pairs) if olist else {}
    except UsageError as e:
        raise fail(str(e), field=e.field) from None
    if "size" in values:
        if size is not None:
            raise fail("The image size must be specified only once")
        size = int(values["size"])
    backing = backing if backing is not None else values.get("backing_file")
    backing_fmt = backing_fmt if backing_fmt is not None else values.get("backing_fmt")
    if backing is not None:
        if fmt in ("raw", "luks"):
            raise fail(f"Backing file not supported for file format '{fmt}'")
        if not backing:
            raise fail("Expected backing file name, got empty string")
        values["backing_file"] = backing
        if backing_fmt is not None:
            values["backing_fmt"] = backing_fmt
        if not unsafe:
            bpath = resolve_backing(backing, filename)
            if backing_fmt is None and os.path.exists(bpath):
                # qemu ends this hint without a newline of its own
                raise ExitCode(f"{filename}: Backing file specified without backing format\n"
                               f"Detected format of {probe_name(bpath)}.", 1, newline=False)
            try:
                with api.open(bpath, "r", api.backing_format(backing_fmt, bpath),
                              force_share=True,
                              untrusted=ctx.untrusted, secrets=ctx.secrets) as b:
                    if size is None:
                        size = b.size
            except DiskImgError as e:
                raise fail(f"{errors.backing_open_reason(e, bpath, backing)}\n"
                           "Could not open backing image.") from None
        elif backing_fmt is None:
            raise fail("Backing file specified without backing format")
    elif backing_fmt is not None:
        if fmt == "raw":
            raise fail("Backing file format not supported for file format 'raw'")
        values["backing_fmt"] = backing_fmt
    if size is None:
        raise fail("Image creation needs a size parameter")
    values["size"] = str(size)
    if not quiet:
        sys.stdout.write(opts.formatting_line(filename, fmt, values) + "\n")
        sys.stdout.flush()
    if backing is None and backing_fmt is not None:
        # the format driver refuses it after the Formatting line (vmdk takes its own name)
        if fmt == "qcow2":
            raise fail("Backing format cannot be used without backing file")
        if backing_fmt != "vmdk":
            raise fail("backing_file must be a vmdk image")
    prealloc = values.get("preallocation")
    if prealloc is not None:
        allowed = ("off", "falloc", "full") + (("metadata",) if fmt == "qcow2" else ())
        try:
            opts.check_preallocation(fmt, prealloc, allowed)
        except UsageError as e:
            raise fail(str(e)) from None
    create_opts = {k: v for k, v in values.items()
                   if k not in ("size", "backing_file", "backing_fmt", "nocow",
                                "extent_size_hint")}
    try:
        api.create(strip_file_protocol(filename), fmt, size, backing_file=backing,
                   backing_fmt=backing_fmt, unsafe=True, options=create_opts,
                   secrets=ctx.secrets)
    except (DiskImgError, OSError) as e:
        raise fail(errors.create_reason(e, filename)) from e


def cmd_create(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img create."""
    olist = collect_o(a.options)
    fmt = a.format or "raw"
    if opts.is_help(olist):
        return print_help(fmt, a.files[0] if a.files else None)
    if olist is not None:
        opts.parse_list(olist)  # "Invalid option list" before anything else
    if not a.files:
        raise CommandLineError("Expecting image file name")
    if len(a.files) > 2:
        raise CommandLineError(f"Unexpected argument: {a.files[2]}")
    size = None
    if len(a.files) == 2:
        size = parse_size(a.files[1])
    create_image(ctx, a.files[0], fmt, size, olist, a.backing, a.backing_fmt, a.unsafe,
                 a.quiet)
    return 0



run = cmd_create
