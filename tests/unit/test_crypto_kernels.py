"""diskimg.crypto.kernels: the batched AES-CBC/XTS sector kernels equal per-sector
``cryptography`` modes (and AES-192-XTS built from single AES blocks).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import (
    cbc_decrypt_sectors,
    cbc_encrypt_sectors,
    xts_sectors,
)

# --- ciphers ---------------------------------------------------------------------------------

def _pattern(n: int, mul: int = 31) -> bytes:
    return bytes((i * mul + i // 251) & 0xFF for i in range(n))


@pytest.mark.parametrize("nsect", [1, 2, 7, 11, 12, 64])
@pytest.mark.parametrize("key_len", [32, 64])
def test_batched_xts_equals_cryptography(key_len: int, nsect: int) -> None:
    key = _pattern(key_len, 13)
    ivs = b"".join((1000 + i).to_bytes(8, "little") + bytes(8) for i in range(nsect))
    ivs = bytes(ivs[:-16]) + b"\xff" * 16  # a tweak with the top bit set (carry path)
    data = _pattern(512 * nsect)
    ref = b"".join(Cipher(algorithms.AES(key), modes.XTS(ivs[16 * i:16 * i + 16]))
                   .encryptor().update(data[512 * i:512 * i + 512]) for i in range(nsect))
    assert xts_sectors(key, ivs, data, True) == ref
    assert xts_sectors(key, ivs, ref, False) == data


@pytest.mark.parametrize("nsect", [1, 12, 40])
def test_batched_xts_aes192_matches_aes_definition(nsect: int) -> None:
    """AES-192-XTS (no cryptography XTS for it) equals XTS built from single AES blocks."""
    key = _pattern(48, 13)
    ivs = _pattern(16 * nsect, 7)
    data = _pattern(512 * nsect)
    k1 = Cipher(algorithms.AES(key[:24]), modes.ECB())
    k2 = Cipher(algorithms.AES(key[24:]), modes.ECB())
    ref = bytearray()
    for i in range(nsect):
        t = int.from_bytes(k2.encryptor().update(ivs[16 * i:16 * i + 16]), "little")
        for j in range(32):
            blk = data[512 * i + 16 * j:512 * i + 16 * j + 16]
            tb = t.to_bytes(16, "little")
            x = bytes(a ^ b for a, b in zip(blk, tb, strict=True))
            y = k1.encryptor().update(x)
            ref += bytes(a ^ b for a, b in zip(y, tb, strict=True))
            t <<= 1
            if t >> 128:
                t = (t & ((1 << 128) - 1)) ^ 0x87
    assert xts_sectors(key, ivs, data, True) == ref
    assert xts_sectors(key, ivs, bytes(ref), False) == data


@pytest.mark.parametrize("nsect", [1, 3, 12, 64])
@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_batched_cbc_equals_cryptography(key_len: int, nsect: int) -> None:
    key = _pattern(key_len, 17)
    ivs = _pattern(16 * nsect, 101)
    data = _pattern(512 * nsect)
    ref = b"".join(Cipher(algorithms.AES(key), modes.CBC(ivs[16 * i:16 * i + 16]))
                   .encryptor().update(data[512 * i:512 * i + 512]) for i in range(nsect))
    assert cbc_encrypt_sectors(key, ivs, data) == ref
    assert cbc_decrypt_sectors(key, ivs, ref) == data
