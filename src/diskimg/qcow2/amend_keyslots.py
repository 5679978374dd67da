"""``amend -o encrypt.*``: add or erase LUKS key slots of a LUKS-encrypted qcow2 image.

The format-neutral part -- which slot changes and the bytes of the new key material and
slot header -- is :func:`diskimg.crypto.luks.plan_keyslot_amend`.  This module is the
qcow2 part: where the LUKS area lives in the image (the full-disk-encryption header
extension, :func:`luks_area`), the refusals qemu's qcow2 driver makes, and the writes
into the image file.  The library calls ``luks_add_key`` and ``luks_remove_keys`` are in
:mod:`.amend` (on :func:`keyslot_change`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskimg.crypto.luks import KeySlotAmend, LuksCipher, LuksHeader, parse_fde_extension
from diskimg.crypto.luks.keyslots import amend_area
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.qcow2.amend_header import read_header
from diskimg.qcow2.amend_plan import check_encryption_amendable
from diskimg.qcow2.layout import QCOW2_EXT_MAGIC_CRYPTO_HEADER, Header

__all__ = ["amend_keyslots", "keyslot_change", "luks_area"]


def luks_area(h: Header, file_size: int | None) -> tuple[int, int]:
    """(offset, length) of the LUKS area the FDE header extension points at."""
    ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    return parse_fde_extension(ext.data if ext is not None else None, h.cluster_size,
                               file_size)


def amend_keyslots(dev: Any, req: KeySlotAmend, secrets: Mapping[str, bytes], *,
                   force: bool = False) -> LuksHeader:
    """Apply a key slot change to the open, writable LUKS qcow2 ``dev`` (unlocked with its
    ``encrypt.key-secret``); returns the new LUKS header.  The writes into the LUKS area
    inside the image file are :func:`diskimg.crypto.luks.keyslots.amend_area`'s."""
    h = read_header(dev.host)
    check_encryption_amendable(h)
    if dev.read_only:
        raise UsageError("Cannot amend key slots of an image opened read-only")
    cipher = dev.cipher  # MissingSecretError without encrypt.key-secret
    if not isinstance(cipher, LuksCipher):
        raise UnsupportedFeatureError("Only LUKS encryption options can be amended")
    off, length = luks_area(h, dev.host.size())
    return amend_area(dev.host, off, length, cipher, req, secrets, force=force)


def keyslot_change(path: Any, secret: bytes, req: KeySlotAmend,
                   secrets: dict[str, bytes], force: bool, untrusted: bool
                   ) -> tuple[LuksHeader, LuksHeader]:
    """Open the LUKS qcow2 at ``path`` with ``secret``, apply ``req`` and return the LUKS
    header (before, after): the library's key slot calls."""
    from diskimg import api

    with api.open(path, "r+", "qcow2", backing=False, untrusted=untrusted,
                  secrets={**secrets, "\0unlock": secret},
                  options={"encrypt.key-secret": "\0unlock"}) as dev:
        h = read_header(dev.host)  # type: ignore[attr-defined]
        check_encryption_amendable(h)
        off, length = luks_area(h, None)
        before = LuksHeader.parse(dev.host.pread_exact(  # type: ignore[attr-defined]
            off, length, "LUKS header (FDE extension)"), length)
        after = amend_keyslots(dev, req, secrets, force=force)
    return before, after
