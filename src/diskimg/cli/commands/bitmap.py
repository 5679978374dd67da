"""qemu-img bitmap: add, remove, clear, enable, disable or merge a persistent bitmap."""

from __future__ import annotations

import argparse
import contextlib

from diskimg.cli.commands._shared import Context, add_common, open_image, size_arg
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError

USAGE = ('(--merge SOURCE | --add | --remove | --clear | --enable | --disable)... '
         '[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJ] '
         '[--image-opts | -f FMT] FILE BITMAP')
DESCRIPTION = ('Change the persistent dirty bitmap BITMAP of a qcow2 image: the actions '
               'are applied in order.')
EXAMPLE = 'diskimg bitmap --add --disable disk.qcow2 backup-1'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, share=False, quiet=False)
    p.set_defaults(actions=[])
    for act in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{act}", dest="actions", action="append_const", const=(act, None),
                       help=f"{act} the bitmap")
    p.add_argument("--merge", dest="actions", metavar="SOURCE",
                   type=lambda s: ("merge", s), action="append",
                   help="merge bitmap SOURCE into the bitmap")
    p.add_argument("-b", dest="source_file", metavar="SOURCE_FILE",
                   help="--merge takes SOURCE from this image")
    p.add_argument("-F", dest="source_fmt", metavar="SOURCE_FMT",
                   help="format of SOURCE_FILE")
    p.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                   help="granularity of --add (a power of 2, 512 to 2G)")


def cmd_bitmap(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img bitmap ACTIONS... FILE BITMAP (qemu-img's checks, in its order)."""
    granularity = 0
    if a.granularity is not None:
        granularity = size_arg(a.granularity, "granularity")
    actions: list[tuple[str, str | None]] = list(a.actions)
    if not actions:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, "
                               "--disable, or --merge")
    kinds = {act for act, _ in actions}
    if granularity and "add" not in kinds:
        raise UsageError("granularity only supported with --add")
    if a.source_fmt and not a.source_file:
        raise UsageError("-F only supported with -b")
    if a.source_file and "merge" not in kinds:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if len(a.files) != 2:
        raise UsageError("Expecting filename and bitmap name")
    name, bitmap = str(a.files[0]), str(a.files[1])
    with open_image(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev, \
            contextlib.ExitStack() as stack:
        source: BlockDevice | None = None
        for act, arg in actions:
            try:
                if act == "merge" and a.source_file and source is None:
                    source = stack.enter_context(open_image(ctx, a.source_file, "r",
                                                        a.source_fmt))
                _apply(dev, act, arg, bitmap, granularity, source)
            except DiskImgError as e:
                if act == "merge" and a.source_file and source is None:
                    raise  # the source file did not open: qemu's open error as it is
                raise DiskImgError(f"Operation {act} on bitmap {bitmap} failed: {e}",
                                   operation=act, reason=str(e)) from e
    return 0


def _apply(dev: BlockDevice, act: str, arg: str | None, bitmap: str, granularity: int,
           source: BlockDevice | None) -> None:
    bm = dev.bitmaps
    if act == "add":
        bm.add(bitmap, granularity or None)
    elif act == "remove":
        bm.remove(bitmap)
    elif act == "clear":
        bm.clear(bitmap)
    elif act == "enable":
        bm.enable(bitmap)
    elif act == "disable":
        bm.disable(bitmap)
    elif act == "merge":
        if arg is None:  # pragma: no cover - argparse always gives --merge its SOURCE
            raise UsageError("--merge needs a source bitmap")
        bm.merge(bitmap, arg, source)


run = cmd_bitmap
