"""The program name that messages embed: their ``NAME:`` prefix and the commands they
suggest (``You can use 'NAME rebase' instead``, ``run 'NAME check -r all'``).

It is ``diskimg`` for library callers; the command line sets the basename of its
``argv[0]``, as qemu-img does with its own, so that diskimg installed under another name
(``qemu-img``, for a script or test suite written for it) speaks under that name.
"""

from __future__ import annotations

DEFAULT = "diskimg"
_current = [DEFAULT]


def name() -> str:
    """The program name messages use now."""
    return _current[0]


def set_name(new: str) -> None:
    """Use ``new`` from now on (the command line: argv[0]'s basename)."""
    _current[0] = new or DEFAULT


def from_argv0(argv0: str) -> str:
    """The program name for a process started as ``argv0``: its basename, except that
    ``python -m diskimg`` (argv[0] is the package's ``__main__.py``) is ``diskimg``."""
    base = argv0.replace("\\", "/").rsplit("/", 1)[-1]
    if not base or base in ("__main__.py", "-c", "-m") or base.endswith(".py"):
        return DEFAULT
    return base
