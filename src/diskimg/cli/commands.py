"""One function per sub-command.  Each takes the parsed namespace and a :class:`Context`
and returns the exit code; errors are raised (``main`` prints them)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diskimg import api
from diskimg import options as opts
from diskimg.cli import output
from diskimg.device import BlockDevice, MapEntry
from diskimg.errors import DiskImgError, ImageLockedError, UsageError
from diskimg.units import SIZE_HELP, parse_size

if TYPE_CHECKING:
    from diskimg.cli.progress import QemuProgress, Schedule

# diskimg.operations (threads, queues) and diskimg.cli.progress are imported by the
# commands that copy data: info, check, map and snapshot start without them

KNOWN_FORMATS = ("qcow2", "raw", "vmdk")
PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


class ExitCode(Exception):
    """An error with a specific exit code (``lines`` printed with the program prefix)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Context:
    """Global state shared by commands: secrets, --untrusted, output streams."""

    prog: str = "diskimg"
    untrusted: bool = False
    secrets: dict[str, bytes] = field(default_factory=dict)

    def warn(self, msg: str) -> None:
        sys.stderr.write(f"{self.prog}: {msg}\n")


# --- helpers ------------------------------------------------------------------------


def size_arg(text: str, what: str) -> int:
    """Parse a size option; qemu's "Invalid <what> specified. You may use ..." message."""
    try:
        return parse_size(text)
    except UsageError as e:
        if str(e) == SIZE_HELP:
            raise UsageError(SIZE_HELP.replace("Invalid image size", f"Invalid {what}")) from None
        raise


def parse_image_opts(text: str) -> tuple[str, str | None, dict[str, str]]:
    """``driver=qcow2,file.filename=X,encrypt.key-secret=s`` → (path, format, options)."""
    if "=" not in opts.split_list(text)[0]:
        raise DiskImgError(f"Could not open '{text}': Cannot find device='{text}' nor "
                           f"node-name='{text}'")
    pairs = opts.parse_list(text)
    d = dict(pairs)
    fmt = d.pop("driver", None)
    path = d.pop("file.filename", None) or d.pop("filename", None)
    if fmt == "file":
        fmt = "raw"
    if path is None:
        raise DiskImgError(f"Could not open '{text}': A block device must be specified for "
                           '"file"')
    rest = {k: v for k, v in d.items() if not k.startswith("file.")}
    if fmt is not None and fmt not in KNOWN_FORMATS:
        raise DiskImgError(f"Could not open '{text}': Unknown driver '{fmt}'")
    for k in rest:
        if fmt == "raw" or not (k.startswith("encrypt.") or fmt in (None, "qcow2", "vmdk")):
            raise DiskImgError(f"Could not open '{text}': Block format '{fmt or 'raw'}' does "
                               f"not support the option '{k}'")
    return path, fmt, rest


def open_image(ctx: Context, name: str, mode: str = "r", fmt: str | None = None, *,
               image_opts: bool = False, force_share: bool = False,
               backing: bool = True, need_key: bool = True,
               for_check: bool = False) -> BlockDevice:
    """Open like qemu-img's ``img_open``: errors read ``Could not open 'NAME': reason``.

    ``need_key``: an encrypted image needs ``encrypt.key-secret`` (every command but info).
    """
    options: dict[str, str] = {}
    label = name
    path = name
    if image_opts:
        if fmt is not None:
            raise UsageError("--image-opts and --format are mutually exclusive")
        path, fmt, options = parse_image_opts(name)
    if fmt is not None and fmt not in KNOWN_FORMATS:
        raise DiskImgError(f"Could not open '{label}': Unknown driver '{fmt}'")
    sid = options.get("encrypt.key-secret")
    if sid is not None and sid not in ctx.secrets:
        raise DiskImgError(f"Could not open '{label}': No secret with id '{sid}'")
    try:
        dev = api.open(path, mode, fmt, backing=backing, force_share=force_share,
                       untrusted=ctx.untrusted, secrets=ctx.secrets, options=options,
                       for_check=for_check)
    except DiskImgError as e:
        raise type(e)(f"Could not open '{label}': {qemu_open_error(str(e), fmt)}") from e
    except OSError as e:
        raise DiskImgError(f"Could not open '{label}': {e.strerror or e}") from e
    if need_key and sid is None and dev.format != "raw":
        try:
            encrypted = dev.info().encrypted
        except DiskImgError:
            encrypted = False
        if encrypted:
            dev.close()
            raise DiskImgError(f"Could not open '{label}': Parameter 'encrypt.key-secret' is "
                               "required for cipher")
    if mode == "r+" and getattr(dev, "probed", False):
        sys.stderr.write(PROBED_RAW_WARNING.format(path))
    return dev


_MISSING_BACKING = re.compile(r"^Could not open backing file '(.*)' named by '.*': "
                              r"(No such file or directory|Permission denied|Not a directory)$",
                              re.S)


