"""``diskimg virsh ...`` / ``diskimg pool ...``: libvirt storage-pool commands.

They follow virsh's grammar, not qemu-img's, so :mod:`diskimg.pool.cli` parses and words
them itself; this entry only hands the arguments over (and loads the pool layer only
then)."""

from __future__ import annotations

from diskimg.cli.commands import POOL_ALIASES as ALIASES  # noqa: F401  (the words)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

HELP = ("Storage pools (libvirt dir pools, virsh's commands):",
        "  diskimg virsh pool-define-as NAME dir --target PATH",
        "  diskimg virsh vol-create-as NAME VOL 10G --format qcow2")


def run_argv(args: Sequence[str]) -> int:
    """Run ``diskimg virsh ARGS``; returns its exit code."""
    from diskimg.cli.progress import Progress
    from diskimg.pool.cli import main as pool_main

    return pool_main(list(args), progress_line=lambda out: Progress(True, out=out))
