"""``amend -o encrypt.*``: add or erase LUKS key slots of a LUKS-encrypted qcow2 image.

The format-neutral part -- which slot changes and the bytes of the new key material and
slot header -- is :func:`diskimg.crypto.luks.plan_keyslot_amend`.  This module is the
qcow2 part: where the LUKS area lives in the image (the full-disk-encryption header
extension, :func:`luks_area`), the refusals qemu's qcow2 driver makes, and the writes
into the image file.  The library calls ``luks_add_key`` and ``luks_remove_keys`` are in
:mod:`.amend` (on :func:`keyslot_change`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diskimg.crypto import wipe
from diskimg.crypto.luks import (
    KeySlotAmend,
    LuksCipher,
    LuksHeader,
    parse_fde_extension,
    plan_keyslot_amend,
)
from diskimg.errors import MissingSecretError, UnsupportedFeatureError, UsageError
from diskimg.qcow2.amend_header import read_header
from diskimg.qcow2.amend_plan import check_encryption_amendable
from diskimg.qcow2.layout import QCOW2_EXT_MAGIC_CRYPTO_HEADER, Header

__all__ = ["amend_keyslots", "keyslot_change", "luks_area"]


def _secret_lookup(secrets: Mapping[str, bytes]) -> Callable[[str], bytes]:
    def lookup(sid: str) -> bytes:
        if sid not in secrets:
            raise MissingSecretError(f"No secret with id '{sid}'")
        return secrets[sid]
    return lookup


def luks_area(h: Header, file_size: int | None) -> tuple[int, int]:
    """(offset, length) of the LUKS area the FDE header extension points at."""
    ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    return parse_fde_extension(ext.data if ext is not None else None, h.cluster_size,
                               file_size)


def amend_keyslots(dev: Any, req: KeySlotAmend, secrets: Mapping[str, bytes], *,
                   force: bool = False) -> LuksHeader:
    """Apply a key slot change to the open, writable LUKS qcow2 ``dev`` (unlocked with its
    ``encrypt.key-secret``); returns the new LUKS header.

    The master key is taken from the open image (no second PBKDF2 run), copied into a
    ``bytearray`` and wiped once the plan is made.  Each planned write goes to the LUKS
    area inside the image file and is flushed before the next one (key material before
    the slot header that activates it; an erase writes the header first)."""
    h = read_header(dev.host)
    check_encryption_amendable(h)
    if dev.read_only:
        raise UsageError("Cannot amend key slots of an image opened read-only")
    cipher = dev.cipher  # MissingSecretError without encrypt.key-secret
    if not isinstance(cipher, LuksCipher):
        raise UnsupportedFeatureError("Only LUKS encryption options can be amended")
    off, length = luks_area(h, dev.host.size())
    area = dev.host.pread_exact(off, length, "LUKS header (FDE extension)")
    header = LuksHeader.parse(area, len(area))
    mk = cipher.export_master_key()
    try:
        new, writes = plan_keyslot_amend(header, area, mk, req, _secret_lookup(secrets),
                                         force)
    finally:
        wipe(mk)
    for w in writes:
        dev.host.pwrite(off + w.offset, w.data)
        dev.host.flush()
    return new


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
