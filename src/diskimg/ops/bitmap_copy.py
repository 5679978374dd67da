"""``convert --bitmaps`` (and ``--skip-broken-bitmaps``): the persistent bitmaps of a
single qcow2 source copied into a qcow2 v3 target after its data, as qemu-img 7.2 copies
them (same names, granularities and enabled/disabled state, the same dirty bits).

Every refusal is made before the target is created or written."""

from __future__ import annotations

from diskimg import progname
from diskimg.device import BlockDevice
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.options import compat_version

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

#: the directory entry's "auto" (enabled) flag (docs/interop/qcow2.txt)
_AUTO = 1 << 1
_IN_USE = 1 << 0


def check_copy(srcs: Sequence[BlockDevice], out_format: str,
               options: Mapping[str, Any] | None, target: BlockDevice | None,
               skip_broken: bool) -> list[str]:
    """Refuse a bitmap copy qemu-img refuses (qemu's order and words); the names of the
    inconsistent source bitmaps to skip (``skip_broken``)."""
    if len(srcs) != 1:
        raise UsageError("Copying bitmaps only possible with single source")
    src = srcs[0]
    if src.format != "qcow2":
        raise UnsupportedFeatureError("Source lacks bitmap support")
    skip = []
    for b in reversed(src.bitmaps.list()):  # qemu's order: last loaded first
        if b.flags & _IN_USE:
            if not skip_broken:
                raise UsageError(f"Cannot copy inconsistent bitmap '{b.name}'\nTry "
                                 "--skip-broken-bitmaps, or use "
                                 f"'{progname.name()} bitmap --remove' to delete it")
            skip.append(b.name)
    fmt = target.format if target is not None else out_format
    if target is not None:
        from diskimg.qcow2.image import Qcow2Image  # bitmaps are qcow2 v3's alone

        v3 = isinstance(target, Qcow2Image) and target.header.version >= 3
    else:
        v3 = (compat_version((options or {}).get("compat", "1.1")) or 3) >= 3
    if fmt != "qcow2" or not v3:
        raise UnsupportedFeatureError(f"Format driver '{fmt}' does not support bitmaps")
    return skip


def copy_bitmaps(src: BlockDevice, tgt: BlockDevice, skip: Sequence[str],
                 warn: Callable[[str], None] | None = None) -> None:
    """Add each bitmap of ``src`` (but ``skip``) to ``tgt`` and merge its bits in."""
    if warn is not None:
        for name in skip:
            warn(f"Skipping inconsistent bitmap '{name}'")
    for b in src.bitmaps.list():
        if b.name in skip:
            continue
        tgt.bitmaps.add(b.name, 1 << b.granularity_bits, disabled=not b.flags & _AUTO)
        tgt.bitmaps.merge(b.name, b.name, src)
