"""qemu-img snapshot: list, create, apply or delete internal snapshots."""

from __future__ import annotations

import argparse
import os
import sys

from diskimg.cli import errors, output
from diskimg.cli.commands._shared import (PROBED_RAW_WARNING, Context, add_common,
                                          one_file, open_image)
from diskimg.cli.errors import CommandLineError
from diskimg.errors import DiskImgError

USAGE = '[-l | -c NAME | -a NAME | -d NAME] [-U] [--object OBJ] [--image-opts] FILE'
DESCRIPTION = 'List, create, apply (revert to) or delete internal snapshots.'
EXAMPLE = 'diskimg snapshot -c before-upgrade disk.qcow2'


class _Tagged(argparse.Action):
    """Append ``(tag, value)`` to the destination list (snapshot's -c/-a/-d)."""

    def __init__(self, *args: object, tag: str = "", **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.tag = tag

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        cur = list(getattr(ns, self.dest, None) or [])
        cur.append((self.tag, values))
        setattr(ns, self.dest, cur)


def register(p: argparse.ArgumentParser) -> None:
    """This command's options."""
    add_common(p, fmt=False)
    p.set_defaults(actions=[])
    for flag, act in (("-l", "list"), ("-c", "create"), ("-a", "apply"),
                      ("-d", "delete")):
        if act == "list":
            p.add_argument(flag, dest="actions", action="append_const",
                           const=(act, None), help="list snapshots")
        else:
            p.add_argument(flag, dest="actions", action=_Tagged, tag=act,
                           metavar="NAME", help=f"{act} snapshot NAME")


def cmd_snapshot(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-img snapshot [-l | -c NAME | -a NAME | -d NAME] FILE."""
    actions = list(a.actions)
    if len(actions) > 1:
        raise CommandLineError("Cannot mix '-l', '-a', '-c', '-d'")
    name = one_file(a)
    action, arg = actions[0] if actions else (None, None)
    writable = action in ("create", "apply", "delete")
    if writable and a.force_share:
        raise DiskImgError(f"Could not open '{name}': force-share=on can only be used with "
                           "read-only images")
    with open_image(ctx, name, "r+" if writable else "r", None, image_opts=a.image_opts,
                force_share=a.force_share) as dev:
        table = dev.snapshots  # declared: None for a format without internal snapshots
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
                # qemu-img copies NAME into a 256-byte C buffer (QEMUSnapshotInfo.name):
                # the snapshot gets its first 255 bytes (a multi-byte character may be cut)
                table.create(os.fsdecode(os.fsencode(str(arg))[:255]))
            except DiskImgError as e:
                raise errors.action_failure(f"create snapshot '{arg}'", _qemu_words(e)) from e
        elif action == "apply":
            try:
                if table is None:
                    if dev.probed:
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
                raise errors.action_failure(f"apply snapshot '{arg}'", _qemu_words(e)) from e
        elif action == "delete":
            try:
                if table is None:
                    raise DiskImgError("snapshot not found")  # qemu's words for this too
                found = [s for s in table.list() if s.name == arg]  # qemu: by name only
                if not found:
                    raise DiskImgError("snapshot not found")
                table.delete(found[0].id)
            except DiskImgError as e:
                raise errors.action_failure(f"delete snapshot '{arg}'", e) from e
    return 0



def _qemu_words(e: DiskImgError) -> DiskImgError:
    """The reason qemu-img gives (its errno text) when the library names one."""
    return DiskImgError(e.reason) if e.reason else e


run = cmd_snapshot
