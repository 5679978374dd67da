"""What the command modules share: the :class:`Context`, opening images the way
qemu-img's ``img_open`` does (``--image-opts``, key secrets), the options every command
takes, and small argument helpers.  Heavy modules (the copy engine, progress) are imported
by the commands that need them, never here."""

from __future__ import annotations

import os
import sys

from diskimg import api
from diskimg.cli import errors
from diskimg.cli.errors import CommandLineError, ExitCode
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError
from diskimg.slotted import Record
from diskimg.units import INT64_MAX, SIZE_HELP, parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from diskimg.cli.progress import QemuProgress, Schedule


def _suppress() -> str:
    """``argparse.SUPPRESS`` (help that --help leaves out), which argparse compares by
    identity: argparse's own object when argparse is loaded (it is whenever ``p`` is an
    argparse parser); for the quick reader (cli/quickparse.py), which ignores help, a
    string of the same value, so that reading a plain command line loads no argparse."""
    argparse = sys.modules.get("argparse")
    if argparse is None:
        return "==SUPPRESS=="
    suppress: str = argparse.SUPPRESS
    return suppress


def add_common(p: argparse.ArgumentParser, *, fmt: bool = True, share: bool = True,
               obj: bool = True, image_opts: bool = True, quiet: bool = True,
               out: bool = False, fmt_help: str = "image format (probed if absent)",
               src_cache: int = 0) -> None:
    """The options most commands take (each one can be left out), and FILE arguments.
    ``src_cache``: the command takes qemu-img's ``-T SRC_CACHE`` (check, compare, convert,
    rebase), and exits with this code for a cache mode qemu does not know (compare: 2);
    0: the command refuses ``-T``, as qemu-img does (``-T``/``--trace`` before the
    command is the trace option, :mod:`diskimg.cli.trace`)."""
    if fmt:
        p.add_argument("-f", "--format", metavar="FMT", help=fmt_help)
    if share:
        p.add_argument("-U", "--force-share", action="store_true",
                       help="open without taking QEMU's image locks")
    if obj:
        p.add_argument("--object", action="append", default=[], metavar="OBJ",
                       help="secret,id=ID,data=S|file=PATH")
    if image_opts:
        p.add_argument("--image-opts", action="store_true",
                       help="FILE is an option string (driver=...,file.filename=...)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="quiet mode")
    if out:
        p.add_argument("--output", metavar="human|json", help="output format")
    if src_cache:  # the host page cache is not diskimg's to choose: checked, then unused
        p.add_argument("-T", dest="src_cache", type=lambda t: cache_mode(t, src_cache),
                       help=_suppress())
    p.add_argument("files", nargs="*", help=_suppress())


#: the cache modes qemu-img's ``-T`` and ``-t`` accept
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")


def cache_mode(text: str, code: int = 1, what: str = "source cache") -> str:
    """A ``-T`` cache mode (``-t``: ``what="cache"``), or qemu-img's error with exit
    ``code``."""
    if text not in CACHE_MODES:
        # ExitCode (not a ValueError, which argparse would reword): qemu-img's one line
        raise ExitCode(f"Invalid {what} option: {text}", code)
    return text


def target_cache(a: argparse.Namespace) -> None:
    """Check ``-t`` (the cache mode of the image written) as qemu-img does; the host page
    cache is not diskimg's to choose, so a valid mode is then unused."""
    if a.cache is not None:
        cache_mode(a.cache, what="cache")


KNOWN_FORMATS = ("qcow2", "raw", "vmdk", "luks")
PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


class Context(Record):
    """Global state shared by commands: secrets, --untrusted, output streams."""

    __slots__ = ("prog", "untrusted", "secrets")
    prog: str
    untrusted: bool
    secrets: dict[str, bytes]

    def __init__(self, prog: str = "diskimg", untrusted: bool = False,
                 secrets: dict[str, bytes] | None = None) -> None:
        self.prog = prog
        self.untrusted = untrusted
        self.secrets = {} if secrets is None else secrets

    def warn(self, msg: str) -> None:
        sys.stderr.write(f"{self.prog}: {msg}\n")


# --- helpers ------------------------------------------------------------------------


def size_arg(text: str, what: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """Parse a size option as qemu-img's ``cvtnum_full`` does: k/M/G... suffixes, from
    ``minimum`` to ``maximum``; qemu's "Invalid <what> specified. You may use ..." and
    "Invalid <what> specified. Must be between <minimum> and <maximum>." messages."""
    try:
        value = parse_size(text)
    except UsageError as e:
        if e.field == "size":  # not a size at all (rather than one out of range)
            raise UsageError(SIZE_HELP.replace("Invalid image size", f"Invalid {what}"),
                             field=e.field) from None
        value = INT64_MAX + 1  # past what qemu's int64 holds
    if not minimum <= value <= maximum:
        raise UsageError(f"Invalid {what} specified. Must be between {minimum} and "
                         f"{maximum}.")
    return value


def parse_image_opts(text: str) -> tuple[str, str | None, dict[str, str]]:
    """``driver=qcow2,file.filename=X,encrypt.key-secret=s`` → (path, format, options).
    The ``file.`` options are checked here (the file protocol's); the format's options are
    checked when the image opens (:mod:`diskimg.image_options`)."""
    from diskimg import options as opts
    from diskimg.image_options import check_protocol, json_options

    if text.startswith("json:"):  # a json:{...} name: the same options as a JSON object
        try:
            d = json_options(text)
        except UsageError as e:
            raise DiskImgError(f"Could not open '{text}': {e}") from None
    elif "=" not in opts.split_list(text)[0]:
        raise DiskImgError(f"Could not open '{text}': Cannot find device='{text}' nor "
                           f"node-name='{text}'")
    else:
        d = dict(opts.parse_list(text))
    if "file" in d:  # a node name, which qemu-img never has
        raise DiskImgError(f"Could not open '{text}': Cannot find device='{d['file']}' nor "
                           f"node-name='{d['file']}'")
    fmt = d.pop("driver", None)
    path = d.pop("file.filename", None) or d.pop("filename", None)
    if path is None:
        raise DiskImgError(f"Could not open '{text}': A block device must be specified for "
                           '"file"')
    if fmt is not None and fmt not in KNOWN_FORMATS and fmt != "file":  # file: the bytes
        raise DiskImgError(f"Could not open '{text}': Unknown driver '{fmt}'")
    try:
        check_protocol({k[5:]: v for k, v in d.items() if k.startswith("file.")})
    except UsageError as e:
        raise DiskImgError(f"Could not open '{text}': {e}", field=e.field) from None
    return path, fmt, {k: v for k, v in d.items() if not k.startswith("file.")}


def strip_file_protocol(name: str) -> str:
    """An image name without qemu's ``file:`` protocol prefix (``file:x.qcow2`` is
    ``x.qcow2``; ``file:a:b`` is ``./a:b``, which no protocol prefix can be read into,
    as qemu names it)."""
    if not name.startswith("file:"):
        return name
    name = name[5:]
    head = name.split("/", 1)[0]
    return "./" + name if ":" in head else name


def open_image(ctx: Context, name: str, mode: str = "r", fmt: str | None = None, *,
               image_opts: bool = False, force_share: bool = False,
               backing: bool = True, need_key: bool = True,
               for_check: bool = False, metadata_only: bool = False) -> BlockDevice:
    """Open like qemu-img's ``img_open``: errors read ``Could not open 'NAME': reason``.

    ``need_key``: an encrypted image needs ``encrypt.key-secret`` (every command but info).
    ``metadata_only``: qemu-img info's open (``BDRV_O_NO_IO``): a key secret named in the
    image options need not exist, nor be right.
    """
    options: dict[str, str] = {}
    label = name
    path = name
    if image_opts:
        if fmt is not None:
            raise UsageError("--image-opts and --format are mutually exclusive")
        path, fmt, options = parse_image_opts(name)
    elif name.startswith("json:"):
        path, jfmt, options = parse_image_opts(name)
        fmt = jfmt or fmt
    else:
        path = strip_file_protocol(name)
    if fmt is not None and fmt not in KNOWN_FORMATS and not (image_opts and fmt == "file"):
        raise DiskImgError(f"Could not open '{label}': Unknown driver '{fmt}'")
    try:
        dev = api.open(path, mode, fmt, backing=backing, force_share=force_share,
                       untrusted=ctx.untrusted, secrets=ctx.secrets, options=options,
                       for_check=for_check, metadata_only=metadata_only)
    except (DiskImgError, OSError) as e:
        raise errors.open_failure(label, e, fmt) from e
    key_option = "key-secret" if dev.format == "luks" else "encrypt.key-secret"
    if need_key and dev.encrypted and key_option not in options:
        dev.close()
        raise DiskImgError(f"Could not open '{label}': Parameter '{key_option}' is "
                           "required for cipher")
    if mode == "r+" and dev.probed:
        sys.stderr.write(PROBED_RAW_WARNING.format(path))
    return dev


def one_file(args: argparse.Namespace) -> str:
    if len(args.files) != 1:
        raise CommandLineError("Expecting one image file name")
    return str(args.files[0])


def output_format(text: str | None) -> str:
    if text in (None, "human"):
        return "human"
    if text == "json":
        return "json"
    raise ExitCode("--output must be used with human or json as argument.", 1)




def option_list(text: str) -> str:
    """The type of ``-o``: qemu-img refuses a malformed list as soon as it reads it
    (``Invalid option list: TEXT``, no "Try --help"), before any other check."""
    from diskimg import options as opts  # -o parsing: not for a command without -o

    if not opts.valid_list(text):
        raise ExitCode(f"Invalid option list: {text}", 1)  # not a ValueError: argparse's
    return text


def collect_o(values: list[str] | None) -> str | None:
    if not values:
        return None
    return ",".join(values)


def print_help(fmt: str, filename: str | None) -> int:
    from diskimg import options as opts

    opts.creatable(fmt)
    sys.stdout.write(opts.help_text(fmt, with_protocol=filename is not None))
    return 0


def probe_name(path: str) -> str:
    from diskimg.probe import probe_bytes

    try:
        with open(path, "rb") as f:
            return probe_bytes(f.read(2048))
    except OSError:
        return "raw"


def resolve_backing(backing: str, image: str) -> str:
    backing = strip_file_protocol(backing)
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image), backing)


