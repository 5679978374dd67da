"""IV generators and the legacy qcow2 AES cipher (no qemu needed)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import SectorCipher
from diskimg.crypto.ivgen import EssivIV, Plain64IV, PlainIV, hash_digest, make_ivgen
from diskimg.crypto.qcow_aes import QcowAesCipher, qcow_aes_key
from diskimg.errors import UnsupportedFeatureError


def test_plain_wraps_at_32_bits() -> None:
    iv = PlainIV()
    assert iv.iv(1) == b"\x01" + bytes(15)
    assert iv.iv(0x1_0000_0002) == b"\x02" + bytes(15)
    assert len(iv.iv(5)) == 16


def test_plain64_little_endian() -> None:
    iv = Plain64IV()
    assert iv.iv(0x0102030405060708) == bytes.fromhex("0807060504030201") + bytes(8)
    assert iv.iv(0) == bytes(16)


def test_essiv_matches_definition() -> None:
    key = bytes(range(64))
    salt = hashlib.sha256(key).digest()
    ecb = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
    want = ecb.update((77).to_bytes(8, "little") + bytes(8))
    gen = EssivIV(key, "sha256")
    assert gen.iv(77) == want
    assert gen.ivs(76, 3)[16:32] == want
    assert gen.ivs(76, 3) == gen.iv(76) + gen.iv(77) + gen.iv(78)


def test_ivs_concatenate() -> None:
    for gen in (PlainIV(), Plain64IV()):
        assert gen.ivs(0xFFFF_FFFE, 3) == b"".join(gen.iv(0xFFFF_FFFE + i) for i in range(3))


@pytest.mark.parametrize("first", [0, 5, 0xFFFF_FF00, 0xFFFF_FFFF, 1 << 40,
                                   (1 << 64) - 100, (1 << 64) + 7])
@pytest.mark.parametrize("count", [0, 1, 300])
def test_batched_ivs_equal_one_iv_per_sector(first: int, count: int) -> None:
    """The array-built runs of IVs are the per-sector IVs, through both wraps (plain at
    2^32 sectors, plain64 at 2^64) and for essiv, which encrypts plain64's."""
    for gen in (PlainIV(), Plain64IV(), EssivIV(bytes(range(32)), "sha256")):
        assert gen.ivs(first, count) == b"".join(gen.iv(first + i) for i in range(count))


def test_essiv_md5_is_aes128() -> None:
    key = b"k" * 16
    salt = hashlib.md5(key).digest()
    want = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(bytes(16))
    assert make_ivgen("essiv", master_key=key, hash_name="md5").iv(0) == want


@pytest.mark.parametrize("h", ["sha1", "sha512", "sha384", "sha224"])
def test_essiv_hash_without_aes_key_size_refused(h: str) -> None:
    with pytest.raises(UnsupportedFeatureError, match="No AES cipher with key size"):
        make_ivgen("essiv", master_key=b"x" * 32, hash_name=h)


def test_unknown_ivgen_and_hash() -> None:
    with pytest.raises(UnsupportedFeatureError):
        make_ivgen("benbi")
    with pytest.raises(UnsupportedFeatureError):
        hash_digest("whirlpool", b"")


# --- legacy qcow2 AES -----------------------------------------------------------------------

def test_qcow_aes_key_padding() -> None:
    assert qcow_aes_key(b"abc") == b"abc" + bytes(13)
    assert qcow_aes_key("0123456789abcdefXYZ") == b"0123456789abcdef"
    assert qcow_aes_key(b"") == bytes(16)


def test_qcow_aes_vector_and_roundtrip() -> None:
    c = QcowAesCipher.from_passphrase(b"abc")
    assert isinstance(c, SectorCipher)
    plain = bytes(range(256)) * 4  # two sectors
    buf = bytearray(plain)
    c.encrypt(10, buf)
    ref0 = Cipher(algorithms.AES(b"abc" + bytes(13)),
                  modes.CBC((10).to_bytes(8, "little") + bytes(8))).encryptor()
    ref1 = Cipher(algorithms.AES(b"abc" + bytes(13)),
                  modes.CBC((11).to_bytes(8, "little") + bytes(8))).encryptor()
    assert bytes(buf) == ref0.update(plain[:512]) + ref1.update(plain[512:])
    mv = memoryview(buf)
    c.decrypt(10, mv)
    assert bytes(buf) == plain


def test_qcow_aes_rejects_partial_sector_and_readonly() -> None:
    c = QcowAesCipher(b"0123456789abcdef")
    with pytest.raises(ValueError):
        c.encrypt(0, bytearray(100))
    with pytest.raises(TypeError):
        c.decrypt(0, memoryview(bytes(512)))
    with pytest.raises(ValueError):
        QcowAesCipher(b"short")
