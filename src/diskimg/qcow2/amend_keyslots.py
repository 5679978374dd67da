"""``amend -o encrypt.*``: add or erase LUKS key slots of a LUKS-encrypted qcow2 image.

The format-neutral part -- which slot changes and the bytes of the new key material and
slot header -- is :func:`diskimg.crypto.luks.plan_keyslot_amend`.  This module is the
qcow2 part: where the LUKS area lives in the image (the full-disk-encryption header
extension, :func:`luks_area`), the refusals qemu's qcow2 driver makes, and the writes
into the image file.  Also the library calls :func:`luks_add_key` and
:func:`luks_remove_keys`.
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

__all__ = ["amend_keyslots", "luks_add_key", "luks_area", "luks_remove_keys"]


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


def _keyslot_api(path: Any, secret: bytes, req: KeySlotAmend,
                 secrets: dict[str, bytes], force: bool, untrusted: bool
                 ) -> tuple[LuksHeader, LuksHeader]:
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


def luks_add_key(path: Any, secret: bytes, new_secret: bytes, *,
                 keyslot: int | None = None, iter_time_ms: int | None = None,
                 force: bool = False, untrusted: bool = False) -> int:
    """Add ``new_secret`` as a key of the LUKS qcow2 at ``path`` unlocked with ``secret``
    (qemu-img amend ``encrypt.state=active``); returns the key slot used.

    ``keyslot`` None takes the first free slot; an active slot is replaced only with
    ``force``.  ``iter_time_ms`` (default 2000) is the PBKDF2 time of the new slot.
    Raises :class:`InvalidPassphraseError` when ``secret`` opens no slot."""
    before, after = _keyslot_api(
        path, secret, KeySlotAmend("active", new_secret="new", keyslot=keyslot,
                                   iter_time=iter_time_ms),
        {"new": new_secret}, force, untrusted)
    changed = [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
               if b.active and (not a.active or a.salt != b.salt)]
    assert len(changed) == 1
    return changed[0]


def luks_remove_keys(path: Any, secret: bytes, *, keyslot: int | None = None,
                     old_secret: bytes | None = None, force: bool = False,
                     untrusted: bool = False) -> list[int]:
    """Erase key slots of the LUKS qcow2 at ``path`` unlocked with ``secret`` (qemu-img
    amend ``encrypt.state=inactive``): slot ``keyslot``, and/or every slot ``old_secret``
    opens.  Erasing the last active slot is refused unless ``force`` (the data would be
    lost for ever).  Returns the erased slots."""
    before, after = _keyslot_api(
        path, secret, KeySlotAmend("inactive", keyslot=keyslot,
                                   old_secret=None if old_secret is None else "old"),
        {} if old_secret is None else {"old": old_secret}, force, untrusted)
    return [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
            if a.active and not b.active]
