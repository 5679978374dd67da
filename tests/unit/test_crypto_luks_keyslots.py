"""diskimg.crypto.luks.keyslots: unlock of diskimg-made areas, wrong passphrases, the
iteration cap, and material outside the area.  Headers are built with ``iter_time_ms=0``
(QEMU's floor of 1000 iterations) so the module runs in seconds.
"""

from __future__ import annotations

import time

import pytest

from diskimg.crypto.luks import (
    LuksCipher,
    LuksHeader,
    luks_info,
    open_luks,
    unlock,
)
from diskimg.errors import (
    FormatError,
    InvalidPassphraseError,
    UnsupportedFeatureError,
)
from tests.unit.luks_testlib import MK64, PASS, luks_area, patch, u32


@pytest.fixture(scope="module")
def default_area() -> bytes:
    return luks_area()


def test_unlock_own_header(default_area: bytes) -> None:
    cipher, payload = open_luks(default_area, PASS)
    assert payload == 2068480
    hdr = LuksHeader.parse(default_area)
    mk, slot = unlock(hdr, default_area, PASS.decode())
    assert (mk, slot) == (MK64, 0)
    buf = bytearray(b"\x42" * 512)
    cipher.encrypt(9, buf)
    ref = LuksCipher(hdr.spec, MK64)
    ref.decrypt(9, buf)
    assert buf == b"\x42" * 512


def test_wrong_passphrase(default_area: bytes) -> None:
    with pytest.raises(InvalidPassphraseError):
        open_luks(default_area, b"correct horsf")
    with pytest.raises(InvalidPassphraseError):
        open_luks(default_area, b"")


# --- hostile key slots -----------------------------------------------------------------------

@pytest.mark.parametrize("off", [164, 208 + 4])
def test_iteration_cap(default_area: bytes, off: int) -> None:
    bad = patch(default_area, off, u32(0xFFFFFFFF))
    hdr = LuksHeader.parse(bad, len(bad))  # parse (and info) still work
    assert luks_info(hdr)["format"] == "luks"
    t0 = time.monotonic()
    with pytest.raises(UnsupportedFeatureError, match="4294967295 PBKDF2 iterations"):
        open_luks(bad, PASS)
    assert time.monotonic() - t0 < 1


def test_slot_material_past_short_area(default_area: bytes) -> None:
    """Parsing with the header alone is fine; unlocking needs the material."""
    hdr = LuksHeader.parse(default_area[:4096])
    with pytest.raises(FormatError, match="outside"):
        unlock(hdr, default_area[:4096], PASS)


def test_inactive_slots_only(default_area: bytes) -> None:
    bad = patch(default_area, 208, u32(0x0000DEAD))
    with pytest.raises(InvalidPassphraseError):
        open_luks(bad, PASS)
