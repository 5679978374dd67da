"""One module per ``diskimg`` sub-command, each with its usage line (``USAGE``,
``DESCRIPTION``, ``EXAMPLE``), its options (``register(parser)``) and its handler
(``run(ctx, args)``, returning the exit code and raising errors for
:mod:`diskimg.cli.errors` to word).  ``_shared`` holds what several commands use.

A command module is imported only when that command runs (:func:`load`), so ``info`` does
not pay for the copy engine ``convert`` needs."""

from __future__ import annotations

import importlib
from types import ModuleType

from diskimg import api  # noqa: F401  (tests patch ``commands.api.open``)
from diskimg.cli.commands._shared import Context, parse_image_opts

#: the sub-commands in the order ``diskimg --help`` lists them
NAMES = ("info", "create", "convert", "check", "compare", "map", "dd", "resize", "measure",
         "commit", "rebase", "snapshot", "amend", "bitmap", "checksum", "bench", "nbd")


def load(name: str) -> ModuleType:
    """The module of sub-command ``name`` (one of :data:`NAMES`)."""
    return importlib.import_module(f"{__name__}.{name}")


__all__ = ["NAMES", "Context", "load", "parse_image_opts"]
