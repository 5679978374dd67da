"""diskimg.crypto.luks.af: the anti-forensic splitter against the LUKS1 spec's H1 and
its own inverse.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskimg.crypto.luks import (
    _diffuse,
    af_merge,
    af_split,
)

# --- anti-forensic splitter ------------------------------------------------------------------

def _ref_diffuse(block: bytes, name: str) -> bytes:
    """Straight from the LUKS1 spec: hash pieces i as H(be32(i) || piece)."""
    size = hashlib.new(name).digest_size
    out = b""
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out += hashlib.new(name, struct.pack(">I", i // size) + piece).digest()[:len(piece)]
    return out


@pytest.mark.parametrize("name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("n", [16, 20, 33, 64])
def test_diffuse_matches_spec(name: str, n: int) -> None:
    block = bytes((7 * i + 3) & 0xFF for i in range(n))
    assert _diffuse(block, name) == _ref_diffuse(block, name)


def test_af_split_deterministic_vector() -> None:
    """With fixed 'random' stripes the last stripe is d_{n-1} ^ data."""
    counter = iter(range(1, 100))

    def rnd(n: int) -> bytes:
        return bytes([next(counter)]) * n

    data = bytes(range(16))
    out = af_split(data, 3, "sha256", random=rnd)
    s1, s2 = b"\x01" * 16, b"\x02" * 16
    d1 = _ref_diffuse(s1, "sha256")
    d2 = _ref_diffuse(bytes(a ^ b for a, b in zip(d1, s2, strict=True)), "sha256")
    assert out == s1 + s2 + bytes(a ^ b for a, b in zip(d2, data, strict=True))
    assert af_merge(out, 16, 3, "sha256") == data


@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=1, max_size=80), stripes=st.integers(1, 60),
       name=st.sampled_from(["sha1", "sha256", "sha512", "md5"]))
def test_af_roundtrip(data: bytes, stripes: int, name: str) -> None:
    split = af_split(data, stripes, name)
    assert len(split) == len(data) * stripes
    assert af_merge(split, len(data), stripes, name) == data


def test_af_merge_full_stripes() -> None:
    mk = bytes(range(32))
    assert af_merge(af_split(mk, 4000, "sha256"), 32, 4000, "sha256") == mk
