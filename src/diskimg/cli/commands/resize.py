"""qemu-img resize: change an image's virtual size."""

from __future__ import annotations

import argparse
import sys

from diskimg import options as opts
from diskimg.cli.commands._shared import Context, add_common, open_image
from diskimg.cli.errors import CommandLineError, ExitCode
from diskimg.errors import BackingChainError, DiskImgError, ImageLockedError, UsageError
from diskimg.units import parse_size

USAGE = '[-f FMT] [--shrink] [--preallocation=MODE] [--object OBJ] [--image-opts] FILE [+|-]SIZE'
DESCRIPTION = 'Change the virtual size of an image.'
EXAMPLE = 'diskimg resize disk.qcow2 +1G'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, share=False)
    p.add_argument("--shrink", action="store_true", help="allow shrinking")
    p.add_argument("--preallocation", metavar="MODE", help="off|falloc|full|metadata")


def cmd_resize(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img resize FILE [+|-]SIZE."""
    if len(a.files) < 2:
        raise CommandLineError("Not enough arguments")
    if len(a.files) > 2:
        raise UsageError("Expecting image file name and size")
    name, text = a.files
    rel = text[0] if text[:1] in ("+", "-") else ""
    try:
        delta = parse_size(text[1:] if rel else text)
    except UsageError:
        raise UsageError(f"Parameter 'size' {opts.SIZE_PARAM_HELP}") from None
    prealloc = a.preallocation
    if prealloc is not None and prealloc not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"Invalid preallocation mode '{prealloc}'")
    try:
        with open_image(ctx, name, "r", a.format, image_opts=a.image_opts, force_share=True,
                    need_key=False) as probe:
            vmdk = probe.format == "vmdk"
    except BackingChainError:
        vmdk = False  # a chain that loops: the writable open below says what qemu says
    if vmdk:
        # qemu opens the image for writing first: a held image is refused by its lock
        try:
            open_image(ctx, name, "r+", a.format, image_opts=a.image_opts,
                       need_key=False).close()
        except ImageLockedError:
            raise
        except DiskImgError:
            pass  # e.g. a streamOptimized image with data, which diskimg only reads
        raise DiskImgError("Image format driver does not support resize")
    with open_image(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        cur = dev.size
        new = cur + delta if rel == "+" else cur - delta if rel == "-" else delta
        if new <= 0:
            raise UsageError("New image size must be positive")
        from diskimg.ops.commands import resize_open

        resize_open(dev, new, shrink=a.shrink, preallocation=prealloc, shrink_error=ExitCode(
            "Use the --shrink option to perform a shrink operation.", 1,
            notes=("warning: Shrinking an image will delete all data beyond the shrunken "
                   "image's end. Before performing such an operation, make sure there is no "
                   "important data there.",)))
    if not a.quiet:
        sys.stdout.write("Image resized.\n")
    return 0



run = cmd_resize