def snapshot_param(text: str | None) -> tuple[str | None, str | None] | None:
    """``-l``: a snapshot name or id, or ``snapshot.id=ID,snapshot.name=NAME``; an unknown
    key is qemu-img's two lines (``Invalid parameter 'K'`` and ``Failed in parsing snapshot
    param 'TEXT'``)."""
    if text is None:
        return None
    if text.startswith("snapshot."):
        from diskimg import options as opts

        d = dict(opts.parse_items(text))
        unknown = [k for k in d if k not in ("snapshot.id", "snapshot.name")]
        if unknown:
            raise errors.with_notes(UsageError(f"Invalid parameter '{unknown[0]}'"),
                                    f"Failed in parsing snapshot param '{text}'")
        return d.get("snapshot.id"), d.get("snapshot.name")
    return text, text


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a, strict=True) == os.path.realpath(b, strict=True)
    except OSError:
        return False


def basic_schedule(printer: QemuProgress) -> Schedule:
    """Only qemu-img's last (100) progress call (the command printed the first, 0)."""
    from diskimg.cli.progress import Schedule

    sched = Schedule(printer, 0)
    sched.add(0, 100.0, 0)
    return sched



def path_and_format(a: argparse.Namespace,
                    name: str) -> tuple[str, str | None, dict[str, str]]:
    """The file name, format and image options of FILE for commands that reopen it by
    path (commit, rebase, amend): with ``--image-opts`` parsed by :func:`parse_image_opts`
    (the command's first open has checked the options)."""
    if not a.image_opts and not name.startswith("json:"):
        return name, a.format, {}
    path, fmt, options = parse_image_opts(name)
    return path, fmt or a.format, options


def check_backing_keys(name: str, dev: BlockDevice) -> None:
    """qemu-img's open error for an encrypted backing file given no key secret (diskimg's
    open itself only fails on the first data access)."""
    for d in dev.chain()[1:]:
        if d.format == "qcow2" and "encrypt.key-secret" not in d.options:
            try:
                encrypted = d.info().encrypted
            except DiskImgError:
                encrypted = False
            if encrypted:
                raise DiskImgError(f"Could not open '{name}': Could not open backing file: "
                                   "Parameter 'encrypt.key-secret' is required for cipher")

