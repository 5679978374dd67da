"""The sector cipher of an encrypted qcow2 image, read side (QEMU's qcow2-crypt seam):
unlocking the cipher with the image's secret, the IV sector rule, and decrypting the
sectors under a DATA run.  The sector loops themselves are format-neutral and live in
:mod:`diskimg.crypto.sectors` (shared with the ``luks`` format); the write side
(:func:`diskimg.qcow2.cluster.encrypt_writes`) takes :func:`iv_shift` from here."""

from __future__ import annotations

from diskimg.errors import MissingSecretError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.crypto import SectorCipher
    from diskimg.qcow2.image import Qcow2Image

__all__ = ["cipher", "iv_shift", "read_encrypted"]


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


def iv_shift(img: Qcow2Image, host: int, guest: int) -> int:
    """The ``iv_shift`` of :mod:`diskimg.crypto.sectors` for guest bytes at ``guest``
    stored at ``host``: 0 for LUKS (host sectors), ``guest - host`` for legacy AES."""
    return 0 if img.header.crypt_method == 2 else guest - host


def read_encrypted(img: Qcow2Image, guest: int, host: int, dst: memoryview) -> None:
    """Fill ``dst`` with the plaintext of the guest bytes at ``guest``, stored encrypted
    from host offset ``host`` (a DATA run)."""
    c = cipher(img)
    assert c is not None
    from diskimg.crypto.sectors import read_decrypt  # only encrypted images pay for it

    read_decrypt(img.data_host, c, host, iv_shift(img, host, guest), dst)
