"""The metadata contexts an export offers, and their block-status extents.

- ``base:allocation``: from :meth:`BlockDevice.block_status` through the backing chain:
  ``NBD_STATE_HOLE`` where the status has no data, ``NBD_STATE_ZERO`` where it reads as
  zeros (the flags qemu-nbd derives from the same block status);
- ``qemu:allocation-depth`` (``-A``): 0 where no layer of the chain allocates the range, 1
  where the image itself does, 2 for its backing file, and so on;
- ``qemu:dirty-bitmap:NAME`` (``-B NAME``): ``NBD_STATE_DIRTY`` where the persistent
  bitmap is dirty (:meth:`BlockDevice.dirty_extents`).

Queries follow qemu-nbd: an empty query list selects every context (LIST only);
``base:`` and ``qemu:`` and ``qemu:dirty-bitmap:`` select their namespace's contexts for
NBD_OPT_LIST_META_CONTEXT only; a full name selects that context.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from ..device import BlockDevice
from .protocol import (BASE_ALLOCATION, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO,
                       QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP_PREFIX)

#: most descriptors in one BLOCK_STATUS chunk (the spec lets a server send fewer than the
#: range needs); bounds the reply at 512 KiB
MAX_EXTENTS = 65536

Extents = list[tuple[int, int]]


class MetaContexts:
    """The contexts of one export, by id (the index in :attr:`names`)."""

    def __init__(self, dev: BlockDevice, *, allocation_depth: bool = False,
                 bitmaps: Sequence[str] = (),
                 dirty_list: Callable[[str], list[tuple[int, int]]] | None = None) -> None:
        self.dev = dev
        self.names = [BASE_ALLOCATION]
        if allocation_depth:
            self.names.append(QEMU_ALLOCATION_DEPTH)
        self.names += [QEMU_DIRTY_BITMAP_PREFIX + b for b in bitmaps]
        self._dirty_list = dirty_list or (lambda name: list(dev.dirty_extents(name)))

    def select(self, queries: Sequence[str], listing: bool) -> list[int]:
        """The ids a SET (``listing`` False) or LIST query list selects, in id order."""
        if not queries:
            return list(range(len(self.names))) if listing else []
        chosen: set[int] = set()
        for q in queries:
            for i, name in enumerate(self.names):
                if q == name:
                    chosen.add(i)
                elif listing and q in ("base:", "qemu:", QEMU_DIRTY_BITMAP_PREFIX) \
                        and name.startswith(q):
                    chosen.add(i)
        return sorted(chosen)

    def extents(self, context_id: int, offset: int, length: int, one: bool) -> Extents:
        """(length, flags) descriptors from ``offset``, covering at most ``length`` bytes
        (one descriptor when ``one``); the caller holds the device lock."""
        name = self.names[context_id]
        limit = 1 if one else MAX_EXTENTS
        if name.startswith(QEMU_DIRTY_BITMAP_PREFIX):
            return self._dirty(name[len(QEMU_DIRTY_BITMAP_PREFIX):], offset, length, limit)
        depth_ctx = name == QEMU_ALLOCATION_DEPTH
        out: Extents = []
        pos, end = offset, offset + length
        while pos < end:
            st, depth = self.dev.block_status(pos, end - pos, coarse=True)
            if depth_ctx:
                flags = depth + 1 if st.allocated else 0
            else:
                flags = (0 if st.data else NBD_STATE_HOLE) | (NBD_STATE_ZERO if st.zero else 0)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + st.length, flags)
            elif len(out) == limit:
                break
            else:
                out.append((st.length, flags))
            pos += st.length
        return _clip32(out)

    def _dirty(self, bitmap: str, offset: int, length: int, limit: int) -> Extents:
        dirty = self._dirty_list(bitmap)
        starts = [d[0] for d in dirty]
        out: Extents = []
        pos, end = offset, offset + length
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        while pos < end and len(out) < limit:
            while i < len(dirty) and dirty[i][0] + dirty[i][1] <= pos:
                i += 1
            if i < len(dirty) and dirty[i][0] <= pos:
                n, flags = min(end, dirty[i][0] + dirty[i][1]) - pos, NBD_STATE_DIRTY
            else:
                nxt = dirty[i][0] if i < len(dirty) else end
                n, flags = min(end, nxt) - pos, 0
            out.append((n, flags))
            pos += n
        return _clip32(out)


def _clip32(extents: Extents) -> Extents:
    """Descriptor lengths are 32 bits: a longer run is cut at the largest 512-aligned
    length that fits (the rest is left for the client's next request)."""
    cap = 0xFFFFFE00
    out: Extents = []
    for n, f in extents:
        if n > cap:
            out.append((cap, f))
            break
        out.append((n, f))
    return out
