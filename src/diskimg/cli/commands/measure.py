"""qemu-img measure: file size needed for a new image."""

from __future__ import annotations

import argparse
import sys

from diskimg import options as opts
from diskimg.cli import errors, output
from diskimg.cli.commands._shared import (Context, add_common, collect_o, option_list, open_image,
                                          output_format, size_arg, snapshot_param)
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError

USAGE = '[--output=human|json] [-O FMT] [-o K=V] (--size SIZE | [-f FMT] [-l SNAP] FILE)'
DESCRIPTION = 'Calculate the file size needed for a new image.'
EXAMPLE = 'diskimg measure -O qcow2 --size 10G'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, quiet=False, out=True)
    p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
    p.add_argument("-o", dest="options", action="append", metavar="K=V,...",
                   type=option_list)
    p.add_argument("-l", dest="snapshot", metavar="SNAP", help="input snapshot")
    p.add_argument("--size", metavar="SIZE", help="virtual size of a new image")


def _load_snapshot(dev: BlockDevice, text: str) -> BlockDevice:
    """``-l`` for measure: the snapshot's read-only view (qemu's error wording)."""
    from diskimg.ops import convert as conv

    snap = snapshot_param(text)
    assert snap is not None
    try:
        return conv._snapshot_view(dev, snap)
    except DiskImgError as e:
        raise errors.snapshot_load_failure(e) from e


def cmd_measure(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img measure: file size needed for a new image of --size or of FILE's data."""
    from diskimg.qcow2.measure import measure

    ofmt = output_format(a.output)
    img_size = size_arg(a.size, "image size") if a.size is not None else None
    olist = collect_o(a.options)
    out_fmt = a.output_format or "raw"
    if len(a.files) > 1:
        raise UsageError("At most one filename argument is allowed.")
    filename = a.files[0] if a.files else None
    if filename is None and (a.image_opts or a.format or a.snapshot is not None):
        raise UsageError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and img_size is not None:
        raise UsageError("--size N cannot be used together with a filename.")
    if filename is None and img_size is None:
        raise UsageError("Either --size N or one filename must be specified.")
    dev: BlockDevice | None = None
    src: BlockDevice | None = None
    try:
        if filename is not None:
            dev = open_image(ctx, filename, "r", a.format, image_opts=a.image_opts,
                             force_share=a.force_share)
            src = dev if a.snapshot is None else _load_snapshot(dev, a.snapshot)
        opts.creatable(out_fmt)
        values: dict[str, str] = {}
        if olist is not None:
            try:
                values = opts.validate(out_fmt, opts.parse_list(olist))
            except UsageError as e:
                raise errors.with_notes(e, f"Invalid options for file format '{out_fmt}'") \
                    from None
        info = measure(out_fmt, values, src, size=img_size,
                       has_secret=lambda sid: sid in ctx.secrets, bitmap_dev=dev)
    finally:
        if src is not None and src is not dev:
            src.close()
        if dev is not None:
            dev.close()
    if ofmt == "json":
        sys.stdout.write(output.to_json(output.qdict_order(info.to_json())))
    else:
        sys.stdout.write(info.human())
    return 0



run = cmd_measure
