"""The qcow2 table codec and :class:`~diskimg.qcow2.entries.TableCache`, by their old
module: they live in :mod:`diskimg.qcow2.entries` with the entry codecs (one module for
every table reader: start-up, issue 20).  Any name is looked up there."""

from __future__ import annotations

from diskimg.qcow2 import entries as _entries


def __getattr__(name: str) -> object:
    try:
        return _entries.__dict__[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
