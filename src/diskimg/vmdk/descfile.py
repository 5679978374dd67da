"""Opening the extents a separate descriptor file names (monolithicFlat, vmfs,
twoGbMaxExtentSparse/Flat, vmfsSparse, seSparse): the descriptor is checked, each extent
file is resolved through the :class:`~diskimg.policy.OpenPolicy` (confined to the
descriptor's directory by default), opened with the descriptor's lock, and read as the
extent its line names.  Imported when an image is not a monolithic sparse file: opening
monolithicSparse and streamOptimized images does not load it (start-up, issue 20)."""

from __future__ import annotations

import os

from diskimg.errors import BackingChainError, FormatError, UnsupportedFeatureError
from diskimg.hostio import open_host_file
from diskimg.policy import within
from diskimg.vmdk import sparse as S
from diskimg.vmdk.descriptor import MAX_DESCRIPTOR_FILE, Descriptor, file_name
from diskimg.vmdk.flat import FlatExtent, ZeroExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from diskimg.vmdk.image import VmdkImage

#: createType values qemu 7.2 accepts in a separate descriptor file
DESC_FILE_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
                   "twoGbMaxExtentFlat")


def guard_type(typ: str) -> None:
    """Refuse extent types qemu 7.2 refuses (raw device mappings) or does not know."""
    if typ in ("VMFSRDM", "VMFSRAW"):
        raise UnsupportedFeatureError(f"Unsupported vmdk extent type '{typ}'")
    if typ not in ("SPARSE", "FLAT", "VMFS", "ZERO", "VMFSSPARSE", "SESPARSE"):
        raise FormatError(f"Unknown vmdk extent type '{typ}'")


def extent_name(desc_path: Path | str, name: str) -> str:
    """The extent's file name as qemu prints it (joined to the descriptor's directory as
    the user spelled it)."""
    parent = os.path.dirname(str(desc_path))
    return os.path.join(parent, name) if parent and not name.startswith("/") else name


def open_descriptor_file(img: VmdkImage, fsize: int) -> None:
    """Read ``img.host`` (``fsize`` bytes) as a descriptor file: set ``img.desc`` and
    append each extent to ``img.extents``, each host file it opens to ``img._own_hosts``
    as soon as it is open (the image closes them if a later extent fails)."""
    if fsize > MAX_DESCRIPTOR_FILE:
        raise FormatError(f"Descriptor file '{img.filename}' is {fsize} bytes; the "
                          f"limit is {MAX_DESCRIPTOR_FILE}")
    img.desc = d = Descriptor.parse(img.host.pread(0, fsize))
    ct = d.create_type
    if ct is None:
        raise FormatError("invalid VMDK image descriptor (no createType)")
    if ct not in DESC_FILE_TYPES:
        shown = "".join(c if c.isprintable() else "?" for c in ct[:64])
        raise UnsupportedFeatureError(f"Unsupported image type '{shown}'")
    if not d.extents:
        raise FormatError(f"VMDK descriptor '{img.filename}' has no extents")
    if not img.host.local and any(
            x.type != "ZERO" and x.access != "NOACCESS" for x in d.extents):
        raise UnsupportedFeatureError(
            f"VMDK descriptor '{img.filename}' names separate extent files: an image "
            "read from a file object or URL must be a single file (monolithicSparse or "
            "streamOptimized); open the descriptor from a local path instead")
    for i, x in enumerate(d.extents, 1):
        guard_type(x.type)
        if x.type == "ZERO" or x.access == "NOACCESS":
            gone = x.filename if x.access == "NOACCESS" else None
            img.extents.append(ZeroExtent(x.sectors * S.SECTOR, x.type,
                                           None if gone is None else file_name(gone)))
            continue
        assert x.filename is not None
        name = file_name(x.filename)
        if not name or "\0" in name:
            raise FormatError(f"Extent {i} has an invalid file name")
        path = _resolve_extent(img, name)
        ro = img.read_only or x.access != "RW"
        if _same_file(path, img.host.name):  # before its lock would refuse it as busy
            raise FormatError(f"Extent {i} '{name}' is the descriptor file itself")
        # QEMU's lock on every extent when the descriptor has it (qemu locks them all)
        eh = open_host_file(path, not ro, lock_mode=img.host.locked)
        img._own_hosts.append(eh)
        shown = extent_name(img.host.name, name)
        if x.type in ("FLAT", "VMFS"):       # a VMFS line has no offset: 0
            img.extents.append(FlatExtent(eh, (x.offset or 0) * S.SECTOR,
                                           x.sectors * S.SECTOR,
                                           shown, x.type, ro))
        elif x.type == "SESPARSE":
            if not ro:
                raise UnsupportedFeatureError("No write support for seSparse images "
                                              "available")
            from diskimg.vmdk.sesparse import SeSparseExtent, SeSparseHeader  # on use

            sh = SeSparseHeader.parse(eh.pread(0, S.SECTOR))
            se = SeSparseExtent(eh, sh, shown, x.type)
            if se.size < x.sectors * S.SECTOR:
                raise FormatError(f"Extent {i} '{name}' is smaller than the descriptor "
                                  "says")
            se.size = x.sectors * S.SECTOR
            img.extents.append(se)
        else:
            ext = img._open_sparse(eh, shown, x.type, ro)
            if ext.size < x.sectors * S.SECTOR:
                raise FormatError(f"Extent {i} '{name}': the descriptor says "
                                  f"{x.sectors} sectors but the sparse header has "
                                  f"{ext.size // S.SECTOR}")
            ext.size = x.sectors * S.SECTOR
            img.extents.append(ext)


def _resolve_extent(img: VmdkImage, name: str) -> str:
    """The path of extent file ``name`` (the policy's resolution), refused outside the
    descriptor's directory unless the policy allows it.  (Names, not pathlib: start-up.)"""
    top = img.host.name
    assert img.host.local  # _open refuses extents of an image that is not local
    path = img.policy.resolve_name(name, top, "vmdk extent", local=True)
    if not img.policy.allow_extents_outside:
        base = os.path.dirname(os.path.realpath(top))
        real = os.path.realpath(path)
        ok = [base, *map(os.fspath, img.policy.allowed_dirs)]
        if not any(within(real, b) for b in ok):
            raise BackingChainError(
                f"Refusing to open vmdk extent '{name}' named by '{img.filename}': it "
                "lies outside the descriptor's directory")
    return path


def _same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one file (False when either cannot be looked at: the open
    that follows reports that)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