def qemu_open_error(msg: str, fmt: str | None) -> str:
    """qemu-img's words for an open failure diskimg's library words differently: a
    missing backing file (the library also names the image that refers to it) and a file
    that is not a vmdk opened with ``-f vmdk``."""
    m = _MISSING_BACKING.match(msg)
    if m:
        return f"Could not open backing file: Could not open '{m[1]}': {m[2]}"
    if fmt == "vmdk" and msg == "Not a VMDK image":
        return "invalid VMDK image descriptor"
    return msg


@contextmanager
def opened(ctx: Context, name: str, mode: str = "r", fmt: str | None = None,
           **kw: Any) -> Iterator[BlockDevice]:
    dev = open_image(ctx, name, mode, fmt, **kw)
    try:
        yield dev
    finally:
        dev.close()


def one_file(args: argparse.Namespace) -> str:
    if len(args.files) != 1:
        raise UsageError("Expecting one image file name", )
    return str(args.files[0])


def output_format(text: str | None) -> str:
    if text in (None, "human"):
        return "human"
    if text == "json":
        return "json"
    raise ExitCode("--output must be used with human or json as argument.", 1)


# --- info ---------------------------------------------------------------------------


def _check_chain_names(ctx: Context, name: str, a: argparse.Namespace) -> None:
    """``info --backing-chain`` opens image after image like qemu-img, so a missing
    backing file is reported under its own name: ``Could not open 'B': Could not open
    'B': ...``."""
    try:
        with opened(ctx, name, "r", a.format, image_opts=a.image_opts,
                    force_share=a.force_share, need_key=False, backing=True):
            return
    except DiskImgError as e:
        inner = e.__cause__ if isinstance(e.__cause__, DiskImgError) else e
        if inner.backing_path is not None:  # the backing file itself would not open
            raise DiskImgError(f"Could not open '{inner.backing_path}': "
                               f"{inner.backing_reason}") from e
        m = re.match(r"^Could not open '.*': Could not open backing file: Could not open "
                     r"'(.*)': (.*)$", str(e), re.S)
        if m is None:
            raise
        raise DiskImgError(f"Could not open '{m[1]}': Could not open '{m[1]}': {m[2]}") \
            from e


