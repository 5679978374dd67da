"""What every copy operation shares: the chunk size, the source type and opening a
source (a path is opened read-only and closed by the caller; a device is borrowed)."""

from __future__ import annotations

import os
import stat

from diskimg import api
from diskimg.device import BlockDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeAlias

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


def is_stream_path(dst: str | os.PathLike[str]) -> bool:
    """Whether the target named ``dst`` is written as a stream (see
    :func:`diskimg.ops.stream_convert.is_stream`): a URL other than an NBD one (a new
    object), or the path of a FIFO or a socket.  Here, not there, so that a convert to a
    file decides without importing the streaming code (start-up, issue 20)."""
    if isinstance(dst, str) and "://" in dst:  # (no URL module for a file name)
        from diskimg.hostio.urls import is_url

        if is_url(dst):
            from diskimg.nbd.url import is_nbd_url

            return not is_nbd_url(dst)  # an NBD export is written in place, as a device
    try:
        mode = os.stat(dst).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
