"""diskimg.crypto.luks.cipher: ``encrypt.*`` options -> CipherSpec, and LuksCipher for every
mode/ivgen (round trips, sector dependence, a reference vector, refusals).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import (
    SectorCipher,
)
from diskimg.crypto.luks import (
    CipherSpec,
    LuksCipher,
    spec_from_options,
)
from diskimg.errors import (
    UnsupportedFeatureError,
    UsageError,
)
from tests.unit.luks_testlib import MK64


def _pattern(n: int, mul: int = 31) -> bytes:
    return bytes((i * mul + i // 251) & 0xFF for i in range(n))


def test_big_buffer_spans_batches() -> None:
    """More than one 1 MiB batch: same result as two separate calls."""
    c = LuksCipher(CipherSpec("aes", "xts", "plain64", None, 64), MK64)
    data = _pattern(512 * 2100)
    whole = bytearray(data)
    c.encrypt(7, whole)
    a, b = bytearray(data[:512 * 2000]), bytearray(data[512 * 2000:])
    c.encrypt(7, a)
    c.encrypt(2007, b)
    assert whole == a + b


MODES = [
    ("aes", "xts", "plain64", None, 64),
    ("aes", "xts", "plain64", None, 32),
    ("aes", "xts", "plain64", None, 48),  # aes-192-xts: not in cryptography's XTS
    ("aes", "xts", "essiv", "sha256", 64),
    ("aes", "cbc", "plain64", None, 32),
    ("aes", "cbc", "plain", None, 16),
    ("aes", "cbc", "essiv", "sha256", 24),
    ("aes", "cbc", "essiv", "md5", 32),
    ("aes", "ecb", "plain64", None, 32),
    ("aes", "ctr", "plain64", None, 32),
]


@pytest.mark.parametrize("spec", MODES, ids=lambda m: f"{m[1]}-{m[2]}-{m[4]}")
def test_luks_cipher_roundtrip_and_sector_dependence(spec: tuple) -> None:  # type: ignore[type-arg]
    cs = CipherSpec(*spec)
    c = LuksCipher(cs, bytes((i * 7 + 1) & 0xFF for i in range(cs.key_bytes)))
    assert isinstance(c, SectorCipher)
    plain = bytes(1024)
    a = bytearray(plain)
    c.encrypt(100, a)
    assert bytes(a) != plain
    if cs.mode != "ecb":
        assert a[:512] != a[512:]  # sector 100 and 101 differ
        b = bytearray(plain[:512])
        c.encrypt(101, b)
        assert b == a[512:]  # sector numbering inside a buffer
    c.decrypt(100, memoryview(a))
    assert bytes(a) == plain


def test_luks_cipher_xts_plain64_vector() -> None:
    cs = CipherSpec("aes", "xts", "plain64", None, 64)
    c = LuksCipher(cs, MK64)
    data = bytes(range(256)) * 2
    buf = bytearray(data)
    c.encrypt(0x1234, buf)
    iv = (0x1234).to_bytes(8, "little") + bytes(8)
    assert bytes(buf) == Cipher(algorithms.AES(MK64), modes.XTS(iv)).encryptor().update(data)


def test_luks_cipher_refuses_equal_xts_halves_and_other_ciphers() -> None:
    with pytest.raises(UnsupportedFeatureError):
        LuksCipher(CipherSpec("aes", "xts", "plain64", None, 64), bytes(64))
    with pytest.raises(UnsupportedFeatureError, match="twofish"):
        LuksCipher(CipherSpec("twofish", "xts", "plain64", None, 64), MK64)

def test_spec_from_options_defaults_and_errors() -> None:
    spec, h = spec_from_options({})
    assert (spec.cipher_alg, spec.mode_string, h, spec.key_bytes) == \
        ("aes-256", "xts-plain64", "sha256", 64)
    spec, _ = spec_from_options({"ivgen-alg": "essiv", "cipher-mode": "cbc"})
    assert spec.mode_string == "cbc-essiv:sha256"
    spec, _ = spec_from_options({"ivgen-hash-alg": "sha1"})
    assert spec.mode_string == "xts-plain64:sha1"  # what qemu writes
    for bad in ({"cipher-alg": "sm4"}, {"cipher-alg": "aes-512"}, {"cipher-mode": "lrw"},
                {"ivgen-alg": "benbi"}, {"hash-alg": "whirlpool"}, {"bogus": "1"},
                {"ivgen-hash-alg": "crc32"}):
        with pytest.raises(UsageError):
            spec_from_options(bad)
    with pytest.raises(UnsupportedFeatureError, match="No AES cipher with key size 20"):
        spec_from_options({"ivgen-alg": "essiv", "ivgen-hash-alg": "sha1"})
    with pytest.raises(UnsupportedFeatureError):
        spec_from_options({"cipher-alg": "twofish-256"})
