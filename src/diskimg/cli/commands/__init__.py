"""One module per ``diskimg`` sub-command, each with its usage line (``USAGE``,
``DESCRIPTION``, ``EXAMPLE``), its options (``register(parser)``) and its handler
(``run(ctx, args)``, returning the exit code and raising errors for
:mod:`diskimg.cli.errors` to word).  ``_shared`` holds what several commands use.

A command module is imported only when that command runs (:func:`load`), so ``info`` does
not pay for the copy engine ``convert`` needs."""

from __future__ import annotations

import sys

from diskimg import api  # noqa: F401  (tests patch ``commands.api.open``)
from diskimg.cli.commands._shared import Context, parse_image_opts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

#: the sub-commands in the order ``diskimg --help`` lists them
NAMES = ("info", "create", "convert", "check", "compare", "map", "dd", "resize", "measure",
         "commit", "rebase", "snapshot", "amend", "bitmap", "checksum", "bench", "nbd")
#: the words that start a storage-pool command (:mod:`diskimg.cli.commands.pool`, loaded
#: only for one)
POOL_ALIASES = ("virsh", "pool")


def load(name: str) -> ModuleType:
    """The module of sub-command ``name`` (one of :data:`NAMES`); importlib's
    ``import_module`` without importing importlib (start-up, issue 20)."""
    full = f"{__name__}.{name}"
    __import__(full)
    return sys.modules[full]


__all__ = ["NAMES", "POOL_ALIASES", "Context", "load", "parse_image_opts"]
