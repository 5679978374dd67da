"""IV generators used by dm-crypt/LUKS and QEMU: sector number -> IV.

* ``plain``   — the low 32 bits of the sector number, little-endian, zero padded to the
  cipher block size (wraps at 2 TiB).
* ``plain64`` — the 64-bit sector number, little-endian, zero padded.
* ``essiv``   — "encrypted salt-sector IV": ``salt = H(master key)`` with the ivgen hash,
  and ``IV = E_salt(plain64(sector))`` with the volume's cipher algorithm in ECB mode and a
  key of the hash's digest size.  For AES this means md5 -> AES-128, sha256 -> AES-256;
  a digest that is not an AES key size (sha1, sha512, ...) is refused, like QEMU 7.2 does
  ("No AES cipher with key size 20 available").  The whole master key is hashed, also in
  XTS mode.

The sector numbering (guest vs host offset) is decided by the caller; see
:mod:`diskimg.crypto`.
"""

from __future__ import annotations

import hashlib
import sys
from array import array as _array
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import HASH_NAMES, IVGEN_NAMES
from diskimg.errors import UnsupportedFeatureError


def hash_digest(name: str, data: bytes | bytearray | memoryview) -> bytes:
    """``H(data)`` for a LUKS hash name; UnsupportedFeatureError if this Python lacks it."""
    try:
        return hashlib.new(HASH_NAMES[name], data).digest()
    except (KeyError, ValueError) as err:
        raise UnsupportedFeatureError(f"hash algorithm '{name}' is not available") from err


def counter_ivs(first: int, count: int, width: int, block_size: int) -> bytes:
    """IVs of ``count`` consecutive sectors from ``first``: each sector number modulo
    ``2 ** (8 * width)``, little-endian in ``width`` bytes, zero padded to ``block_size``.

    Built with one strided array copy instead of one ``int.to_bytes`` per sector (that
    was a fifth of an XTS read's time); the rare run that wraps past the top goes the
    per-sector way."""
    mask = (1 << (8 * width)) - 1
    start = first & mask
    code = {4: "I", 8: "Q"}.get(width)
    if (code is None or _array(code).itemsize != width or block_size % width
            or start + count - 1 > mask):
        pad = bytes(block_size - width)
        return b"".join(((first + i) & mask).to_bytes(width, "little") + pad
                        for i in range(count))
    out = _array(code, bytes(block_size * count))
    out[:: block_size // width] = _array(code, range(start, start + count))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


class IVGen(Protocol):
    """Maps a sector number to an IV of ``block_size`` bytes."""

    block_size: int

    def iv(self, sector: int) -> bytes: ...

    def ivs(self, sector: int, count: int) -> bytes:
        """The IVs of ``count`` consecutive sectors, concatenated."""
        ...

    def wipe(self) -> None:
        """Zero any key-derived state in place (the generator is unusable afterwards)."""
        ...


class PlainIV:
    """``plain``: 32-bit little-endian sector number, zero padded."""

    def __init__(self, block_size: int = 16) -> None:
        self.block_size = block_size
        self._pad = bytes(block_size - 4)

    def iv(self, sector: int) -> bytes:
        return (sector & 0xFFFFFFFF).to_bytes(4, "little") + self._pad

    def ivs(self, sector: int, count: int) -> bytes:
        return counter_ivs(sector, count, 4, self.block_size)

    def wipe(self) -> None:
        """Nothing key-derived to zero."""


class Plain64IV:
    """``plain64``: 64-bit little-endian sector number, zero padded."""

    def __init__(self, block_size: int = 16) -> None:
        self.block_size = block_size
        self._pad = bytes(block_size - 8)

    def iv(self, sector: int) -> bytes:
        return (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + self._pad

    def ivs(self, sector: int, count: int) -> bytes:
        return counter_ivs(sector, count, 8, self.block_size)

    def wipe(self) -> None:
        """Nothing key-derived to zero."""


class EssivIV:
    """``essiv:HASH`` for AES: ``AES-ECB(key=H(master_key))(plain64(sector))``.

    The salt is key material; it is kept in a ``bytearray`` that :meth:`wipe` zeroes (the
    digest ``hashlib`` returned is immutable and cannot be scrubbed)."""

    block_size = 16

    def __init__(self, master_key: bytes | bytearray | memoryview, hash_name: str) -> None:
        self._salt = bytearray(hash_digest(hash_name, master_key))
        if len(self._salt) not in (16, 24, 32):
            raise UnsupportedFeatureError(
                f"No AES cipher with key size {len(self._salt)} available (essiv hash "
                f"'{hash_name}')")
        self._ecb = Cipher(algorithms.AES(memoryview(self._salt)), modes.ECB())
        self.hash_name = hash_name

    def wipe(self) -> None:
        """Zero the salt in place (the generator then yields wrong IVs: do not use it)."""
        self._salt[:] = bytes(len(self._salt))

    def iv(self, sector: int) -> bytes:
        enc = self._ecb.encryptor()
        return enc.update((sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + bytes(8))

    def ivs(self, sector: int, count: int) -> bytes:
        """IVs for ``count`` consecutive sectors with one ECB call."""
        return self._ecb.encryptor().update(counter_ivs(sector, count, 8, 16))


def make_ivgen(name: str, *, master_key: bytes | bytearray | memoryview = b"",
               hash_name: str | None = None, block_size: int = 16) -> IVGen:
    """Build an IV generator by QEMU name (``plain``, ``plain64``, ``essiv``)."""
    if name == "plain":
        return PlainIV(block_size)
    if name == "plain64":
        return Plain64IV(block_size)
    if name == "essiv":
        if block_size != 16:
            raise UnsupportedFeatureError("essiv is only implemented for AES")
        return EssivIV(master_key, hash_name or "sha256")
    raise UnsupportedFeatureError(f"unknown IV generator '{name}'")


__all__ = ["HASH_NAMES", "IVGEN_NAMES", "EssivIV", "IVGen", "Plain64IV", "PlainIV",
           "counter_ivs", "hash_digest", "make_ivgen"]
