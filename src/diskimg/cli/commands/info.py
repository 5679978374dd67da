"""qemu-img info: one image or its whole backing chain, human or JSON."""

from __future__ import annotations

import sys

from diskimg import info_text
from diskimg.cli import errors
from diskimg.cli.commands._shared import (Context, add_common, one_file, open_image,
                                          output_format, same_file)
from diskimg.errors import DiskImgError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

USAGE = '[-f FMT] [--output=human|json] [--backing-chain] [-U] [--object OBJ] [--image-opts] FILE'
DESCRIPTION = 'Show information about a disk image.'
EXAMPLE = 'diskimg info --output=json disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, out=True, quiet=False)  # qemu-img: "unrecognized option '-q'"
    p.add_argument("--backing-chain", action="store_true", help="show the whole chain")


def _check_chain_names(ctx: Context, name: str, a: argparse.Namespace) -> None:
    """``info --backing-chain`` opens image after image like qemu-img, so a missing
    backing file is reported under its own name: ``Could not open 'B': Could not open
    'B': ...``."""
    try:
        with open_image(ctx, name, "r", a.format, image_opts=a.image_opts,
                    force_share=a.force_share, need_key=False, backing=True,
                    metadata_only=True):
            return
    except DiskImgError as e:
        looped = e.__cause__ if isinstance(e.__cause__, DiskImgError) else e
        # a loop back to the image itself is named as the user gave it
        same = looped.path is not None and same_file(looped.path, name)
        err = errors.chain_open_failure(e, name, same)
        if err is None:
            raise
        raise err from e


def cmd_info(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img info."""
    ofmt = output_format(a.output)
    name = one_file(a)
    if a.backing_chain:
        if a.image_opts:  # qemu opens each image without its backing file: no backing.*
            open_image(ctx, name, "r", a.format, image_opts=True, force_share=a.force_share,
                       need_key=False, backing=False, metadata_only=True).close()
        _check_chain_names(ctx, name, a)
    with open_image(ctx, name, "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share, need_key=False, metadata_only=True,
                backing=bool(a.backing_chain)) as dev:  # info needs no backing file
        devs = dev.chain() if a.backing_chain else [dev]
        infos = [d.info().to_json() for d in devs]
    if ofmt == "json":  # every object in QEMU's QDict order, format-specific data too
        from diskimg.cli import output  # (the JSON writer: the human text is info_text's)

        text = output.to_json(info_text.qdict_order_deep(infos if a.backing_chain else
                                                         infos[0]))
    elif a.backing_chain:
        text = info_text.info_chain_human(infos)
    else:
        text = info_text.info_human(infos[0])
    sys.stdout.write(text)
    return 0



run = cmd_info
