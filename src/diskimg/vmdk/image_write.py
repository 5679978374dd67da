"""The write side of a :class:`~diskimg.vmdk.image.VmdkImage`: writes and write-zeroes
split at extent boundaries, and the new CID the first write gives the descriptor (as qemu
does, so that children notice).  Imported by the first write: opening and reading an
image do not load it (start-up, issue 20)."""

from __future__ import annotations

from diskimg.errors import UsageError
from diskimg.vmdk import sparse as S
from diskimg.vmdk.descriptor import EMBEDDED_DESC_MAX, new_cid
from diskimg.vmdk.sparse_extent import GrainMappedExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.vmdk.image import VmdkImage

#: qemu's MAX_BOUNCE_BUFFER: the most zero bytes one fallback write-zeroes request writes
_MAX_BOUNCE = 32768 * S.SECTOR


def _before_write(img: VmdkImage, offset: int, length: int) -> None:
    for _pos, _start, ext, _n in img._each(offset, length):
        if ext.read_only:
            raise UsageError(f"Cannot write to read-only extent '{ext.filename}'")
    if not img._cid_updated:
        img._cid_updated = True
        if not any(e.appendable for e in img.extents):
            _write_descriptor_cid(img, new_cid(img.cid))


def _write_descriptor_cid(img: VmdkImage, cid: int) -> None:
    img.desc.set("CID", f"{cid:x}")
    data = img.desc.pack()
    if img._embedded is not None:
        h = img._embedded
        room = min(h.desc_size * S.SECTOR, EMBEDDED_DESC_MAX)
        ends = [h.gd_offset, h.overhead] + ([h.rgd_offset] if h.flags & S.FLAG_RGD else [])
        inside = h.desc_offset * S.SECTOR + room <= min(e for e in ends if e) * S.SECTOR
        if h.desc_offset and len(data) <= room and inside:
            # pad to the whole area: a shorter CID must not leave old bytes behind
            img.host.pwrite(h.desc_offset * S.SECTOR, data.ljust(room, b"\0"))
    else:
        img.host.pwrite(0, data)
        img.host.truncate(len(data))


def write(img: VmdkImage, offset: int, data: memoryview) -> None:
    """:meth:`BlockDevice.write` of ``img``: each extent's part to that extent."""
    _before_write(img, offset, len(data))
    for pos, start, ext, n in img._each(offset, len(data)):
        ext.write(pos - start, data[pos - offset:pos - offset + n], img._fill_for(start))


def _zero_alignment(img: VmdkImage) -> int:
    """qemu's pwrite_zeroes_alignment for vmdk: the largest grain of a non-flat extent
    (at least one sector)."""
    grained = [e for e in img.extents if isinstance(e, GrainMappedExtent)]
    return max([S.SECTOR, *(e.gb for e in grained)])


def write_zeroes(img: VmdkImage, offset: int, length: int) -> None:
    """qemu 7.2's write-zeroes path (the block layer over vmdk_co_pwrite_zeroes), so the
    same requests leave the same grain tables and host offsets: the range is split at
    the zero alignment (an unaligned head, the aligned body, the tail); a piece whose
    grains can all be marked zeroed is marked, any other piece is written as explicit
    zero bytes (allocating grains like a write), at most 16 MiB per write."""
    _before_write(img, offset, length)
    align = _zero_alignment(img)
    head = offset % align
    tail = (offset + length) % align
    zeros: bytes | None = None
    while length > 0:
        num = length
        if head:
            num = min(length, _MAX_BOUNCE, align - head)
            head = (head + num) % align
        elif tail and num > align:
            num -= tail
        if all(ext.zeroable(pos - start, n)
               for pos, start, ext, n in img._each(offset, num)):
            for pos, start, ext, n in img._each(offset, num):
                ext.mark_zeroed(pos - start, n)
        else:
            num = min(num, _MAX_BOUNCE)
            if zeros is None or len(zeros) < num:
                zeros = bytes(num)
            data = memoryview(zeros)[:num]
            for pos, start, ext, n in img._each(offset, num):
                ext.write(pos - start, data[pos - offset:pos - offset + n],
                          img._fill_for(start))
        offset += num
        length -= num
