"""Legacy qcow2 AES encryption (``crypt_method=1``, ``encrypt.format=aes``).

Facts (verified against qemu-img/qemu-io 7.2):

* cipher: AES-128-CBC, each 512-byte sector encrypted on its own;
* key: the passphrase bytes, zero padded (or truncated) to 16 bytes — no KDF, no salt;
* IV: ``plain64`` of the **guest** sector number (guest offset / 512), *not* the host
  offset used for LUKS;
* a wrong passphrase cannot be detected: it just decrypts to garbage.

qemu-img 7.2 still creates these images (``qemu-img create -f qcow2 -o
encrypt.format=aes,encrypt.key-secret=sec0 --object secret,id=sec0,data=...``) and qemu-io
reads and writes them; only the system emulators refuse to run them.  The scheme is weak
(no key stretching, predictable IVs); keep it for reading old images and converting them.
"""

from __future__ import annotations

from diskimg.crypto import SECTOR_SIZE, KeyBuf, check_sector_buffer, wipe
from diskimg.crypto.ivgen import Plain64IV
from diskimg.crypto.kernels import cbc_decrypt_sectors, cbc_encrypt_sectors
from diskimg.errors import EncryptionError

AES_KEY_LEN = 16
_BATCH_SECTORS = 2048  # 1 MiB per batched call


def qcow_aes_key(passphrase: KeyBuf | str) -> bytearray:
    """The 16-byte AES key QEMU derives from a passphrase (zero padded / truncated), in a
    ``bytearray`` the caller may wipe."""
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    src = memoryview(passphrase).cast("B")[:AES_KEY_LEN]
    key = bytearray(AES_KEY_LEN)
    key[:len(src)] = src
    return key


class QcowAesCipher:
    """AES-128-CBC with plain64 IVs; the caller passes the **guest** sector number.

    The key lives in a ``bytearray`` owned by the cipher; :meth:`wipe` zeroes it."""

    def __init__(self, key: KeyBuf) -> None:
        if len(key) != AES_KEY_LEN:
            raise ValueError(f"qcow2 AES key must be {AES_KEY_LEN} bytes, got {len(key)}")
        self._key = bytearray(key)
        self._kv = memoryview(self._key)
        self._iv = Plain64IV(16)
        self._wiped = False

    def __repr__(self) -> str:
        return f"<QcowAesCipher aes-128-cbc-plain64 ({'wiped' if self._wiped else 'keyed'})>"

    @classmethod
    def from_passphrase(cls, passphrase: KeyBuf | str) -> QcowAesCipher:
        key = qcow_aes_key(passphrase)
        try:
            return cls(key)
        finally:
            wipe(key)

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` ran."""
        return self._wiped

    def wipe(self) -> None:
        """Zero the key in place; later use raises :class:`EncryptionError`.  Idempotent."""
        wipe(self._key)
        self._wiped = True

    def _run(self, sector: int, buf: bytearray | memoryview, encrypt: bool) -> None:
        if self._wiped:
            raise EncryptionError("The encryption key was wiped (image closed)")
        n = check_sector_buffer(sector, buf)
        mv = memoryview(buf).cast("B") if not isinstance(buf, bytearray) else memoryview(buf)
        kernel = cbc_encrypt_sectors if encrypt else cbc_decrypt_sectors
        for first in range(0, n, _BATCH_SECTORS):
            count = min(_BATCH_SECTORS, n - first)
            chunk = mv[first * SECTOR_SIZE:(first + count) * SECTOR_SIZE]
            chunk[:] = kernel(self._kv, self._iv.ivs(sector + first, count), chunk)

    def encrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, True)

    def decrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, False)


__all__ = ["AES_KEY_LEN", "QcowAesCipher", "qcow_aes_key"]
