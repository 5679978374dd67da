"""The program name that messages embed: their ``NAME:`` prefix and the commands they
suggest (``You can use 'NAME rebase' instead``, ``run 'NAME check -r all'``).

It is ``diskimg`` for library callers; the command line sets the basename of its
``argv[0]``, as qemu-img does with its own, so that diskimg installed under another name
(``qemu-img``, for a script or test suite written for it) speaks under that name.

It also holds where the lines qemu-img prints while it works (not as an error) go: the
repair of a dirty lazy-refcounts image on a read-write open (``ERROR cluster ...``,
``Repairing cluster ...``).  A library caller gets none unless it sets a sink
(:func:`set_message_sink`); the command line writes them to stderr, as qemu-img does.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT = "diskimg"
_current = [DEFAULT]
_sink: list[Callable[[str], None] | None] = [None]


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


def set_message_sink(sink: Callable[[str], None] | None) -> None:
    """Send the lines qemu-img would print on stderr while it works (one line, without its
    newline, per call) to ``sink``; ``None`` (the default) drops them."""
    _sink[0] = sink


def message_sink() -> Callable[[str], None] | None:
    """The sink set now (to restore it after a temporary one)."""
    return _sink[0]


def message(line: str) -> None:
    """Pass ``line`` to the message sink, if one is set."""
    sink = _sink[0]
    if sink is not None:
        sink(line)