def cmd_info(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img info."""
    ofmt = output_format(a.output)
    name = one_file(a)
    if a.backing_chain:
        _check_chain_names(ctx, name, a)
    with opened(ctx, name, "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share, need_key=False,
                backing=bool(a.backing_chain)) as dev:  # info needs no backing file
        devs = dev.chain() if a.backing_chain else [dev]
        infos = [d.info().to_json() for d in devs]
    if ofmt == "json":  # every object in QEMU's QDict order, format-specific data too
        text = output.to_json(output.qdict_order_deep(infos if a.backing_chain else infos[0]))
    elif a.backing_chain:
        text = output.info_chain_human(infos)
    else:
        text = output.info_human(infos[0])
    sys.stdout.write(text)
    return 0


# --- map ----------------------------------------------------------------------------


def cmd_map(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img map."""
    ofmt = output_format(a.output)
    name = one_file(a)
    start = size_arg(a.start_offset, "start offset") if a.start_offset is not None else 0
    maxlen = size_arg(a.max_length, "max length") if a.max_length is not None else None
    with opened(ctx, name, "r", a.format, image_opts=a.image_opts,
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


# --- check --------------------------------------------------------------------------


def run_check(dev: BlockDevice, repair: str | None) -> Any:
    """The format's checker (``dev.check(repair)``); ExitCode 63 for formats without one."""
    fn = getattr(dev, "check", None)
    if dev.format == "raw" or fn is None or (dev.format == "vmdk" and repair):
        # qemu's vmdk check cannot repair: with -r it reports no check support
        raise ExitCode("This image format does not support checks", 63)
    return fn(repair)


def _lines(res: Any, attr: str) -> list[str]:
    v = getattr(res, attr, None)
    return [str(x) for x in v] if isinstance(v, list | tuple) else []


def _raw_open_allowed(name: str, fmt: str | None, writable: bool) -> bool:
    """Whether ``name`` is a raw image that qemu-img would open despite another process's
    locks: qemu's raw driver takes "consistent read" (and "write" when writable) and
    unshares nothing, so qemu-img check reaches "does not support checks" where diskimg's
    stricter locks refuse.  Nothing is left locked or changed."""
    from diskimg.hostio import lock, open_host_file
    from diskimg.probe import probe

    try:
        with open_host_file(name, writable, lock_mode=False) as hf:
            probed = fmt is None
            if (fmt or probe(hf)) != "raw":
                return False
            held = {lock.PERM_CONSISTENT_READ} | ({lock.PERM_WRITE} if writable else set())
            lock.acquire(hf.fd, name, held, set())
    except DiskImgError:
        return False
    if probed and writable:
        sys.stderr.write(PROBED_RAW_WARNING.format(name))
    return True


def cmd_check(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img check: 0 clean, 1 check failed, 2 corruptions, 3 leaks, 63 unsupported."""
    ofmt = output_format(a.output)
    if a.repair not in (None, "leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                         f"{a.repair}")
    name = one_file(a)
    try:
        dev = open_image(ctx, name, "r+" if a.repair else "r", a.format,
                         image_opts=a.image_opts, force_share=a.force_share, for_check=True)
    except ImageLockedError:
        if not a.image_opts and _raw_open_allowed(name, a.format, bool(a.repair)):
            raise ExitCode("This image format does not support checks", 63) from None
        raise
    try:
        res = run_check(dev, a.repair)
    finally:
        dev.close()
    err, out = sys.stderr, sys.stdout
    repaired = bool(getattr(res, "repaired", False))
    summary = res.summary_lines() if hasattr(res, "summary_lines") else []
    head, tail = (summary[:6], summary[6:]) if repaired else ([], summary)
    if repaired:
        err.writelines(line + "\n" for line in _lines(res, "repair_messages"))
    if ofmt == "human" and not a.quiet:
        out.writelines(line + "\n" for line in head)
    out.flush()
    err.writelines(line + "\n" for line in _lines(res, "messages"))
    err.flush()
    d = dict(res.to_json())
    if "filename" in d:
        d["filename"] = name  # qemu-img prints the argument as given (./x, --image-opts)
    findings = d.pop("findings", None)
    if getattr(res, "error", None) is not None:
        pass  # the check could not finish: qemu-img prints only "Check failed: ..."
    elif ofmt == "json":
        doc = output.qdict_order(d)
        if findings is not None:
            doc["findings"] = findings  # diskimg's addition; qemu-img's keys are unchanged
        out.write(output.to_json(doc))
    elif not a.quiet:
        out.write("".join(line + "\n" for line in tail) if summary or not d
                  else output.check_human(d))
    out.flush()
    fail = getattr(res, "failure_message", None)
    if fail:
        ctx.warn(fail)
    code = getattr(res, "exit_code", None)
    if code is not None:
        return int(code)
    if d.get("check-errors"):
        return 1
    return 2 if d.get("corruptions") else 3 if d.get("leaks") else 0


# --- create -------------------------------------------------------------------------


def _collect_o(values: list[str] | None) -> str | None:
    if not values:
        return None
    return ",".join(values)


def _print_help(fmt: str, filename: str | None) -> int:
    if fmt not in opts.FORMAT_OPTIONS:
        raise UsageError(f"Unknown file format '{fmt}'")
    sys.stdout.write(opts.help_text(fmt, with_protocol=filename is not None))
    return 0


def _probe_name(path: str) -> str:
    from diskimg.probe import probe_bytes

    try:
        with open(path, "rb") as f:
            return probe_bytes(f.read(2048))
    except OSError:
        return "raw"


def _resolve_backing(backing: str, image: str) -> str:
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image), backing)


def create_image(ctx: Context, filename: str, fmt: str, size: int | None,
                 olist: str | None, backing: str | None, backing_fmt: str | None,
                 unsafe: bool, quiet: bool) -> None:
    """qemu's ``bdrv_img_create``: validate, print ``Formatting ...``, create."""

    def fail(msg: str) -> DiskImgError:
        return DiskImgError(f"{filename}: {msg}")

    if fmt not in opts.FORMAT_OPTIONS:
        raise fail(f"Unknown file format '{fmt}'")
    try:
        values = opts.validate(fmt, opts.parse_list(olist)) if olist else {}
    except UsageError as e:
        if str(e).startswith("Invalid option list"):
            raise
        raise fail(str(e)) from None
    if "size" in values:
        if size is not None:
            raise fail("The image size must be specified only once")
        size = int(values["size"])
    backing = backing if backing is not None else values.get("backing_file")
    backing_fmt = backing_fmt if backing_fmt is not None else values.get("backing_fmt")
    if backing is not None:
        if fmt == "raw":
            raise fail(f"Backing file not supported for file format '{fmt}'")
        values["backing_file"] = backing
        if backing_fmt is not None:
            values["backing_fmt"] = backing_fmt
        if not unsafe:
            bpath = _resolve_backing(backing, filename)
            if backing_fmt is None and os.path.exists(bpath):
                raise fail("Backing file specified without backing format\n"
                           f"Detected format of {_probe_name(bpath)}.")
            try:
                with api.open(bpath, "r", backing_fmt, force_share=True,
                              untrusted=ctx.untrusted, secrets=ctx.secrets) as b:
                    if size is None:
                        size = b.size
            except DiskImgError as e:
                msg = str(e)
                if msg.startswith("Could not open '"):
                    msg = msg.replace(f"'{bpath}'", f"'{backing}'", 1)
                raise fail(f"{msg}\nCould not open backing image.") from None
        elif backing_fmt is None:
            raise fail("Backing file specified without backing format")
    if size is None:
        raise fail("Image creation needs a size parameter")
    values["size"] = str(size)
    if not quiet:
        sys.stdout.write(opts.formatting_line(filename, fmt, values) + "\n")
        sys.stdout.flush()
    prealloc = values.get("preallocation")
    if prealloc is not None:
        allowed = ("off", "falloc", "full") + (("metadata",) if fmt == "qcow2" else ())
        if prealloc not in allowed:
            if prealloc in ("off", "metadata", "falloc", "full"):
                raise fail(f"Unsupported preallocation mode: {prealloc}")
            raise fail(f"invalid parameter value: {prealloc}")
    create_opts = {k: v for k, v in values.items()
                   if k not in ("size", "backing_file", "backing_fmt", "nocow",
                                "extent_size_hint")}
    try:
        api.create(filename, fmt, size, backing_file=backing, backing_fmt=backing_fmt,
                   unsafe=True, options=create_opts, secrets=ctx.secrets)
    except DiskImgError as e:
        msg = str(e)
        if msg.startswith("Could not open '"):
            msg = msg.replace("Could not open", "Could not create", 1)
        raise fail(msg) from e
    except OSError as e:
        raise fail(f"Could not create '{filename}': {e.strerror or e}") from e


def cmd_create(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img create."""
    olist = _collect_o(a.options)
    fmt = a.format or "raw"
    if opts.is_help(olist):
        return _print_help(fmt, a.files[0] if a.files else None)
    if olist is not None:
        opts.parse_list(olist)  # "Invalid option list" before anything else
    if not a.files:
        raise UsageError("Expecting image file name")
    if len(a.files) > 2:
        raise UsageError(f"Unexpected argument: {a.files[2]}")
    size = None
    if len(a.files) == 2:
        size = parse_size(a.files[1])
    create_image(ctx, a.files[0], fmt, size, olist, a.backing, a.backing_fmt, a.unsafe,
                 a.quiet)
    return 0


# --- convert ------------------------------------------------------------------------


def _snapshot_param(text: str | None) -> tuple[str | None, str | None] | None:
    if text is None:
        return None
    if text.startswith("snapshot."):
        d = dict(opts.parse_list(text))
        unknown = [k for k in d if k not in ("snapshot.id", "snapshot.name")]
        if unknown:
            raise UsageError(f"Invalid parameter '{unknown[0]}'")
        return d.get("snapshot.id"), d.get("snapshot.name")
    return text, text


def _convert_progress(a: argparse.Namespace, srcs: list[BlockDevice],
                      snap: tuple[str | None, str | None] | None, target: Any, out_fmt: str,
                      values: dict[str, str], target_backing: bool,
                      sparse: int) -> Schedule:
    """qemu-img convert's ``-p`` lines for these sources (nothing without ``-p``)."""
    from diskimg import operations as conv
    from diskimg.cli.progress import QemuProgress, Schedule, convert_schedule

    printer = QemuProgress(a.progress and not a.quiet, 1.0)
    if not printer.enabled:
        return Schedule(printer, 0)
    view: BlockDevice | None = None
    try:
        if snap is not None:
            view = conv._snapshot_view(srcs[0], snap)
        cluster = 0
        if a.compress:
            if isinstance(target, BlockDevice):
                cluster = int(getattr(target, "cluster_size", None) or 65536)
            elif out_fmt == "qcow2":
                cluster = parse_size(str(values.get("cluster_size", "65536")))
            else:
                cluster = 65536  # vmdk grains
        return convert_schedule(printer, [view] if view is not None else srcs,
                                target_backing=target_backing, min_sparse=sparse,
                                compress_cluster=cluster)
    except DiskImgError:
        return Schedule(printer, 0)  # the convert itself reports the problem
    finally:
        if view is not None:
            view.close()


def _file_state(path: str) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of ``path``, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _create_error(e: BaseException, path: str) -> str:
    """The reason a new target could not be created, worded like qemu's."""
    if isinstance(e, ImageLockedError):
        return str(e)  # qemu's two lines as they are (it is an OSError too)
    if isinstance(e, OSError):
        return f"Could not create '{path}': {e.strerror or e}"
    msg = str(e)
    prefix = f"Could not open '{path}'"
    if msg.startswith(prefix):
        msg = "Could not create" + msg[len("Could not open"):]
    return msg


def cmd_convert(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img convert."""
    from diskimg import operations as conv

    olist = _collect_o(a.options)
    out_fmt = a.output_format or "raw"
    if opts.is_help(olist):
        return _print_help(out_fmt, None)
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
    if len(a.files) < 2:
        raise UsageError("Must specify image file name")
    if out_fmt not in opts.FORMAT_OPTIONS:
        raise UsageError(f"Unknown file format '{out_fmt}'")
    *srcs, dst = a.files
    values: dict[str, str] = {}
    if olist is not None:
        if a.target_exists:
            raise UsageError("-o has no effect when skipping image creation")
        values = opts.validate(out_fmt, opts.parse_list(olist))
    backing = a.backing or values.pop("backing_file", None)
    backing_fmt = a.backing_fmt or values.pop("backing_fmt", None)
    if backing is not None and out_fmt == "raw":
        raise UsageError("Backing file not supported for file format 'raw'")
    if backing is not None and backing_fmt is None and not a.target_exists:
        raise UsageError("Use of backing file requires explicit backing format")
    if a.compress and out_fmt == "raw":
        raise UsageError("Compression not supported for this file format")
    snap = _snapshot_param(a.snapshot)
    devs: list[BlockDevice] = []
    try:
        for s in srcs:
            devs.append(open_image(ctx, s, "r", a.format, image_opts=a.image_opts,
                                   force_share=a.force_share))
        dst_path, dst_opts = dst, dict[str, str]()
        if a.target_image_opts:
            dst_path, tfmt, dst_opts = parse_image_opts(dst)
            out_fmt = tfmt or out_fmt
        for k in ("size", "nocow", "extent_size_hint"):
            values.pop(k, None)
        target: str | BlockDevice = dst_path
        if a.target_exists:
            target = open_image(ctx, dst, "r+", None if a.target_image_opts else out_fmt,
                                image_opts=a.target_image_opts)
            devs.append(target)
        if snap is not None and len(srcs) == 1:
            # a bad snapshot is reported before the target is created (no target prefix)
            conv._snapshot_view(devs[0], snap).close()
        prog = _convert_progress(a, devs[: len(srcs)], snap, target, out_fmt, values,
                                 backing is not None, sparse)
        before = _file_state(dst_path)
        try:
            conv.convert(devs[: len(srcs)], target, out_fmt, options=values,
                         sparse_size=sparse, target_exists=a.target_exists,
                         backing_file=backing,
                         backing_fmt=backing_fmt, progress=prog if prog.enabled else None,
                         snapshot=snap, compress=a.compress, secrets=ctx.secrets,
                         target_options=dst_opts,
                         workers=int(a.coroutines) if a.coroutines is not None else None)
        except (DiskImgError, OSError) as e:
            prog.stop()
            after = _file_state(dst_path)
            if not a.target_exists and (after == before or (after and after[2] == 0)):
                # nothing was written: creating the target failed, in qemu-img's words
                raise DiskImgError(f"{dst_path}: error while converting {out_fmt}: "
                                   f"{_create_error(e, dst_path)}") from e
            raise
        except BaseException:
            prog.stop()
            raise
        prog.finish()
    finally:
        for d in devs:
            d.close()
    return 0


# --- compare ------------------------------------------------------------------------


def cmd_compare(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img compare: 0 identical, 1 different, 2 error."""
    from diskimg import operations as conv
    from diskimg.cli.progress import SIZE_MISMATCH, QemuProgress, Schedule, compare_schedule

    if len(a.files) != 2:
        raise UsageError("Expecting two image file names")
    printer = QemuProgress(a.progress and not a.quiet, 2.0)
    prog = Schedule(printer, 0)
    try:
        with opened(ctx, a.files[0], "r", a.format, image_opts=a.image_opts,
                    force_share=a.force_share) as d1, \
             opened(ctx, a.files[1], "r", a.format2 or a.format, image_opts=a.image_opts,
                    force_share=a.force_share) as d2:
            if printer.enabled:
                prog = compare_schedule(printer, d1, d2)
            same, off, msg = conv.compare(d1, d2, strict=a.strict,
                                          progress=prog if prog.enabled else None)
    except (DiskImgError, OSError) as e:
        raise ExitCode(str(e) if isinstance(e, DiskImgError) else
                       (e.strerror or str(e)), 2) from e
    # qemu-img prints 0 before its first check, then a line per chunk it finished
    prog.advance(2**63 if same else off if off is not None else -1)
    if prog.printed(SIZE_MISMATCH) and msg.startswith(SIZE_MISMATCH):
        msg = msg[len(SIZE_MISMATCH):]  # already printed between the progress lines
    if not a.quiet:
        sys.stdout.write(msg + "\n")
    prog.stop()
    return 0 if same else 1


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a, strict=True) == os.path.realpath(b, strict=True)
    except OSError:
        return False


def _basic_schedule(printer: QemuProgress) -> Schedule:
    """Only qemu-img's first (0) and last (100) progress calls."""
    from diskimg.cli.progress import Schedule

    sched = Schedule(printer, 0)
    sched.add(-1, 0.0, 100)
    sched.add(0, 100.0, 0)
    return sched


def commit_progress(ctx: Context, a: argparse.Namespace, path: str,
                    fmt: str | None) -> Schedule:
    """qemu-img commit's ``-p`` lines for ``path`` (nothing without ``-p``)."""
    from diskimg.cli.progress import QemuProgress, Schedule, commit_schedule

    printer = QemuProgress(a.progress and not a.quiet, 1.0)
    if not printer.enabled:
        return Schedule(printer, 0)
    try:
        with api.open(path, "r", fmt, force_share=True, untrusted=ctx.untrusted,
                      secrets=ctx.secrets) as top:
            chain = top.chain()
            depth = 1
            if a.base is not None:
                for k in range(1, len(chain)):
                    parent = os.path.dirname(chain[k - 1].filename)
                    if _same_file(os.path.join(parent, a.base), chain[k].filename):
                        depth = k
                        break
            return commit_schedule(printer, top, depth)
    except (DiskImgError, OSError):
        return _basic_schedule(printer)  # the commit itself reports the problem


def rebase_progress(ctx: Context, a: argparse.Namespace, path: str, fmt: str | None,
                    backing: str | None) -> Schedule:
    """qemu-img rebase's ``-p`` lines for ``path`` (nothing without ``-p``)."""
    from diskimg.cli.progress import (QemuProgress, Schedule, rebase_schedule,
                                      unsafe_rebase_schedule)

    printer = QemuProgress(a.progress and not a.quiet, 2.0)
    if not printer.enabled:
        return Schedule(printer, 0)
    if a.unsafe:
        return unsafe_rebase_schedule(printer)
    try:
        with api.open(path, "r", fmt, force_share=True, untrusted=ctx.untrusted,
                      secrets=ctx.secrets) as dev:
            prefix = None
            if backing is not None:
                new = _resolve_backing(backing, path)
                chain = dev.chain()
                prefix = next((k for k in range(1, len(chain))
                               if _same_file(new, chain[k].filename)), None)
            return rebase_schedule(printer, dev, prefix)
    except (DiskImgError, OSError):
        return _basic_schedule(printer)  # the rebase itself reports the problem


# --- dd -----------------------------------------------------------------------------


def cmd_dd(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img dd with bs=, count=, skip=, if=, of= operands."""
    from diskimg import operations as conv

    ops: dict[str, str] = {}
    for item in a.files:
        k, sep, v = item.partition("=")
        if not sep or k not in ("bs", "count", "skip", "if", "of"):
            raise ExitCode(f"unrecognized operand {k}", 1)
        ops[k] = v
    bs = 512
    if "bs" in ops:
        bs = size_arg(ops["bs"], "bs")
        if not 1 <= bs <= 2**31 - 1:
            raise UsageError("Invalid bs specified. Must be between 1 and 2147483647.")
    count = size_arg(ops["count"], "count") if "count" in ops else None
    skip = size_arg(ops["skip"], "skip") if "skip" in ops else 0
    if "if" not in ops or "of" not in ops:
        raise ExitCode("Must specify both input and output files", 1)
    out_fmt = a.output_format or "raw"
    if out_fmt not in opts.FORMAT_OPTIONS:
        raise UsageError(f"Unknown file format '{out_fmt}'")
    with opened(ctx, ops["if"], "r", a.format, image_opts=a.image_opts,
                force_share=a.force_share) as src:
        conv.dd(src, ops["of"], out_fmt, bs=bs, count=count, skip=skip, warn=ctx.warn)
    return 0


# --- resize -------------------------------------------------------------------------


def cmd_resize(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img resize FILE [+|-]SIZE."""
    if len(a.files) < 2:
        raise UsageError("Not enough arguments")
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
    with opened(ctx, name, "r", a.format, image_opts=a.image_opts, force_share=True,
                need_key=False) as probe:
        vmdk = probe.format == "vmdk"
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
    with opened(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        cur = dev.size
        new = cur + delta if rel == "+" else cur - delta if rel == "-" else delta
        if new <= 0:
            raise UsageError("New image size must be positive")
        if prealloc == "metadata" and dev.format != "qcow2":
            raise UsageError("Unsupported preallocation mode: metadata")
        if dev.format == "qcow2" and new % 512:
            raise UsageError("The new size must be a multiple of 512")
        if new < cur and not a.shrink:
            raise ExitCode("Use the --shrink option to perform a shrink operation.\n"
                           "\0warning: Shrinking an image will delete all data beyond the "
                           "shrunken image's end. Before performing such an operation, make "
                           "sure there is no important data there.", 1)
        if new < cur and prealloc not in (None, "off"):
            raise UsageError("Preallocation can only be used for growing images")
        fn = getattr(dev, "resize", None)
        if fn is None:
            raise DiskImgError(f"resize is not supported yet for format '{dev.format}'")
        if dev.format == "raw":
            fn(new, prealloc or "off")
        else:
            kw: dict[str, Any] = {"shrink": a.shrink}
            if prealloc:
                kw["preallocation"] = prealloc
            fn(new, **kw)
    if not a.quiet:
        sys.stdout.write("Image resized.\n")
    return 0


# --- measure ------------------------------------------------------------------------


def _load_snapshot(dev: BlockDevice, text: str) -> BlockDevice:
    """``-l`` for measure: the snapshot's read-only view (qemu's error wording)."""
    from diskimg import operations as conv

    try:
        snap = _snapshot_param(text)
    except UsageError as e:
        raise UsageError(f"{e}\n\0Failed in parsing snapshot param '{text}'") from None
    assert snap is not None
    try:
        return conv._snapshot_view(dev, snap)
    except DiskImgError as e:
        msg = str(e)
        if not msg.startswith("Failed to load snapshot: "):
            msg = f"Failed to load snapshot: {msg}"
        raise DiskImgError(msg) from e


def cmd_measure(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img measure: file size needed for a new image of --size or of FILE's data."""
    from diskimg.qcow2.measure import measure

    ofmt = output_format(a.output)
    img_size = size_arg(a.size, "image size") if a.size is not None else None
    olist = _collect_o(a.options)
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
        if out_fmt not in opts.FORMAT_OPTIONS:
            raise UsageError(f"Unknown file format '{out_fmt}'")
        values: dict[str, str] = {}
        if olist is not None:
            try:
                values = opts.validate(out_fmt, opts.parse_list(olist))
            except UsageError as e:
                raise UsageError(f"{e}\n\0Invalid options for file format '{out_fmt}'") \
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


# --- commit -------------------------------------------------------------------------


def path_and_format(a: argparse.Namespace, name: str, command: str,
                    allowed: tuple[str, ...] = ()) -> tuple[str, str | None, dict[str, str]]:
    """The file name, format and image options of FILE for commands that reopen it by
    path (commit, rebase, amend): with ``--image-opts`` parsed by :func:`parse_image_opts`.
    Image options other than ``allowed`` are refused (they could not be passed on)."""
    if not a.image_opts:
        return name, a.format, {}
    path, fmt, rest = parse_image_opts(name)
    for k in rest:
        if k not in allowed:
            raise UsageError(f"diskimg {command} does not support the image option '{k}'")
    return path, fmt, rest


_KEY_OPTION = re.compile(r"^(backing\.)*encrypt\.key-secret$")


def _key_options(a: argparse.Namespace, name: str) -> tuple[str, ...]:
    """The image options commit and rebase pass on: the key secrets of the image
    (``encrypt.key-secret``) and of its backing files (``backing.encrypt.key-secret``,
    ``backing.backing.encrypt.key-secret`` ...), as qemu-img accepts them."""
    if not a.image_opts:
        return ()
    return tuple(k for k in parse_image_opts(name)[2] if _KEY_OPTION.match(k))


def _check_backing_keys(name: str, dev: BlockDevice) -> None:
    """qemu-img's open error for an encrypted backing file given no key secret (diskimg's
    open itself only fails on the first data access)."""
    for d in dev.chain()[1:]:
        opts = getattr(d, "options", {})
        if d.format == "qcow2" and "encrypt.key-secret" not in opts:
            try:
                encrypted = d.info().encrypted
            except DiskImgError:
                encrypted = False
            if encrypted:
                raise DiskImgError(f"Could not open '{name}': Could not open backing file: "
                                   "Parameter 'encrypt.key-secret' is required for cipher")


def cmd_commit(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img commit [-b BASE] [-d] [-p] [--image-opts] FILE."""
    from diskimg import operations as conv

    name = one_file(a)
    # open once the way qemu-img does, for its error messages (and the probed-raw warning)
    with opened(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        if dev.backing is None:
            raise DiskImgError("Image does not have a backing file")
        _check_backing_keys(name, dev)
    path, fmt, img_opts = path_and_format(a, name, "commit", _key_options(a, name))
    prog = commit_progress(ctx, a, path, fmt)
    conv.commit(path, base=a.base, drop=a.drop, progress=prog if prog.enabled else None,
                format=fmt, untrusted=ctx.untrusted, secrets=ctx.secrets, options=img_opts)
    prog.finish()
    if not a.quiet:
        sys.stdout.write("Image committed.\n")
    return 0


# --- rebase -------------------------------------------------------------------------


def cmd_rebase(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img rebase [-u] [-p] -b BACKING [-F FMT] [--image-opts] FILE."""
    from diskimg import operations as conv

    name = one_file(a)
    if not a.unsafe and a.backing is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    if a.backing_fmt is not None and a.backing_fmt not in KNOWN_FORMATS:
        raise UsageError(f"Invalid format name: '{a.backing_fmt}'")
    backing = a.backing or None
    with opened(ctx, name, "r+", a.format, backing=not a.unsafe,
                image_opts=a.image_opts) as dev:
        fmt = dev.format
        if not a.unsafe:
            _check_backing_keys(name, dev)
    path, path_fmt, img_opts = path_and_format(a, name, "rebase", _key_options(a, name))
    if fmt != "qcow2":
        raise DiskImgError(f"Could not change the backing file to '{a.backing or ''}': "
                           "Operation not supported")
    if backing is not None and a.backing_fmt is None:
        # qemu-img copies first and then fails on this; diskimg fails before writing
        raise DiskImgError(f"Could not change the backing file to '{backing}': backing "
                           "format must be specified")
    if backing is not None and not a.unsafe:
        bpath = _resolve_backing(backing, path)
        if not os.path.exists(bpath):
            raise DiskImgError(f"Could not open new backing file '{backing}': Could not open "
                               f"'{bpath}': No such file or directory")
    prog = rebase_progress(ctx, a, path, path_fmt, backing)
    conv.rebase(path, backing, a.backing_fmt, unsafe=a.unsafe, format=path_fmt,
                progress=prog if prog.enabled else None, untrusted=ctx.untrusted,
                secrets=ctx.secrets, force_share=a.force_share, options=img_opts)
    prog.finish()
    return 0


# --- snapshot -----------------------------------------------------------------------


def cmd_snapshot(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img snapshot [-l | -c NAME | -a NAME | -d NAME] FILE."""
    actions = list(a.actions)
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    name = one_file(a)
    action, arg = actions[0] if actions else (None, None)
    writable = action in ("create", "apply", "delete")
    if writable and a.force_share:
        raise DiskImgError(f"Could not open '{name}': force-share=on can only be used with "
                           "read-only images")
    with opened(ctx, name, "r+" if writable else "r", None, image_opts=a.image_opts,
                force_share=a.force_share) as dev:
        table = getattr(dev, "snapshots", None)
        if action == "list":
            snaps = table.list() if table is not None else []
            if snaps:
                lines = ["Snapshot list:", output.snapshot_header()]
                lines += [output.snapshot_row(s.to_json()) for s in snaps]
                sys.stdout.write("\n".join(lines) + "\n")
        elif action == "create":
            try:
                if table is None:
                    raise DiskImgError("-95 (Operation not supported)")  # qemu's errno text
                table.create(arg)
            except DiskImgError as e:
                raise DiskImgError(f"Could not create snapshot '{arg}': {e}") from e
        elif action == "apply":
            try:
                if table is None:
                    if getattr(dev, "probed", False):
                        # qemu reopens the file to try its snapshots: the warning again
                        sys.stderr.write(PROBED_RAW_WARNING.format(name))
                    raise DiskImgError("Block driver does not support snapshots")
                table.check_revertible()
                found = [s for s in table.list() if s.id == arg] or \
                    [s for s in table.list() if s.name == arg]
                if not found:
                    raise DiskImgError("Failed to load snapshot: No such file or directory")
                table.apply(found[0].id)
            except DiskImgError as e:
                raise DiskImgError(f"Could not apply snapshot '{arg}': {e}") from e
        elif action == "delete":
            try:
                if table is None:
                    raise DiskImgError("snapshot not found")  # qemu's words for this too
                found = [s for s in table.list() if s.name == arg]  # qemu: by name only
                if not found:
                    raise DiskImgError("snapshot not found")
                table.delete(found[0].id)
            except DiskImgError as e:
                raise DiskImgError(f"Could not delete snapshot '{arg}': {e}") from e
    return 0


# --- amend --------------------------------------------------------------------------


def cmd_amend(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img amend -o K=V,... FILE (qcow2)."""
    from diskimg.qcow2 import amend as am

    olist = _collect_o(a.options)
    if olist is None:
        raise UsageError("Must specify options (-o)")
    if opts.is_help(olist):
        fmt = a.format or (_probe_name(a.files[0]) if a.files else None)
        if fmt == "qcow2":
            sys.stdout.write(am.AMEND_HELP)
            return 0
        if fmt is None:
            raise UsageError("Expecting one image file name")
        raise DiskImgError(f"Format driver '{fmt}' does not support option amendment")
    if len(a.files) != 1:
        raise DiskImgError("Expecting one image file name")  # qemu: no --help hint here
    name = str(a.files[0])
    # the image stays open (and unlocked: key slots are re-wrapped with its master key)
    # until amend's header rewrites, which amend.amend starts by closing it
    with opened(ctx, name, "r+", a.format, image_opts=a.image_opts) as dev:
        fmt = dev.format
        if fmt != "qcow2":
            raise DiskImgError(f"Format driver '{fmt}' does not support option amendment")
        path, _fmt, iopts = path_and_format(a, name, "amend", ("encrypt.key-secret",))
        values = am.validate_amend_options(opts.parse_list(olist))
        am.amend(path, values, fmt="qcow2", force=a.force, secrets=ctx.secrets,
                 untrusted=ctx.untrusted, image_options=iopts, device=dev)
    return 0
