"""The copy operations behind ``diskimg convert``, ``compare``, ``dd``, ``commit`` and
``rebase``, one job per module:

- this package itself: what every copy operation shares (chunk size, source type,
  opening a source, telling a URL or stream target from a file; :mod:`.common` re-exports
  it by its old names);
- :mod:`.zero`: zero detection and sparse runs of a buffer (``-S``);
- :mod:`.readahead`: block-status plans of the sources, background reads and decoding;
- :mod:`.copier`: the convert copy loop writing a plan to the target;
- :mod:`.copy_options`: the copy's ``-r`` rate limit and ``--salvage`` (loaded with them);
- :mod:`.convert`, :mod:`.compare`, :mod:`.dd`: the commands;
- :mod:`.chain`: ``commit`` and ``rebase`` over backing chains;
- :mod:`.checksum`: ovirt-imageio's blkhash checksum of the guest content;
- :mod:`.bench`: qemu-img bench's sequential I/O benchmark;
- :mod:`.commands`: ``info``, ``check``, ``map``, ``measure``, ``amend``, ``snapshot``,
  ``resize`` by path (the module-level functions of :mod:`diskimg`).

Loaded on first use (``diskimg.convert`` ...): the CLI's ``info``/``check``/``map`` never
load it.  Importing the package loads none of its modules: ``diskimg.convert`` loads
:mod:`.convert` and what it uses, not :mod:`.chain` or :mod:`.compare` (start-up, issue 20:
the shared names live here, not in a module of their own, which every command would load).
``diskimg.operations`` re-exports every name that lived there before."""

from __future__ import annotations

import os
import stat

from diskimg import api
from diskimg.device import BlockDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeAlias, TypeGuard

CHUNK = 2 << 20  # qemu-img convert's buffer: 4096 sectors
SECTOR = 512
_ZEROS = bytes(CHUNK)

Source = str | os.PathLike[str] | BlockDevice
#: (a string at run time: start-up, issue 20, loads no collections.abc for it)
ProgressFn: TypeAlias = "Callable[[float], None]"


def _open(src: Source, fmt: str | None, kw: Mapping[str, Any],
          mode: str = "r") -> tuple[BlockDevice, bool]:
    """``(device, owned)``: ``owned`` devices were opened here (in ``mode``) and must be
    closed."""
    if isinstance(src, BlockDevice):
        return src, False
    return api.open(src, mode, fmt, **kw), True


def is_url_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a URL string (:func:`diskimg.hostio.urls.is_url`), told for a
    file name without importing the URL module (start-up, issue 20): the one pre-test."""
    if not isinstance(name, str) or "://" not in name:
        return False
    from diskimg.hostio.urls import is_url

    return is_url(name)


def is_stream_path(dst: str | os.PathLike[str]) -> bool:
    """Whether the target named ``dst`` is written as a stream (see
    :func:`diskimg.ops.stream_convert.is_stream`): a URL other than an NBD one (a new
    object), or the path of a FIFO or a socket.  Here, not there, so that a convert to a
    file decides without importing the streaming code (start-up, issue 20)."""
    if is_url_name(dst):
        from diskimg.nbd.url import is_nbd_url

        return not is_nbd_url(dst)  # an NBD export is written in place, as a device
    try:
        mode = os.stat(dst).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
