"""What libvirt's pool refresh learns about one directory entry: type, format, capacity,
allocation and (for images) the options vol-dumpxml prints.

Invariants: the format comes from the file's bytes (:func:`diskimg.probe.probe_bytes`),
never its name; FIFOs, sockets and devices are never opened; images are opened read-only,
without their backing chain and sharing QEMU's locks (``force_share``), so probing never
changes a byte nor waits for a running VM.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from diskimg import api
from diskimg.crypto.luks.header import LUKS_MAGIC
from diskimg.errors import DiskImgError
from diskimg.luks import LuksImage
from diskimg.probe import PROBE_SIZE, probe_bytes
from diskimg.vmdk.descriptor import MAX_DESCRIPTOR_FILE, Descriptor
from diskimg.vmdk.sparse import SECTOR, VMDK4_MAGIC, SparseHeader

#: libvirt's names for the foreign formats diskimg's probe recognises.
_LIBVIRT_FORMAT = {"vpc": "vpc", "vdi": "vdi", "bochs": "bochs", "cloop": "cloop",
                   "dmg": "dmg", "qcow": "qcow"}


@dataclass
class Probed:
    """One volume as probed: ``type`` is ``file`` or ``dir``; sizes in bytes (``physical``
    None for a directory); the rest is None when the format has no such field."""

    type: str
    format: str
    capacity: int
    allocation: int
    physical: int | None
    compat: str | None = None
    cluster_size: int | None = None
    features: list[str] | None = None
    encryption: str | None = None
    backing: str | None = None
    backing_format: str | None = None


def _iso_probe(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0x8001)
            return f.read(5) == b"CD001"
    except OSError:
        return False


def _vmdk_capacity(path: str, head: bytes) -> int | None:
    """Virtual size of a vmdk from its sparse header or its descriptor's extent lines, read
    with the vmdk codecs (fallback when diskimg's vmdk driver cannot open the image, e.g.
    an extent file is missing); None when neither parses."""
    try:
        if head[:4] == VMDK4_MAGIC:
            return SparseHeader.parse(head).capacity * SECTOR
        with open(path, "rb") as f:
            extents = Descriptor.parse(f.read(MAX_DESCRIPTOR_FILE + 1)).extents
    except (DiskImgError, OSError):
        return None
    return sum(e.sectors for e in extents) * SECTOR if extents else None


def _luks_volume(path: str, physical: int, allocation: int) -> Probed:
    """A file with a LUKS1 header: format raw, encryption luks, and (libvirt) the payload
    offset taken off the capacity when the header can be read."""
    p = Probed("file", "raw", physical, allocation, physical, encryption="luks")
    try:
        with api.open(path, "r", "luks", backing=False, force_share=True) as dev:
            assert isinstance(dev, LuksImage)
            p.capacity = physical - dev.payload
    except (DiskImgError, OSError):
        pass
    return p


def probe_volume(path: str) -> Probed | None:
    """What libvirt's refresh learns about one directory entry; None = not a volume."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # dangling symlink, vanished, unreadable directory entry
    if stat.S_ISDIR(st.st_mode):
        return Probed("dir", "dir", 0, 0, None)
    if not stat.S_ISREG(st.st_mode):
        return None  # FIFOs, sockets and devices are never opened
    physical = st.st_size
    allocation = st.st_blocks * 512
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_SIZE)
    except OSError:
        return None  # libvirt skips files it cannot open
    fmt = probe_bytes(head)
    if fmt == "luks":  # libvirt: a raw volume with LUKS encryption
        return _luks_volume(path, physical, allocation)
    if fmt not in ("qcow2", "vmdk", "raw"):
        return Probed("file", _LIBVIRT_FORMAT.get(fmt, "raw"), physical, allocation, physical)
    if fmt == "raw":
        p = Probed("file", "iso" if _iso_probe(path) else "raw", physical, allocation,
                   physical)
        if head[:6] == LUKS_MAGIC:
            p.encryption = "luks"
        return p
    p = Probed("file", fmt, physical, allocation, physical)
    try:
        with api.open(path, "r", fmt, backing=False, force_share=True) as dev:
            info = dev.info()
    except Exception:
        if fmt == "vmdk":
            cap = _vmdk_capacity(path, head)
            if cap is not None:
                p.capacity = cap
        return p
    p.capacity = info.virtual_size
    if fmt == "qcow2":
        p.cluster_size = info.cluster_size
        data = (info.format_specific or {}).get("data", {})
        if data.get("compat") == "1.1":
            p.compat = "1.1"
            p.features = ["lazy_refcounts"] if data.get("lazy-refcounts") else []
        enc = data.get("encrypt")
        if info.encrypted:
            p.encryption = "luks" if (enc or {}).get("format") == "luks" else "qcow"
    if info.backing_filename:
        full = info.full_backing_filename or info.backing_filename
        p.backing = os.path.normpath(os.path.join(os.path.dirname(path), full))
        p.backing_format = info.backing_filename_format
    return p


__all__ = ["Probed", "probe_volume"]
