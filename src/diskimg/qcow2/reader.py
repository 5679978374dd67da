"""Executing a qcow2 read plan (QEMU's qcow2_co_preadv_part): the runs of
:func:`diskimg.qcow2.mapper.lookup` covering the request, each dispatched on its
:class:`~diskimg.plan.RunKind`: DATA read from the (data) file, decrypted when the image
is encrypted; ZERO filled; UNALLOCATED read from the backing file (zeros past its end or
without one); COMPRESSED decoded, several clusters at once on the decompression pool."""

from __future__ import annotations

from diskimg.hostio import zero_fill
from diskimg.plan import RunKind
from diskimg.qcow2 import lazy_modules
from diskimg.qcow2.mapper import lookup

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.plan import Run
    from diskimg.qcow2 import compressed, crypt
    from diskimg.qcow2.image import Qcow2Image
else:  # compressed clusters and encryption: imported on first use (a plain image's
    # convert does without them: start-up, issue 20)
    lazy_modules(globals(), "diskimg.qcow2", compressed="compressed", crypt="crypt")

__all__ = ["plan", "read_backing", "readinto"]

_DATA, _ZERO, _UNALLOC, _COMPRESSED = (RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED,
                                       RunKind.COMPRESSED)


def plan(img: Qcow2Image, offset: int, length: int) -> list[Run]:
    """The runs covering [offset, offset + length) (merged as :func:`lookup` merges)."""
    runs = []
    pos, end = offset, offset + length
    while pos < end:
        r = lookup(img, pos, end - pos)
        runs.append(r)
        pos += r.length
    return runs


def readinto(img: Qcow2Image, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with the guest bytes at ``offset``: plan, then execute by kind."""
    crypt_method = img.header.crypt_method
    if crypt_method:
        crypt.cipher(img)  # data access needs the key, allocated or not
    runs = plan(img, offset, len(buf))
    todo = [r.entry for r in runs if r.kind is _COMPRESSED]
    if todo:  # (the decoded-cluster cache is made by the first compressed read only)
        cache = img._decoded
        todo = [e for e in todo if e not in cache]
    decoded = compressed.decode_many(img, list(dict.fromkeys(todo))) if len(todo) > 1 \
        else {}
    mask = img.cs - 1
    for r in runs:
        pos = r.offset - offset
        dst = buf[pos : pos + r.length]
        kind = r.kind
        if kind is _DATA:
            assert r.host is not None  # DATA always has a host cluster
            if crypt_method:
                crypt.read_encrypted(img, r.offset, r.host, dst)
            else:
                img.data_host.preadinto(r.host, dst)
        elif kind is _ZERO:
            zero_fill(dst)
        elif kind is _UNALLOC:
            read_backing(img, r.offset, dst)
        else:
            data = decoded.get(r.entry) or compressed.decode_cached(img, r.entry)
            c_off = r.offset & mask
            dst[:] = data[c_off : c_off + r.length]


def read_backing(img: Qcow2Image, offset: int, dst: memoryview) -> None:
    """The backing file's bytes at ``offset`` (zeros past its end, or without one)."""
    b = img.backing
    n = len(dst)
    if b is None or offset >= b.size:
        zero_fill(dst)
        return
    k = min(n, b.size - offset)
    b.readinto(offset, dst[:k])
    if k < n:
        zero_fill(dst[k:])
