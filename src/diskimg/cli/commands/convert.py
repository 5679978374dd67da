"""qemu-img convert: copy one or more images into a new (or existing) image."""

from __future__ import annotations

import sys

from diskimg.cli.commands._shared import (KNOWN_FORMATS, Context, _suppress, add_common,
                                          collect_o, option_list, open_image, parse_image_opts,
                                          print_help, size_arg, snapshot_param,
                                          strip_file_protocol, target_cache)
from diskimg.cli import errors
from diskimg.cli.errors import prog
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError
from diskimg.units import parse_size

# Start-up (issue 20): no argparse (a plain command line is read by cli/quickparse.py),
# typing, contextlib, signal or threading at import time
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from diskimg.cli.progress import QemuProgress, Schedule
    from diskimg.hostio.sink import Sink

USAGE = ('[-f FMT] [-O FMT] [-c] [-o K=V,...] [-B BACKING -F BACKING_FMT] [-n] [-p] [-W] [-m '
         'N] [-S SIZE] [-l SNAPSHOT] [-r RATE] [-U] [--object OBJ] [--image-opts] '
         '[--target-image-opts] [--target-is-zero] [--salvage] SRC... DST')
DESCRIPTION = 'Convert (copy) one or more images into a new image, sparsely.'
EXAMPLE = 'diskimg convert -p -O qcow2 disk.raw disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, src_cache=1)
    p.add_argument("-O", dest="output_format", metavar="FMT", help="output format")
    p.add_argument("-o", dest="options", action="append", metavar="K=V,...",
                   type=option_list)
    p.add_argument("-B", dest="backing", metavar="BACKING", help="target backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="its format")
    p.add_argument("-c", dest="compress", action="store_true", help="compress (qcow2)")
    p.add_argument("-n", dest="target_exists", action="store_true",
                   help="write into an existing target")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-W", dest="unordered", action="store_true",
                   help="out-of-order writes (accepted)")
    p.add_argument("-m", dest="coroutines", metavar="N", help="parallel requests (1-16)")
    p.add_argument("-S", dest="sparse", metavar="SIZE", help="zero run size for holes")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help="source snapshot")
    p.add_argument("-t", dest="cache", help=_suppress())
    p.add_argument("-C", dest="copy_range", action="store_true", help=_suppress())
    p.add_argument("--target-image-opts", action="store_true",
                   help="DST is an option string")
    p.add_argument("--target-is-zero", action="store_true",
                   help="the existing target (-n) reads as zeros: zero runs are not written")
    p.add_argument("-r", dest="rate", metavar="RATE",
                   help="copy at most RATE bytes of data per second (k, M, G... suffixes)")
    p.add_argument("--salvage", action="store_true",
                   help="unreadable source ranges become zeros (with a warning each)")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the persistent bitmaps (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps")


def _convert_progress(ctx: Context, a: argparse.Namespace, printer: QemuProgress | None,
                      srcs: list[BlockDevice], snap: tuple[str | None, str | None] | None,
                      target: Any, out_fmt: str, values: dict[str, str],
                      backing: str | None, backing_fmt: str | None, dst_path: str,
                      sparse: int) -> Schedule | None:
    """qemu-img convert's ``-p`` lines for these sources after the first (None without
    ``-p``)."""
    if printer is None:
        return None
    from diskimg.ops import convert as conv
    from diskimg.cli.progress import Schedule, convert_schedule

    view: BlockDevice | None = None
    try:
        if snap is not None:
            view = conv._snapshot_view(srcs[0], snap)
        cluster = 0
        if a.compress:
            if isinstance(target, BlockDevice):
                cluster = target.cluster_size or 65536
            elif out_fmt == "qcow2":
                cluster = parse_size(str(values.get("cluster_size", "65536")))
            else:
                cluster = 65536  # vmdk grains
        elif isinstance(target, BlockDevice) and target.compresses_every_write:
            cluster = target.cluster_size or 65536  # qemu: the target needs compressed writes
        elif out_fmt == "vmdk" and not a.target_exists and \
                values.get("subformat") == "streamOptimized":
            cluster = 65536  # the same for the new streamOptimized target (64 KiB grains)
        bsec = -1
        if backing is not None and not a.target_exists:
            bsec = _backing_sectors(ctx, backing, backing_fmt, dst_path)
        return convert_schedule(printer, [view] if view is not None else srcs,
                                target_backing=backing is not None, backing_sectors=bsec,
                                min_sparse=sparse, compress_cluster=cluster)
    except DiskImgError:
        return Schedule(printer, 0)  # the convert itself reports the problem
    finally:
        if view is not None:
            view.close()


def _backing_sectors(ctx: Context, backing: str, backing_fmt: str | None,
                     dst_path: str) -> int:
    """The size in sectors of the backing file a new target gets (named as in the
    target, so relative to its directory), qemu-img's ``target_backing_sectors``; -1 if
    it cannot be opened (the convert then reports why)."""
    from diskimg.cli.progress import SECTOR
    from diskimg.policy import combine

    try:
        with open_image(ctx, combine(dst_path, backing), "r", backing_fmt, backing=False,
                        need_key=False, metadata_only=True) as dev:
            return -(-dev.size // SECTOR)
    except (DiskImgError, OSError):
        return -1


def _warn(line: str) -> None:
    """A ``--salvage`` warning, as qemu-img's ``warn_report`` prints it."""
    sys.stderr.write(f"{prog()}: warning: {line}\n")


def cmd_convert(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img convert."""
    olist = collect_o(a.options)
    out_fmt = a.output_format or "raw"
    if a.coroutines is not None:
        try:
            m = int(a.coroutines)
        except ValueError:
            m = 0
        if not 1 <= m <= 16:
            raise UsageError("Invalid number of coroutines. Allowed number of coroutines is "
                             "between 1 and 16")
    sparse = 4096
    if a.sparse is not None:
        sparse = size_arg(a.sparse, "buffer size for sparse output")
        if sparse % 512 or sparse > 16 << 20:
            raise UsageError("Invalid buffer size for sparse output specified. Valid sizes "
                             "are multiples of 512 up to 16777216. Select 0 to disable sparse "
                             "detection (fully allocates output).")
    rate = size_arg(a.rate, "rate limit") if a.rate is not None else None
    if a.skip_broken_bitmaps and not a.bitmaps:
        raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
    if a.copy_range:  # qemu-img's order: -c, then -S (any value), then --salvage
        if a.compress:
            raise UsageError("Cannot enable copy offloading when -c is used")
        if a.sparse is not None:
            raise UsageError("Cannot enable copy offloading when -S is used")
        if a.salvage:
            raise UsageError("Cannot use copy offloading in salvaging mode")
    if a.target_image_opts and not a.target_exists:
        raise UsageError("--target-image-opts requires use of -n flag")
    if a.target_is_zero and not a.target_exists:
        raise UsageError("--target-is-zero requires use of -n flag")
    if olist is not None and a.target_exists:
        raise UsageError("-o has no effect when skipping image creation")
    if olist is not None:  # (-o given: its parser, diskimg.options, is loaded then)
        from diskimg import options as opts

        if opts.is_help(olist):  # with a target name, the file protocol's options too
            return print_help(out_fmt, a.files[-1] if len(a.files) > 1 else None)
    if len(a.files) < 2:
        raise UsageError("Must specify image file name")
    # the target '-' is standard output, written as a stream: no progress lines in it
    to_stdout = a.files[-1] == "-" and not a.target_exists and not a.target_image_opts
    printer: QemuProgress | None = None
    if a.progress and not a.quiet and not to_stdout:  # (the progress code: for -p only)
        from diskimg.cli.progress import QemuProgress

        printer = QemuProgress(True, 1.0)
        printer.report(0.0, 100)  # qemu-img's first line, printed before it opens anything
    try:
        _convert(ctx, a, olist, out_fmt, sparse, rate, printer)
    finally:
        if printer is not None:
            printer.end()  # after 100, or wherever a failure stopped it
    return 0


def _convert(ctx: Context, a: argparse.Namespace, olist: str | None, out_fmt: str,
             sparse: int, rate: int | None, printer: QemuProgress | None) -> None:
    """The part of :func:`cmd_convert` after qemu-img has started its progress line."""
    from diskimg.ops import convert as conv
    from diskimg.ops import is_url_name

    if out_fmt not in KNOWN_FORMATS or olist is not None:  # (the formats it creates)
        from diskimg import options as opts

        opts.creatable(out_fmt)
    *srcs, dst = a.files
    values: dict[str, str] = {}
    if olist is not None:
        values = opts.validate(out_fmt, opts.parse_list(olist))
    backing = a.backing if a.backing is not None else values.pop("backing_file", None)
    backing_fmt = a.backing_fmt or values.pop("backing_fmt", None)
    if a.target_is_zero and backing is not None:
        # qemu-img 7.2 prints this and exits 0 without converting; diskimg exits 1
        raise UsageError("Cannot use --target-is-zero when the destination image has a "
                         "backing file")
    if backing is not None and out_fmt in ("raw", "luks"):
        raise UsageError(f"Backing file not supported for file format '{out_fmt}'")
    if backing is not None and backing_fmt is None and not a.target_exists:
        raise UsageError("Use of backing file requires explicit backing format")
    if backing == "":  # (qemu-img 7.2 crashes on -B '' -F FMT)
        raise UsageError("Expected backing file name, got empty string")
    if a.compress and out_fmt in ("raw", "luks"):
        raise UsageError("Compression not supported for this file format")
    devs: list[BlockDevice] = []
    restore_sigterm: Callable[[], object] | None = None
    try:
        for s in srcs:
            devs.append(open_image(ctx, s, "r", a.format, image_opts=a.image_opts,
                                   force_share=a.force_share))
        if a.snapshot is not None and len(srcs) > 1:  # qemu-img: after opening, before -l
            raise UsageError("No support for concatenating multiple snapshot")
        snap = snapshot_param(a.snapshot)
        target_cache(a)  # qemu-img checks -t after opening the sources (before the target)
        dst_path, dst_opts = strip_file_protocol(dst), dict[str, str]()
        if a.target_image_opts:
            dst_path, tfmt, dst_opts = parse_image_opts(dst)
            out_fmt = tfmt or out_fmt
        for k in ("size", "nocow", "extent_size_hint"):
            values.pop(k, None)
        target: str | BlockDevice | Sink = dst_path
        if dst == "-" and not a.target_exists and not a.target_image_opts:
            # the target is stdout, written as a stream (progress lines would mix in)
            from diskimg.hostio.sink import Sink

            if sys.stdout.isatty():
                raise UsageError("the target '-' is standard output, which is a terminal: "
                                 "redirect it to a file or a pipe")
            sys.stdout.flush()
            target = Sink(sys.stdout.fileno(), "stdout")
            a.progress = False
        if a.target_exists:
            target = open_image(ctx, dst, "r+", None if a.target_image_opts else out_fmt,
                                image_opts=a.target_image_opts)
            devs.append(target)
        if snap is not None and len(srcs) == 1:
            # a bad snapshot is reported before the target is created (no target prefix)
            conv._snapshot_view(devs[0], snap).close()
        if a.bitmaps:  # qemu's refusals, in its words, before the target is created
            from diskimg.ops.bitmap_copy import check_copy

            check_copy(devs[: len(srcs)], out_fmt, values,
                       target if isinstance(target, BlockDevice) else None,
                       a.skip_broken_bitmaps)
        prog = _convert_progress(ctx, a, printer, devs[: len(srcs)], snap, target, out_fmt,
                                 values, backing, backing_fmt, dst_path, sparse)
        created: list[bool] = []
        try:
            if is_url_name(target):
                restore_sigterm = _terminate_as_exit()
            conv.convert(devs[: len(srcs)], target, out_fmt, options=values,
                         sparse_size=sparse, target_exists=a.target_exists,
                         backing_file=backing,
                         backing_fmt=backing_fmt, progress=prog,
                         snapshot=snap, compress=a.compress, secrets=ctx.secrets,
                         target_options=dst_opts,
                         workers=int(a.coroutines) if a.coroutines is not None else None,
                         bitmaps=a.bitmaps, skip_broken_bitmaps=a.skip_broken_bitmaps,
                         warn=lambda m: ctx.warn(f"warning: {m}"),
                         rate_limit=rate, target_is_zero=a.target_is_zero,
                         salvage=_warn if a.salvage and not a.quiet else a.salvage,
                         on_created=lambda: created.append(True))
        except (DiskImgError, OSError) as e:
            if not a.target_exists and not created:
                # the target could not be created: in qemu-img's words
                label = dst_path if a.target_image_opts else dst  # file:X as given
                raise DiskImgError(f"{label}: error while converting {out_fmt}: "
                                   f"{errors.create_reason(e, dst_path, exact=True)}") from e
            raise
        if prog is not None:
            prog.complete()
    finally:
        if restore_sigterm is not None:
            restore_sigterm()
        for d in devs:
            d.close()


def _terminate_as_exit() -> Callable[[], object] | None:
    """While an upload to a URL runs, SIGTERM ends the command as ^C does (exit status
    143): the upload is aborted, so no incomplete upload is left in the store (an
    interrupted one is never visible either way).  Returns what puts the previous handler
    back (None off the main thread, where no handler can be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, before)


run = cmd_convert
