"""LUKS1 as QEMU uses it inside qcow2 (``crypt_method=2``, ``encrypt.format=luks``).

Written from the LUKS1 on-disk format specification (v1.2.3) and QEMU's documentation,
and checked byte for byte against images qemu-img 7.2 makes.  One module per job:

=========================  ===============================================================
:mod:`.header`             the on-disk layout: 592-byte header, key-slot records, field
                           offsets, QEMU's slot layout and payload size, ``luks_info``
:mod:`.fde`                qcow2's FDE header extension (0x0537be77) pointing at the area
:mod:`.kdf`                PBKDF2 and qemu's iteration benchmark
:mod:`.af`                 the anti-forensic splitter
:mod:`.cipher`             ``encrypt.*`` options -> ``CipherSpec`` -> ``LuksCipher``
:mod:`.keyslots`           unlock; plans that add or erase a key slot (amend)
:mod:`.create`             a new LUKS area
=========================  ===============================================================

:mod:`.header` and :mod:`.fde` import no ``cryptography`` and are loaded with this
package; the other modules' names (``open_luks``, ``create_luks``, ``LuksCipher`` ...) are
importable from here too and load on first use.

qcow2 specifics (verified against qemu-img/qemu-io 7.2): data clusters are encrypted
sector by sector with the IV number = **host** file offset / 512 of the sector (QEMU's
``crypt_physical_offset``); the payload offset is not used for data.

Policy for hostile headers: every field is validated before any big allocation or any
PBKDF2 run; PBKDF2 iteration counts above ``MAX_PBKDF2_ITERATIONS`` are refused at unlock
time (an unlock of a 2^32-1 iteration slot would take hours); ``info`` still works on such
headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskimg.crypto.luks.fde import MAX_LUKS_AREA, pack_fde_extension, parse_fde_extension
from diskimg.crypto.luks.header import (
    CIPHER_KEY_SIZES,
    CIPHER_MODES,
    LUKS_ALIGN,
    LUKS_DIGEST_LEN,
    LUKS_HEADER_SIZE,
    LUKS_KEY_SLOT_ACTIVE,
    LUKS_KEY_SLOT_INACTIVE,
    LUKS_MAGIC,
    LUKS_NUM_SLOTS,
    LUKS_SALT_LEN,
    LUKS_SLOT_OFFSET,
    LUKS_SLOT_SIZE,
    LUKS_STRIPES,
    LUKS_VERSION,
    CipherSpec,
    KeySlot,
    LuksHeader,
    layout,
    luks_header_size,
    luks_info,
    parse_cipher_mode,
)

if TYPE_CHECKING:
    from diskimg.crypto.luks.af import af_merge, af_split
    from diskimg.crypto.luks.cipher import IMPLEMENTED_CIPHERS, LuksCipher, spec_from_options
    from diskimg.crypto.luks.create import build_luks, create_luks
    from diskimg.crypto.luks.kdf import (
        DEFAULT_ITER_TIME_MS,
        MAX_PBKDF2_ITERATIONS,
        MIN_ITERATIONS,
        iterations_for_time,
        pbkdf2,
        pbkdf2_count_iters,
        pbkdf2_iterations,
        pbkdf2_key,
        pbkdf2_rate,
    )
    from diskimg.crypto.luks.keyslots import (
        AreaWrite,
        KeySlotAmend,
        open_luks,
        plan_add_key,
        plan_erase_keys,
        plan_keyslot_amend,
        slot_opens,
        unlock,
    )

#: the modules that need ``cryptography``, searched in this order for a name (keyslots
#: before cipher: ``open_luks`` is found without importing the cipher, whose sector
#: kernels it loads on a thread while PBKDF2 runs)
_LAZY_MODULES = ("kdf", "af", "keyslots", "cipher", "create")


def __getattr__(name: str) -> object:
    """A name of one of the ``cryptography`` modules, imported on first use (the names of
    the single ``luks.py`` module this package replaces keep working)."""
    import importlib

    if name in _LAZY_MODULES:  # ``from diskimg.crypto.luks import keyslots``: that one only
        return importlib.import_module(f"diskimg.crypto.luks.{name}")
    if not name.startswith("__"):
        for mod in _LAZY_MODULES:
            module = importlib.import_module(f"diskimg.crypto.luks.{mod}")
            if name in vars(module):
                value = vars(module)[name]
                globals()[name] = value  # found directly from now on
                return value
    raise AttributeError(f"module 'diskimg.crypto.luks' has no attribute '{name}'")


__all__ = [
    "CIPHER_KEY_SIZES",
    "CIPHER_MODES",
    "DEFAULT_ITER_TIME_MS",
    "IMPLEMENTED_CIPHERS",
    "LUKS_ALIGN",
    "LUKS_DIGEST_LEN",
    "LUKS_HEADER_SIZE",
    "LUKS_KEY_SLOT_ACTIVE",
    "LUKS_KEY_SLOT_INACTIVE",
    "LUKS_MAGIC",
    "LUKS_NUM_SLOTS",
    "LUKS_SALT_LEN",
    "LUKS_SLOT_OFFSET",
    "LUKS_SLOT_SIZE",
    "LUKS_STRIPES",
    "LUKS_VERSION",
    "MAX_LUKS_AREA",
    "MAX_PBKDF2_ITERATIONS",
    "MIN_ITERATIONS",
    "AreaWrite",
    "CipherSpec",
    "KeySlot",
    "KeySlotAmend",
    "LuksCipher",
    "LuksHeader",
    "af_merge",
    "af_split",
    "build_luks",
    "create_luks",
    "iterations_for_time",
    "layout",
    "luks_header_size",
    "luks_info",
    "open_luks",
    "pack_fde_extension",
    "parse_cipher_mode",
    "parse_fde_extension",
    "pbkdf2",
    "pbkdf2_count_iters",
    "pbkdf2_iterations",
    "pbkdf2_key",
    "pbkdf2_rate",
    "plan_add_key",
    "plan_erase_keys",
    "plan_keyslot_amend",
    "slot_opens",
    "spec_from_options",
    "unlock",
]
