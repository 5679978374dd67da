"""qemu-img map: how guest ranges map to host files."""

from __future__ import annotations

import sys

from diskimg.cli import output
from diskimg.cli.commands._shared import (Context, add_common, one_file, open_image,
                                          output_format, size_arg)
from diskimg.device import MapEntry

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

USAGE = ('[-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] [-U] '
         '[--object OBJ] [--image-opts] FILE')
DESCRIPTION = "Show how the image's guest ranges map to host files."
EXAMPLE = 'diskimg map --output=json disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, out=True, quiet=False)  # qemu-img: "unrecognized option '-q'"
    p.add_argument("--start-offset", metavar="OFF", help="first guest offset")
    p.add_argument("--max-length", metavar="LEN", help="bytes to map at most")


def cmd_map(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img map."""
    ofmt = output_format(a.output)
    name = one_file(a)
    start = size_arg(a.start_offset, "start offset") if a.start_offset is not None else 0
    maxlen = size_arg(a.max_length, "max length") if a.max_length is not None else None
    with open_image(ctx, name, "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share) as dev:
        chain = dev.chain()
        end = dev.size if maxlen is None else min(dev.size, start + maxlen)
        entries: Iterator[MapEntry] = iter(())
        if start < end:
            entries = dev.map(start, end - start)
        out = sys.stdout
        if ofmt == "json":
            first = True
            for e in entries:
                out.write(("[" if first else ",\n") + output.map_entry_json(e))
                first = False
            if first:
                out.write("[" + output.map_entry_json(MapEntry(start, 0, 0, False, False,
                                                                False)))
            out.write("]\n")
        else:
            out.write(output.MAP_HEADER + "\n")
            for e in entries:
                fname = e.filename or chain[min(e.depth, len(chain) - 1)].filename
                line = output.map_human_line(e, fname)
                if line is not None:
                    out.write(line + "\n")
    return 0



run = cmd_map
