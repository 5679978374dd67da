"""LUKS key slots: unlock (find the master key), and plans that add or erase a slot
(``qemu-img amend -o encrypt.*``).

A slot holds the master key AF-split (:mod:`.af`) into ``key-bytes * 4000`` bytes,
encrypted with the volume's cipher and mode keyed by ``PBKDF2(passphrase, slot salt, slot
iterations, key-bytes)``, sector IVs counted from 0 at the start of the key material.

Invariants: every count is checked against the unlock cap before any PBKDF2 run; every
intermediate that could lead to the key lives in a ``bytearray`` wiped before returning; a
plan is a list of :class:`AreaWrite` in a crash-safe order (no header ever points an active
slot at half-written material) and changes nothing until its writes are issued.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diskimg.crypto import SECTOR_SIZE, KeyBuf, wipe
from diskimg.crypto.preload import preload_kernels
from diskimg.crypto.ivgen import make_ivgen
from diskimg.crypto.luks.af import af_merge, af_split
from diskimg.crypto.luks.header import (
    IMPLEMENTED_CIPHERS,
    LUKS_DIGEST_LEN,
    LUKS_NUM_SLOTS,
    LUKS_SALT_LEN,
    LUKS_STRIPES,
    OFF_MK_DIGEST_ITER,
    SLOT_ITERATIONS,
    SLOT_KEY_OFFSET,
    KeySlot,
    LuksHeader,
    header_error,
    slot_offset,
)
from diskimg.crypto.luks.kdf import (
    DEFAULT_ITER_TIME_MS,
    MAX_PBKDF2_ITERATIONS,
    pbkdf2,
    pbkdf2_iterations,
    pbkdf2_key,
)
from diskimg.errors import (
    InvalidPassphraseError,
    MissingSecretError,
    UnsupportedFeatureError,
    UsageError,
)

if TYPE_CHECKING:
    from diskimg.crypto.luks.cipher import LuksCipher
    from diskimg.hostio.host import Host


def _check_iters(n: int, what: str, off: int, cap: int) -> None:
    if n > cap:
        raise UnsupportedFeatureError(
            f"LUKS {what} uses {n} PBKDF2 iterations, more than the limit of {cap} (field at "
            f"0x{off:x}); refusing to spend the time", offset=off)


def as_key_bytes(passphrase: KeyBuf | str) -> KeyBuf:
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase


def _check_unlockable(header: LuksHeader, max_iterations: int) -> None:
    spec = header.spec
    if spec.cipher_name not in IMPLEMENTED_CIPHERS:
        raise UnsupportedFeatureError(
            f"LUKS cipher '{spec.cipher_alg}' is not implemented (only AES)")
    if spec.ivgen == "essiv":
        # fail early (with qemu's message) rather than after the PBKDF2 run
        make_ivgen("essiv", master_key=bytes(header.key_bytes), hash_name=spec.ivgen_hash)
    _check_iters(header.mk_digest_iter, "master key digest", OFF_MK_DIGEST_ITER, max_iterations)
    for i, s in enumerate(header.slots):
        if s.active:
            _check_iters(s.iterations, f"key slot {i}",
                         slot_offset(i) + SLOT_ITERATIONS, max_iterations)


def _master_key_matches(header: LuksHeader, candidate: KeyBuf) -> bool:
    digest = pbkdf2(header.hash_spec, candidate, header.mk_digest_salt,
                    header.mk_digest_iter, LUKS_DIGEST_LEN)
    return hmac.compare_digest(digest, header.mk_digest)


def _try_slot(header: LuksHeader, area: bytes | bytearray | memoryview, index: int,
              passphrase: KeyBuf) -> bytearray | None:
    """The master key if ``passphrase`` opens active slot ``index``, else None.

    Every intermediate that could lead to the key (slot key, decrypted split material, a
    candidate that fails the digest) lives in a ``bytearray`` wiped before returning."""
    s = header.slots[index]
    spec = header.spec
    mlen = header.material_bytes
    start = s.key_offset * SECTOR_SIZE
    if start + mlen > len(area):
        raise header_error(f"key-slot[{index}].key-material-offset",
                           slot_offset(index) + SLOT_KEY_OFFSET,
                           f"key slot {index} material lies outside the {len(area)}-byte LUKS area")
    slot_key = pbkdf2_key(header.hash_spec, passphrase, s.salt, s.iterations,
                          header.key_bytes)
    # (imported after the PBKDF2 run: the sector kernels load meanwhile, open_luks)
    from diskimg.crypto.luks.cipher import LuksCipher, equal_halves

    material: bytearray | None = None
    candidate: bytearray | None = None
    try:
        if spec.mode == "xts" and equal_halves(slot_key):
            return None  # degenerate XTS slot key: the backend refuses it, cannot be it
        slot_cipher = LuksCipher(spec, slot_key)
        try:
            material = bytearray(memoryview(area)[start:start + mlen])
            slot_cipher.crypt_private(0, material, False)
            candidate = af_merge(material, header.key_bytes, s.stripes, header.hash_spec)
        finally:
            slot_cipher.wipe()
        if _master_key_matches(header, candidate):
            found, candidate = candidate, None
            return found
        return None
    finally:
        wipe(slot_key, material, candidate)


def unlock(header: LuksHeader, area: bytes | bytearray | memoryview,
           passphrase: KeyBuf | str,
           max_iterations: int = MAX_PBKDF2_ITERATIONS) -> tuple[bytearray, int]:
    """Find the master key: try every active slot; ``(master_key, slot_index)``.

    ``area`` is the whole LUKS area (header + key material; the FDE extension's bytes).
    The master key is a ``bytearray`` the caller wipes (:func:`diskimg.crypto.wipe`) when
    done.  Raises :class:`InvalidPassphraseError` (never naming the passphrase) when no slot
    opens.
    """
    passphrase = as_key_bytes(passphrase)
    _check_unlockable(header, max_iterations)
    for i, s in enumerate(header.slots):
        if s.active:
            mk = _try_slot(header, area, i, passphrase)
            if mk is not None:
                return mk, i
    raise InvalidPassphraseError("Invalid password, cannot unlock any keyslot")


def open_luks(area: bytes | bytearray | memoryview, passphrase: KeyBuf | str,
              max_iterations: int = MAX_PBKDF2_ITERATIONS) -> tuple[LuksCipher, int]:
    """Parse + unlock a LUKS area; ``(cipher, payload_offset_bytes)``.  The cipher holds
    the only copy of the master key (wipe it with ``cipher.wipe()``)."""
    header = LuksHeader.parse(area, len(area))
    # the sector kernels (numpy's: ~50 ms of imports) load on a thread while the key
    # slot's PBKDF2 runs here without the GIL (issue 20)
    loaded = preload_kernels()
    try:
        master_key, _slot = unlock(header, area, passphrase, max_iterations)
    finally:
        loaded()
    from diskimg.crypto.luks.cipher import LuksCipher

    try:
        return LuksCipher(header.spec, master_key), header.payload_offset * SECTOR_SIZE
    finally:
        wipe(master_key)


def wrap_master_key(header: LuksHeader, master_key: KeyBuf, passphrase: KeyBuf,
                     slot: KeySlot) -> bytearray:
    """The encrypted, sector-padded key material of ``slot`` for ``passphrase``.

    Picks a new salt into ``slot`` while the slot key would be a degenerate XTS key.  The
    split material is encrypted in place; the slot key is wiped."""
    from diskimg.crypto.luks.cipher import LuksCipher, equal_halves

    spec = header.spec
    while True:
        slot_key = pbkdf2_key(header.hash_spec, passphrase, slot.salt, slot.iterations,
                              spec.key_bytes)
        if spec.mode != "xts" or not equal_halves(slot_key):
            break
        wipe(slot_key)  # never in practice
        slot.salt = os.urandom(LUKS_SALT_LEN)
    material = af_split(master_key, slot.stripes, header.hash_spec)
    material += bytes(header.material_bytes - len(material))
    try:
        slot_cipher = LuksCipher(spec, slot_key)
        try:
            slot_cipher.crypt_private(0, material, True)
        finally:
            slot_cipher.wipe()
    except BaseException:
        wipe(material)
        raise
    finally:
        wipe(slot_key)
    return material


@dataclass(frozen=True, slots=True)
class AreaWrite:
    """One write into the LUKS area (``offset`` relative to its start).  A plan is a list
    of these in order; each must be durable (flushed) before the next is issued."""

    offset: int
    data: bytes


def _slot_header_write(header: LuksHeader) -> AreaWrite:
    return AreaWrite(0, header.pack())


def plan_add_key(header: LuksHeader, master_key: KeyBuf, passphrase: KeyBuf | str, *,
                 keyslot: int | None = None, iter_time_ms: int | None = None,
                 force: bool = False, slot_iterations: int | None = None
                 ) -> tuple[int, LuksHeader, list[AreaWrite]]:
    """Wrap ``master_key`` for ``passphrase`` in a key slot: ``(slot, new header, writes)``.

    ``keyslot`` None takes the first inactive slot.  An active slot is only replaced with
    ``force``.  Write order (LUKS tools' order, crash-safe): the key material, then the
    header that activates the slot; replacing an active slot first writes a header that
    deactivates it, so no header ever points an active slot at half-written material.
    The master key is checked against the header's digest before anything is planned.
    """
    passphrase = as_key_bytes(passphrase)
    if len(master_key) != header.key_bytes or not _master_key_matches(header, master_key):
        raise InvalidPassphraseError("The master key does not match the LUKS header")
    if keyslot is None:
        free = [i for i, s in enumerate(header.slots) if not s.active]
        if not free:
            raise UsageError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not 0 <= keyslot < LUKS_NUM_SLOTS:
        raise UsageError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                         f"{LUKS_NUM_SLOTS - 1}")
    if header.slots[keyslot].active and not force:
        raise UsageError(f"Refusing to overwrite active keyslot {keyslot} - please erase it "
                         "first")
    if slot_iterations is None:
        ms = DEFAULT_ITER_TIME_MS if iter_time_ms is None else iter_time_ms
        if ms < 0:
            raise UsageError("Parameter 'iter-time' must not be negative")
        slot_iterations = pbkdf2_iterations(header.hash_spec, header.key_bytes, ms)
    if not 1 <= slot_iterations <= 0xFFFFFFFF:
        raise UsageError(f"key slot iteration count {slot_iterations} out of range")
    new = header.copy()
    writes: list[AreaWrite] = []
    old = new.slots[keyslot]
    if old.active:
        new.slots[keyslot] = old.erased()
        writes.append(_slot_header_write(new))
        new = new.copy()
    slot = KeySlot(True, slot_iterations, os.urandom(LUKS_SALT_LEN), old.key_offset,
                   LUKS_STRIPES)
    material = wrap_master_key(new, master_key, passphrase, slot)
    new.slots[keyslot] = slot
    writes.append(AreaWrite(slot.key_offset * SECTOR_SIZE, bytes(material)))
    writes.append(_slot_header_write(new))
    return keyslot, new, writes


def plan_erase_keys(header: LuksHeader, slots: list[int]
                    ) -> tuple[LuksHeader, list[AreaWrite]]:
    """Deactivate ``slots``: ``(new header, writes)``.  Order: the header that marks them
    inactive first (the slots are then gone whatever happens next), then random bytes over
    their key material.  Refusing to erase the last active slot is the caller's policy
    (:func:`plan_keyslot_amend`)."""
    new = header.copy()
    for i in slots:
        new.slots[i] = new.slots[i].erased()
    writes = [_slot_header_write(new)]
    writes += [AreaWrite(new.slots[i].key_offset * SECTOR_SIZE,
                         os.urandom(header.material_bytes)) for i in slots]
    return new, writes


def slot_opens(header: LuksHeader, area: bytes | bytearray | memoryview, index: int,
               passphrase: KeyBuf | str,
               max_iterations: int = MAX_PBKDF2_ITERATIONS) -> bool:
    """True when ``passphrase`` unlocks active key slot ``index``."""
    _check_unlockable(header, max_iterations)
    if not header.slots[index].active:
        return False
    mk = _try_slot(header, area, index, as_key_bytes(passphrase))
    wipe(mk)
    return mk is not None


@dataclass(frozen=True, slots=True)
class KeySlotAmend:
    """qemu's LUKS amend options (``encrypt.state``, ``new-secret``, ``old-secret``,
    ``keyslot``, ``iter-time``); the secrets are ids, looked up only when qemu does."""

    state: str | None
    new_secret: str | None = None
    old_secret: str | None = None
    keyslot: int | None = None
    iter_time: int | None = None


def _int32(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n & 0x80000000 else n


def plan_keyslot_amend(header: LuksHeader, area: bytes | bytearray | memoryview,
                       master_key: KeyBuf, req: KeySlotAmend,
                       lookup: Callable[[str], bytes], force: bool = False,
                       max_iterations: int = MAX_PBKDF2_ITERATIONS
                       ) -> tuple[LuksHeader, list[AreaWrite]]:
    """``qemu-img amend -o encrypt.*`` for LUKS: checks in qemu 7.2's order with its
    messages, then the plan of :func:`plan_add_key` or :func:`plan_erase_keys`.

    ``lookup(id)`` returns a secret (raising :class:`MissingSecretError` for unknown ids).
    Without ``force`` an active slot is never overwritten and the last active slot is never
    erased (its erasure makes the data unreadable for ever)."""
    if req.state is None:
        raise UsageError("Parameter 'state' is missing")
    if req.state not in ("active", "inactive"):
        raise UsageError(f"Parameter 'state' does not accept value '{req.state}'")
    keyslot = None if req.keyslot is None else _int32(req.keyslot)
    if req.state == "active":
        if req.new_secret is None:
            raise UsageError("'new-secret' is required to activate a keyslot")
        if req.old_secret is not None:
            raise UsageError("'old-secret' must not be given when activating keyslots")
        if keyslot is not None and not 0 <= keyslot < LUKS_NUM_SLOTS:
            raise UsageError(f"Invalid keyslot {keyslot & 0xFFFFFFFF} specified, must be "
                             f"between 0 and {LUKS_NUM_SLOTS - 1}")
        if keyslot is None and all(s.active for s in header.slots):
            raise UsageError("Can't add a keyslot - all keyslots are in use")
        if keyslot is not None and header.slots[keyslot].active and not force:
            raise UsageError(f"Refusing to overwrite active keyslot {keyslot} - please "
                             "erase it first")
        new_pw = lookup(req.new_secret)
        _slot, new, writes = plan_add_key(header, master_key, new_pw, keyslot=keyslot,
                                          iter_time_ms=req.iter_time, force=force)
        return new, writes
    if req.new_secret is not None:
        raise UsageError("'new-secret' must not be given when erasing keyslots")
    if req.iter_time is not None:
        raise UsageError("'iter-time' must not be given when erasing keyslots")
    old_pw = lookup(req.old_secret) if req.old_secret is not None else None
    active = [i for i, s in enumerate(header.slots) if s.active]
    if keyslot is not None:
        if not 0 <= keyslot < LUKS_NUM_SLOTS:
            raise UsageError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                             f"{LUKS_NUM_SLOTS - 1}")
        if old_pw is not None and not slot_opens(header, area, keyslot, old_pw,
                                                 max_iterations):
            raise InvalidPassphraseError(f"Given keyslot {keyslot} doesn't contain the given "
                                         "old password for erase operation")
        # --force skips both checks, as in qemu: an inactive slot is erased again (its
        # salt and iterations zeroed, its key material overwritten)
        if not force and keyslot not in active:
            raise UsageError(f"Given keyslot {keyslot} is already erased (inactive) ")
        if not force and len(active) == 1:
            raise UsageError(f"Attempt to erase the only active keyslot {keyslot} which will "
                             "erase all the data in the image irreversibly - refusing "
                             "operation")
        return plan_erase_keys(header, [keyslot])
    if old_pw is None:
        raise UsageError("To erase keyslot(s), either explicit keyslot index or the password "
                         "currently contained in them must be given")
    matching = [i for i in active if slot_opens(header, area, i, old_pw, max_iterations)]
    if not force and len(matching) == len(active):
        raise UsageError("All the active keyslots match the (old) password that was given "
                         "and erasing them will erase all the data in the image "
                         "irreversibly - refusing operation")
    if not matching:
        raise InvalidPassphraseError("No keyslots match given (old) password for erase "
                                     "operation")
    return plan_erase_keys(header, matching)


def secret_lookup(secrets: Mapping[str, bytes]) -> Callable[[str], bytes]:
    """The ``lookup`` of :func:`plan_keyslot_amend` over a dict of secrets."""
    def lookup(sid: str) -> bytes:
        if sid not in secrets:
            raise MissingSecretError(f"No secret with id '{sid}'")
        return secrets[sid]
    return lookup


def amend_area(host: Host, off: int, length: int, cipher: LuksCipher,
               req: KeySlotAmend, secrets: Mapping[str, bytes], *,
               force: bool = False) -> LuksHeader:
    """Apply ``req`` to the LUKS area at ``off`` (``length`` bytes) of ``host``, whose
    volume ``cipher`` is unlocked; returns the new header.  Used by every format that
    holds a LUKS area (qcow2's FDE extension, the standalone ``luks`` format).

    The master key is taken from ``cipher`` (no second PBKDF2 run), copied into a
    ``bytearray`` and wiped once the plan is made.  Each planned write is flushed before
    the next one (key material before the slot header that activates it; an erase writes
    the header first), and nothing is written before the whole plan is made."""
    area = host.pread_exact(off, length, "LUKS header and key material")
    header = LuksHeader.parse(area, len(area))
    mk = cipher.export_master_key()
    try:
        new, writes = plan_keyslot_amend(header, area, mk, req, secret_lookup(secrets),
                                         force)
    finally:
        wipe(mk)
    for w in writes:
        host.pwrite(off + w.offset, w.data)
        host.flush()
    return new


__all__ = ["AreaWrite", "KeySlotAmend", "amend_area", "open_luks", "plan_add_key",
           "plan_erase_keys", "plan_keyslot_amend", "secret_lookup", "slot_opens", "unlock"]
