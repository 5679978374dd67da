"""qemu-img dd: copy blocks into a new image with dd(1)'s operands."""

from __future__ import annotations

import argparse

from diskimg import options as opts
from diskimg.cli import errors
from diskimg.cli.commands._shared import Context, add_common, open_image, size_arg
from diskimg.cli.errors import ExitCode
from diskimg.errors import DiskImgError

USAGE = '[-f FMT] [-O FMT] [-U] [-p] [bs=N] [count=N] [skip=N] if=IN of=OUT'
DESCRIPTION = '''Copy blocks from one image into a new one, like dd(1).

operands (dd's syntax, no dashes):
  if=IN      the input image (any format diskimg reads; -f names it)
  of=OUT     the output image, created in the format -O names (default raw)
  bs=N       block size in bytes, with k/M/G... suffixes (default 512)
  count=N    copy N blocks only (default: to the end of the input)
  skip=N     skip N blocks of the input first'''
EXAMPLE = 'diskimg dd -O qcow2 bs=1M count=16 if=disk.raw of=head.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, obj=False, quiet=False)
    p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show progress as convert -p does (diskimg only: qemu-img dd has "
                        "no -p)")


def cmd_dd(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img dd with bs=, count=, skip=, if=, of= operands."""
    from diskimg.ops import dd as conv

    ops: dict[str, str] = {}
    for item in a.files:
        k, sep, v = item.partition("=")
        if not sep or k not in ("bs", "count", "skip", "if", "of"):
            raise ExitCode(f"unrecognized operand {k}", 1)
        ops[k] = v
    bs = 512
    if "bs" in ops:
        bs = size_arg(ops["bs"], "bs", 1, 2**31 - 1)
    count = size_arg(ops["count"], "count") if "count" in ops else None
    skip = size_arg(ops["skip"], "skip") if "skip" in ops else 0
    if "if" not in ops or "of" not in ops:
        raise ExitCode("Must specify both input and output files", 1)
    out_fmt = a.output_format or "raw"
    from diskimg.cli.progress import Progress

    prog = Progress(a.progress)
    with open_image(ctx, ops["if"], "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share) as src:
        opts.creatable(out_fmt, named=False)  # qemu-img: after opening the input
        created: list[bool] = []
        try:
            conv.dd(src, ops["of"], out_fmt, bs=bs, count=count, skip=skip, warn=ctx.warn,
                    progress=prog if prog.enabled else None,
                    on_created=lambda: created.append(True))
        except (DiskImgError, OSError) as e:
            if created:
                raise
            # the output could not be created (a lock, a missing directory, an NBD export
            # too small ...): in qemu-img dd's words
            raise DiskImgError(f"{ops['of']}: error while creating output image: "
                               f"{errors.create_reason(e, ops['of'], exact=True)}") from e
        finally:
            prog.end()
    return 0



run = cmd_dd
