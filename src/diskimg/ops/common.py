"""What every copy operation shares: the chunk size, the source type and opening a
source (a path is opened read-only and closed by the caller; a device is borrowed)."""

from __future__ import annotations

import os

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
