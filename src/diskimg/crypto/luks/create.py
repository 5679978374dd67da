"""A new LUKS area the way qemu-img 7.2 builds one: a random master key, QEMU's layout
(:func:`~.header.layout`), slot 0 active for the passphrase, the other slots inactive.
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from collections.abc import Mapping
from typing import Any

from diskimg.crypto import SECTOR_SIZE, KeyBuf, wipe
from diskimg.crypto.luks.cipher import LuksCipher, equal_halves, spec_from_options
from diskimg.crypto.luks.header import (
    LUKS_DIGEST_LEN,
    LUKS_HEADER_SIZE,
    LUKS_SALT_LEN,
    CipherSpec,
    KeySlot,
    LuksHeader,
    layout,
)
from diskimg.crypto.luks.kdf import DEFAULT_ITER_TIME_MS, pbkdf2, pbkdf2_iterations
from diskimg.crypto.luks.keyslots import as_key_bytes, wrap_master_key
from diskimg.errors import UsageError


def _fill_random(buf: bytearray) -> None:
    """Random bytes straight into ``buf`` (``/dev/urandom``; ``os.urandom`` elsewhere, which
    leaves an immutable copy)."""
    try:
        with open("/dev/urandom", "rb", buffering=0) as f:
            if f.readinto(buf) == len(buf):
                return
    except OSError:
        pass
    buf[:] = os.urandom(len(buf))


def _random_master_key(spec: CipherSpec) -> bytearray:
    mk = bytearray(spec.key_bytes)
    while True:
        _fill_random(mk)
        if spec.mode != "xts" or not equal_halves(mk):
            return mk


def build_luks(passphrase: KeyBuf | str, options: Mapping[str, Any] | None = None,
               iter_time_ms: int | None = None, *, master_key: KeyBuf | None = None,
               slot_iterations: int | None = None, mk_iterations: int | None = None,
               uuid: str | None = None) -> tuple[bytes, LuksCipher, LuksHeader]:
    """Build a new LUKS area the way qemu-img 7.2 does; ``(area, cipher, header)``.

    ``area`` is ``payload_offset * 512`` bytes: the header, slot 0 active, other slots
    inactive, zeros elsewhere.  ``iter_time_ms`` (default ``options['iter-time']`` or 2000)
    is spent on PBKDF2 per slot unlock, an eighth of it on the master key digest; both at
    least 1000 iterations.  The keyword arguments pin values for reproducible tests.  The
    returned cipher holds the only copy of a generated master key.
    """
    passphrase = as_key_bytes(passphrase)
    options = dict(options or {})
    spec, hash_alg = spec_from_options(options)
    if iter_time_ms is None:
        iter_time_ms = int(options.get("iter-time", options.get("encrypt.iter-time",
                                                                 DEFAULT_ITER_TIME_MS)))
    if iter_time_ms < 0:
        raise UsageError("Parameter 'iter-time' must not be negative")
    if master_key is not None and len(master_key) != spec.key_bytes:
        raise UsageError(f"master key must be {spec.key_bytes} bytes for {spec.cipher_alg}-"
                         f"{spec.mode}")
    if mk_iterations is None:
        mk_iterations = pbkdf2_iterations(hash_alg, LUKS_DIGEST_LEN, iter_time_ms, 8)
    if slot_iterations is None:
        slot_iterations = pbkdf2_iterations(hash_alg, spec.key_bytes, iter_time_ms)
    for n, what in ((mk_iterations, "master key"), (slot_iterations, "key slot")):
        if not 1 <= n <= 0xFFFFFFFF:
            raise UsageError(f"{what} iteration count {n} out of range")
    mk = _random_master_key(spec) if master_key is None else bytearray(master_key)
    try:
        cipher = LuksCipher(spec, mk)  # validates the key (XTS halves)
        mk_salt = os.urandom(LUKS_SALT_LEN)
        digest = pbkdf2(hash_alg, mk, mk_salt, mk_iterations, LUKS_DIGEST_LEN)
        offsets, payload = layout(spec)
        slots = [KeySlot(True, slot_iterations, os.urandom(LUKS_SALT_LEN), offsets[0])]
        slots += [KeySlot(False, 0, bytes(LUKS_SALT_LEN), o) for o in offsets[1:]]
        header = LuksHeader(spec.cipher_name, spec.mode_string, hash_alg, payload,
                            spec.key_bytes, digest, mk_salt, mk_iterations,
                            uuid or str(uuid_mod.uuid4()), slots)
        material = wrap_master_key(header, mk, passphrase, slots[0])
    finally:
        wipe(mk)
    area = bytearray(payload * SECTOR_SIZE)
    area[:LUKS_HEADER_SIZE] = header.pack()
    start = offsets[0] * SECTOR_SIZE
    area[start:start + len(material)] = material
    return bytes(area), cipher, header


def create_luks(passphrase: bytes | str, options: Mapping[str, Any] | None = None,
                iter_time_ms: int | None = None) -> tuple[bytes, LuksCipher]:
    """Integration API: ``(area_bytes, cipher)`` for a new qcow2 LUKS image.

    Store ``area_bytes`` in freshly allocated clusters and point the FDE extension
    (0x0537be77) at them with ``length = len(area_bytes)``.
    """
    area, cipher, _hdr = build_luks(passphrase, options, iter_time_ms)
    return area, cipher


__all__ = ["build_luks", "create_luks"]
