"""Keys are not kept longer than needed (issue 8.6): every mutable buffer that held key
material during an unlock is zero afterwards, a closed image's cipher is wiped and refuses
use, and secrets never appear in error messages or reprs."""

from __future__ import annotations

from pathlib import Path

import pytest

import diskimg
from diskimg.crypto import luks, wipe
from diskimg.crypto.luks import LuksCipher, LuksHeader, build_luks, keyslots, unlock
from diskimg.crypto.qcow_aes import QcowAesCipher
from diskimg.errors import EncryptionError, InvalidPassphraseError

PASS = b"tr0ub4dor&3"


@pytest.fixture(scope="module")
def area() -> bytes:
    a, cipher, _h = build_luks(PASS, {"cipher-alg": "aes-128", "cipher-mode": "cbc",
                                      "ivgen-alg": "essiv"}, 0)
    cipher.wipe()
    return a


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bytearray]]:
    """Record every slot key, decrypted key material and merged candidate of an unlock."""
    seen: dict[str, list[bytearray]] = {"kdf": [], "material": [], "candidate": []}
    real_kdf, real_merge = luks.pbkdf2_key, luks.af_merge
    real_private = LuksCipher.crypt_private

    def kdf(*a: object, **k: object) -> bytearray:
        out = real_kdf(*a, **k)  # type: ignore[arg-type]
        seen["kdf"].append(out)
        return out

    def merge(*a: object, **k: object) -> bytearray:
        out = real_merge(*a, **k)  # type: ignore[arg-type]
        seen["candidate"].append(out)
        return out

    def private(self: LuksCipher, sector: int, buf: bytearray, encrypt: bool) -> None:
        real_private(self, sector, buf, encrypt)
        seen["material"].append(buf)

    monkeypatch.setattr(keyslots, "pbkdf2_key", kdf)
    monkeypatch.setattr(keyslots, "af_merge", merge)
    monkeypatch.setattr(LuksCipher, "crypt_private", private)
    return seen


def test_failed_unlock_leaves_no_key_material(area: bytes,
                                              spy: dict[str, list[bytearray]]) -> None:
    with pytest.raises(InvalidPassphraseError) as exc:
        unlock(LuksHeader.parse(area, len(area)), area, b"wrong horse")
    assert "wrong horse" not in str(exc.value) and "wrong horse" not in repr(exc.value)
    assert spy["kdf"] and spy["material"] and spy["candidate"]
    for kind, bufs in spy.items():
        assert all(not any(b) for b in bufs), kind


def test_successful_unlock_keeps_only_the_returned_key(area: bytes,
                                                       spy: dict[str, list[bytearray]]
                                                       ) -> None:
    mk, slot = unlock(LuksHeader.parse(area, len(area)), area, PASS)
    assert slot == 0 and any(mk)
    assert all(not any(b) for b in spy["kdf"])  # the slot key
    assert all(not any(b) for b in spy["material"])  # the decrypted split key
    assert [b for b in spy["candidate"] if any(b)] == [mk]
    wipe(mk)
    assert not any(mk)


def test_open_luks_wipes_its_copy(area: bytes, spy: dict[str, list[bytearray]]) -> None:
    cipher, _ = luks.open_luks(area, PASS)
    assert all(not any(b) for bufs in spy.values() for b in bufs)
    buf = bytearray(512)
    cipher.encrypt(1, buf)
    cipher.wipe()
    assert cipher.wiped and not any(cipher._key)  # the key bytes themselves
    with pytest.raises(EncryptionError, match="wiped"):
        cipher.decrypt(1, buf)


def test_af_split_last_stripe_only_in_the_result() -> None:
    key = bytearray(range(1, 33))
    out = luks.af_split(key, 4, "sha256", random=lambda n: b"\x07" * n)
    assert luks.af_merge(out, 32, 4, "sha256") == key
    wipe(out)
    assert not any(out)


def test_qcow_aes_cipher_wipe() -> None:
    c = QcowAesCipher.from_passphrase(b"pw")
    assert "pw" not in repr(c)
    c.wipe()
    with pytest.raises(EncryptionError):
        c.encrypt(0, bytearray(512))


def test_wipe_refuses_immutable_buffers() -> None:
    with pytest.raises(TypeError):
        wipe(memoryview(b"abc"))
    wipe(None, bytearray(b"x"))


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_image_close_wipes_key_and_secrets_never_shown(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / "e.qcow2"
    secret = b"correct horse battery"
    diskimg.create(img, "qcow2", 1 << 20, options={"encrypt.format": fmt,
                                                   "encrypt.key-secret": "k",
                                                   "encrypt.iter-time": "0"},
                   secrets={"k": secret})
    d = diskimg.open(img, "r+", secrets={"k": secret}, options={"encrypt.key-secret": "k"})
    d.write(0, b"plain" * 200)
    cipher = d.cipher  # type: ignore[attr-defined]
    assert "correct horse" not in repr(d) and "correct horse" not in repr(cipher)
    d.close()
    assert cipher.wiped
    with pytest.raises(EncryptionError):
        cipher.encrypt(0, bytearray(512))
    assert d.secrets == {}  # type: ignore[attr-defined]
    if fmt == "luks":  # legacy AES cannot tell a wrong key (qemu cannot either)
        with pytest.raises(InvalidPassphraseError) as exc:
            diskimg.open(img, secrets={"k": b"correct horse battery!"},
                         options={"encrypt.key-secret": "k"})
        assert "correct horse" not in str(exc.value)
        assert "correct horse" not in repr(exc.value)
