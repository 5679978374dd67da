"""qcow2 glue: the *full disk encryption header* extension (0x0537be77) that points at the
LUKS area, ``(offset u64, length u64)`` big-endian.

The area holds the LUKS header and key material in ordinary qcow2 clusters; its length is
``payload-offset * 512`` (2068480 bytes for the default aes-256-xts) and QEMU refuses to
read key material outside it.  Imports no ``cryptography``.
"""

from __future__ import annotations

import struct

from diskimg.crypto.luks.header import LUKS_HEADER_SIZE
from diskimg.errors import FormatError

#: Largest LUKS area (FDE extension length) accepted; qemu's biggest layout is ~2 MiB.
MAX_LUKS_AREA = 64 << 20

_FDE = struct.Struct(">QQ")


def parse_fde_extension(data: bytes | None, cluster_size: int,
                        file_size: int | None = None) -> tuple[int, int]:
    """Validate the qcow2 full-disk-encryption header extension (0x0537be77).

    ``data`` is the extension payload (None when absent); returns ``(offset, length)``:
    a non-zero cluster-aligned offset, a length in ``592..MAX_LUKS_AREA``, inside the file
    when ``file_size`` is given.
    """
    if data is None:
        raise FormatError("qcow2 image uses LUKS encryption (crypt_method 2) but has no "
                          "full disk encryption header extension (0x0537be77)")
    fields = fde_fields(data)
    if fields is None or len(data) != _FDE.size:
        raise FormatError(f"Invalid full disk encryption header extension: length "
                          f"{len(data)}, expected {_FDE.size}")
    off, length = fields
    if off == 0 or off % cluster_size:
        raise FormatError(f"Encryption header offset '{off}' is not a non-zero multiple of "
                          f"the cluster size '{cluster_size}' (FDE extension field 'offset')",
                          offset=off)
    if length < LUKS_HEADER_SIZE or length > MAX_LUKS_AREA:
        raise FormatError(f"Encryption header length {length} is out of range "
                          f"({LUKS_HEADER_SIZE}..{MAX_LUKS_AREA}) (FDE extension field "
                          "'length')", offset=off)
    if file_size is not None and off + length > file_size:
        raise FormatError(f"Encryption header at {off} (+{length} bytes) lies past the end "
                          f"of the file ({file_size} bytes)", offset=off)
    return off, length


def fde_fields(data: bytes) -> tuple[int, int] | None:
    """``(offset, length)`` as the extension payload states them, unvalidated (the checker
    counts whatever clusters they name), or None when the payload is too short."""
    if len(data) < _FDE.size:
        return None
    off, length = _FDE.unpack_from(data)
    return off, length


def pack_fde_extension(offset: int, length: int) -> bytes:
    """The extension payload for a LUKS area at ``offset`` of ``length`` bytes."""
    return _FDE.pack(offset, length)
