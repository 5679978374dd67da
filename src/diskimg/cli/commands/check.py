"""qemu-img check: consistency check and repair, with qemu-img's exit codes."""

from __future__ import annotations

import sys

from diskimg.cli.commands._shared import (PROBED_RAW_WARNING, Context, add_common, one_file,
                                          open_image, output_format)
from diskimg.cli.errors import CommandLineError, ExitCode
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, ImageLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from diskimg.check_report import CheckReport

USAGE = '[-f FMT] [-r leaks|all] [--output=human|json] [-U] [--object OBJ] [--image-opts] FILE'
DESCRIPTION = 'Check an image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 63 n/a).'
EXAMPLE = 'diskimg check -r leaks disk.qcow2'


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, out=True, src_cache=1)
    p.add_argument("-r", "--repair", metavar="leaks|all", help="repair the image")


def run_check(dev: BlockDevice, repair: str | None) -> CheckReport:
    """The format's checker (``dev.check(repair)``); ExitCode 63 for formats without one,
    and for ``-r`` on a format whose check cannot repair (qemu's vmdk check)."""
    if not dev.supports_check or (repair is not None and not dev.supports_check_repair):
        raise ExitCode("This image format does not support checks", 63)
    return dev.check(repair)


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
        raise CommandLineError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
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
    repaired = res.repaired
    summary = res.summary_lines()
    head, tail = (summary[:6], summary[6:]) if repaired else ([], summary)
    if repaired:
        err.writelines(line + "\n" for line in res.repair_messages)
    if ofmt == "human" and not a.quiet:
        out.writelines(line + "\n" for line in head)
    out.flush()
    err.writelines(line + "\n" for line in res.messages)
    err.flush()
    d = dict(res.to_json())
    if "filename" in d:
        d["filename"] = name  # qemu-img prints the argument as given (./x, --image-opts)
    findings = d.pop("findings", None)
    if res.error is not None:
        pass  # the check could not finish: qemu-img prints only "Check failed: ..."
    elif ofmt == "json":
        from diskimg.cli import output  # (the JSON writer: only for --output=json)

        doc = output.qdict_order(d)
        if findings is not None:
            doc["findings"] = findings  # diskimg's addition; qemu-img's keys are unchanged
        out.write(output.to_json(doc))
    elif not a.quiet:
        if summary or not d:
            out.write("".join(line + "\n" for line in tail))
        else:
            from diskimg.cli import output

            out.write(output.check_human(d))
    out.flush()
    fail = res.failure_message
    if fail:
        ctx.warn(fail)
    return res.exit_code



run = cmd_check
