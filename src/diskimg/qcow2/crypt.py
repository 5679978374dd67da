"""The sector cipher of an encrypted qcow2 image, read side (QEMU's qcow2-crypt seam):
unlocking the cipher with the image's secret, the IV sector rule, and decrypting the
sectors under a DATA run.  The write side (encrypting whole sectors) uses
:func:`crypt_sector` and :data:`CRYPT_PIECE` from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskimg.errors import MissingSecretError

if TYPE_CHECKING:
    from diskimg.crypto import SectorCipher
    from diskimg.qcow2.image import Qcow2Image

__all__ = ["CRYPT_PIECE", "cipher", "crypt_sector", "read_encrypted"]

#: bytes en/decrypted per cipher call through a bounce buffer (a multiple of 512): big
#: enough for the cipher to split a call over two threads, small enough for the bounce
#: buffers of a write (the kernels work in their own smaller pieces)
CRYPT_PIECE = 1 << 20


def cipher(img: Qcow2Image) -> SectorCipher | None:
    """The image's sector cipher, unlocked on first use with the secret named by the
    ``encrypt.key-secret`` option and kept in ``img._cipher``; None when not encrypted."""
    h = img.header
    if not h.crypt_method or img._cipher is not None:
        return img._cipher
    key_id = img.options.get("encrypt.key-secret")
    if key_id is None:
        raise MissingSecretError("Parameter 'encrypt.key-secret' is required for cipher")
    secret = img.secrets.get(key_id)
    if secret is None:
        raise MissingSecretError(f"No secret with id '{key_id}'")
    if h.crypt_method == 1:
        from diskimg.crypto.qcow_aes import QcowAesCipher

        img._cipher = QcowAesCipher.from_passphrase(secret)
    else:
        from diskimg.crypto.luks import open_luks

        assert img._luks_area is not None
        off, length = img._luks_area
        area = img.host.pread_exact(off, length, "LUKS header (FDE extension)")
        img._cipher, _ = open_luks(area, secret)
    return img._cipher


def crypt_sector(img: Qcow2Image, host: int, guest: int) -> int:
    """IV sector: the host sector for LUKS, the guest sector for legacy AES (QEMU)."""
    return (host if img.header.crypt_method == 2 else guest) // 512


def read_encrypted(img: Qcow2Image, guest: int, host: int, dst: memoryview) -> None:
    """Fill ``dst`` with the plaintext of the guest bytes at ``guest``, stored encrypted
    from host offset ``host`` (a DATA run): whole sectors are read into ``dst`` and
    decrypted in place; a partial sector goes through a bounce buffer, :data:`CRYPT_PIECE`
    at a time."""
    c = cipher(img)
    assert c is not None
    d = host & 511
    if not d and not len(dst) & 511:  # whole sectors: decrypted where they are read
        img.data_host.preadinto(host, dst)
        c.decrypt(crypt_sector(img, host, guest), dst)
        return
    if not d and len(dst) > CRYPT_PIECE:
        for k in range(0, len(dst), CRYPT_PIECE):
            read_encrypted(img, guest + k, host + k, dst[k : k + CRYPT_PIECE])
        return
    lo = host - d
    buf = bytearray(-(-(d + len(dst)) // 512) * 512)
    img.data_host.preadinto(lo, memoryview(buf))
    c.decrypt(crypt_sector(img, lo, guest - d), buf)
    dst[:] = memoryview(buf)[d : d + len(dst)]
