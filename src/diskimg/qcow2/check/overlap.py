"""Metadata overlap protection (qemu's ``qcow2_check_metadata_overlap``, "cached" mode) and
corruption signalling (``qcow2_signal_corruption``) for the check's repair writes.

Functions of a pass's :class:`~diskimg.qcow2.check.state._State`, which calls them through
its methods of the same names: a check that writes nothing and finds nothing never loads
this module."""

from __future__ import annotations

from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import (
    L1E_OFFSET_MASK,
)
from diskimg.qcow2.layout import (
    QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_INCOMPAT_CORRUPT,
)
from diskimg.qcow2.refblock import (
    REFT_OFFSET_MASK,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.check.state import _State


def signal_corruption(st: _State, message: str, fatal: bool = True) -> None:
    """qemu's qcow2_signal_corruption: report once; when writable, set the corrupt bit
    and stop using the image."""
    if not st.fix:
        fatal = False
    if st.signaled and (not fatal or st.marked_corrupt):
        return
    if fatal:
        st.msg(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                 "will be suppressed")
        if st.h.version >= 3:
            header_io.set_incompat(st.host, header_io.read_incompat(st.host)
                                   | QCOW2_INCOMPAT_CORRUPT)
            st.host.flush()
        st.marked_corrupt = True
        st.dead = True
    else:
        st.msg(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                 "will be suppressed")
    st.signaled = True


def overlap(st: _State, ign: str, offset: int, size: int) -> str | None:
    """qemu's metadata overlap check ("cached" mode): the first kind of metadata the
    byte range would overwrite, or None.  ``ign`` names one kind to ignore."""
    if not size:
        return None
    cs = st.cs
    if ign != "qcow2_header" and offset < cs:
        return "qcow2_header"
    size = -(-((offset & (cs - 1)) + size) // cs) * cs
    offset &= ~(cs - 1)

    def hit(o: int, n: int) -> bool:
        return n > 0 and o < offset + size and offset < o + n

    h = st.h
    if ign != "active L1 table" and h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
        return "active L1 table"
    if ign != "refcount table" and hit(st.reftable_offset, len(st.reftable) * 8):
        return "refcount table"
    if hit(st.snapshots_offset, st.snapshots_size):
        return "snapshot table"
    if ign != "inactive L1 table":
        for sn in st.snapshots:
            if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                return "inactive L1 table"
    if ign != "active L2 table":
        for e in st.l1:
            if e & L1E_OFFSET_MASK and hit(e & L1E_OFFSET_MASK, cs):
                return "active L2 table"
    if ign != "refcount block":
        for e in st.reftable:
            if e & REFT_OFFSET_MASK and hit(e & REFT_OFFSET_MASK, cs):
                return "refcount block"
    bm = bitmap_dir(st)
    if bm and hit(*bm):
        return "bitmap directory"
    return None


def checked_write(st: _State, ign: str, offset: int, data: bytes) -> bool:
    """Write after the overlap check; False (corruption signalled) if it overlaps."""
    what = overlap(st, ign, offset, len(data))
    if what is not None:
        signal_corruption(st, f"Preventing invalid write on metadata (overlaps with "
                               f"{what})")
        return False
    st.write(offset, data)
    return True


def bitmap_dir(st: _State) -> tuple[int, int] | None:
    if st.h.ext(QCOW2_EXT_MAGIC_BITMAPS) is None:
        return None  # (the bitmap module loads only for an image with the extension)
    from diskimg.qcow2.bitmaps import BitmapsExt

    bx = BitmapsExt.of(st.h)
    if bx is None or not bx.nb_bitmaps:
        return None
    return bx.directory_offset, bx.directory_size
