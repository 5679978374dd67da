"""diskimg.crypto.luks.create: areas built for each option set parse, unlock and match
luks_info; the create_luks API.
"""

from __future__ import annotations

import pytest

from diskimg.crypto.luks import (
    LuksCipher,
    LuksHeader,
    build_luks,
    create_luks,
    luks_info,
    open_luks,
)

OPTION_SETS: list[dict[str, str]] = [
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
     "ivgen-hash-alg": "sha256", "hash-alg": "sha1"},
    {"cipher-alg": "aes-192", "cipher-mode": "cbc", "ivgen-alg": "plain"},
    {"cipher-alg": "aes-192", "cipher-mode": "xts"},
    {"cipher-alg": "aes-256", "cipher-mode": "ctr", "hash-alg": "sha512"},
    {"encrypt.cipher-mode": "ecb", "encrypt.ivgen-alg": "essiv"},
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o.values()))
def test_build_unlock_options(opts: dict[str, str]) -> None:
    area, cipher, hdr = build_luks(b"pw", opts, 0)
    parsed = LuksHeader.parse(area, len(area))
    assert parsed.pack() == hdr.pack()
    c2, _ = open_luks(area, b"pw")
    buf = bytearray(range(256)) * 2
    cipher.encrypt(3, buf)
    c2.decrypt(3, buf)
    assert buf == bytearray(range(256)) * 2
    info = luks_info(parsed)
    want_alg = opts.get("cipher-alg", "aes-256")
    assert info["cipher-alg"] == want_alg
    assert ("ivgen-hash-alg" in info) == (parsed.spec.ivgen == "essiv")

def test_create_luks_api_and_iteration_timing() -> None:
    area, cipher = create_luks(b"pw", {"cipher-alg": "aes-128", "cipher-mode": "cbc"}, 20)
    hdr = LuksHeader.parse(area, len(area))
    assert hdr.slots[0].iterations >= 1000 and hdr.mk_digest_iter >= 1000
    assert isinstance(cipher, LuksCipher)
    assert open_luks(area, b"pw")[1] == len(area)
