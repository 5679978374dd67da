"""Inputs shared by the tests/unit/test_crypto_luks_*.py modules (no tests here)."""

from __future__ import annotations

import functools
import struct

from diskimg.crypto.luks.create import build_luks

PASS = b"correct horse"
MK64 = bytes(range(1, 65))  # halves differ: XTS accepts it


@functools.cache
def luks_area() -> bytes:
    """A default (aes-256-xts-plain64, sha256) area for :data:`PASS` with key :data:`MK64`,
    built with QEMU's floor of 1000 iterations so it costs milliseconds."""
    area, _cipher, _hdr = build_luks(PASS, {}, 0, master_key=MK64)
    return area


def patch(area: bytes, off: int, data: bytes) -> bytes:
    """``area`` with ``data`` written at ``off``."""
    b = bytearray(area)
    b[off:off + len(data)] = data
    return bytes(b)


def u32(v: int) -> bytes:
    """A big-endian u32 field."""
    return struct.pack(">I", v)
