"""diskimg checksum: the blkhash checksum of the guest content (ovirt-imageio's value).

Human output is ``sha256sum``'s layout, ``HEXDIGEST  FILE``; ``--output=json`` prints
ovirt-imageio's object ``{"algorithm": ..., "block_size": ..., "checksum": ...}``."""

from __future__ import annotations

import argparse
import sys

from diskimg.cli.commands._shared import (Context, add_common, one_file, open_image,
                                          output_format, size_arg)

USAGE = ('[-f FMT] [--image-opts] [--object OBJ] [-U] [--output=human|json] [-p] '
         '[-a ALG] [-b BLOCK_SIZE] FILE')
DESCRIPTION = ("Print the blkhash checksum of the image's guest content (ovirt-imageio's "
               "algorithm: the same value for the same content in any format).")
EXAMPLE = 'diskimg checksum disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, out=True)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-a", "--algorithm", default="blake2b", metavar="ALG",
                   help="hashlib algorithm (default blake2b, 32-byte digest)")
    p.add_argument("-b", "--block-size", dest="block_size", metavar="BLOCK_SIZE",
                   help="block size (default 4M; checksums compare only at equal sizes)")


def cmd_checksum(ctx: Context, a: argparse.Namespace) -> int:
    """Print ``HEXDIGEST  FILE`` (or the JSON object)."""
    from diskimg.cli.progress import Progress
    from diskimg.ops.checksum import BLOCK_SIZE, checksum

    ofmt = output_format(a.output)
    name = one_file(a)
    bs = size_arg(a.block_size, "block size") if a.block_size is not None else BLOCK_SIZE
    prog = Progress(a.progress and not a.quiet)
    try:
        with open_image(ctx, name, "r", a.format, image_opts=a.image_opts,
                    force_share=a.force_share) as dev:
            res = checksum(dev, algorithm=a.algorithm, block_size=bs,
                           progress=prog if prog.enabled else None)
    finally:
        prog.end()  # the library reported 100 on success
    if ofmt == "json":
        from diskimg.cli.output import to_json

        sys.stdout.write(to_json(res))
    else:
        sys.stdout.write(f"{res['checksum']}  {name}\n")
    return 0


run = cmd_checksum
