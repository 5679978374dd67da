"""Format detection: qcow2, vmdk, luks, then raw last (qemu's probe order for these
formats).

Foreign formats that qemu knows but diskimg does not implement are recognised by their
magic and refused, so a VHD is never silently converted as if it were raw bytes.
"""

from __future__ import annotations

from diskimg.errors import UnsupportedFeatureError, WrongFormatError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.hostio.host import Host

PROBE_SIZE = 2048
QCOW_MAGIC = b"QFI\xfb"
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"

_FOREIGN = [
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"<<< QEMU VM Virtual Disk Image >>>", "vdi"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    (0, b"#!/bin/sh\n#V2.0 Format\ninsmod cloop", "cloop"),
    (0, b"#!/bin/sh\n#V3.0 Format\nmodprobe cloop", "cloop"),
    (0, b"#!/bin/sh\n#V4.0 Format\nmodprobe cloop", "cloop"),
]
DMG_TRAILER_MAGIC = b"koly"


def probe_bytes(head: bytes) -> str:
    """Name the format of an image whose first bytes are ``head`` ("qcow2", "vmdk", "luks",
    "raw", or a foreign format name diskimg does not implement)."""
    if head[:4] == QCOW_MAGIC and len(head) >= 8:
        version = int.from_bytes(head[4:8], "big")  # (no struct module: start-up)
        return "qcow2" if version >= 2 else ("qcow" if version == 1 else "raw")
    if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return "vmdk"
    if head[:4] == b"LUKS" and _is_luks1(head):
        return "luks"  # qemu's luks probe: magic and LUKS1
    text = head[:PROBE_SIZE]
    if b"# Disk DescriptorFile" in text[:64] or (
        b"createType=" in text and b"# Extent description" in text
    ):
        return "vmdk"
    for off, magic, name in _FOREIGN:
        if head[off : off + len(magic)] == magic:
            return name
    return "raw"


def probe(host: Host) -> str:
    """Probe a host file; raises for formats diskimg does not implement."""
    head = host.pread(0, PROBE_SIZE)
    fmt = probe_bytes(head)
    size = host.size()
    if fmt == "raw" and size >= 512 and host.pread(size - 512, 4) == DMG_TRAILER_MAGIC:
        fmt = "dmg"  # Apple disk image: 'koly' trailer in the last 512 bytes
    if fmt not in ("qcow2", "vmdk", "luks", "raw"):
        raise UnsupportedFeatureError(
            f"Image format '{fmt}' of '{host.path}' is not supported by diskimg "
            "(qcow2, vmdk, luks and raw are); refusing to treat it as raw"
        )
    return fmt


def check_format(host: Host, fmt: str) -> None:
    """Raise :class:`WrongFormatError` if ``host`` is not in format ``fmt``."""
    got = probe_bytes(host.pread(0, PROBE_SIZE))
    if fmt == "qcow2" and got != "qcow2":
        raise WrongFormatError("Image is not in qcow2 format", offset=0)
    if fmt == "vmdk" and got != "vmdk":
        raise WrongFormatError("Not a VMDK image", offset=0, field="format")
    if fmt == "luks" and got != "luks":
        raise WrongFormatError("Volume is not in LUKS format", offset=0, field="magic")


def _is_luks1(head: bytes) -> bool:
    """A LUKS1 header (crypto/luks/header.py's magic and version; imported only for a
    file that starts with ``LUKS``, so probing other formats loads no crypto code)."""
    from diskimg.crypto.luks.header import LUKS_MAGIC, LUKS_VERSION

    return head[:6] == LUKS_MAGIC and head[6:8] == LUKS_VERSION.to_bytes(2, "big")
