"""The LUKS anti-forensic splitter (AF split/merge with the diffusion function H1).

A key of ``n`` bytes becomes ``n * stripes`` bytes: stripes 1..k-1 random, ``d`` starting at
zeros and becoming ``H1(d ^ s_i)`` after each, the last stripe ``d ^ key``.  Recovering the
key needs every stripe, so destroying any part of the stored material destroys the key.
Only ``hashlib``; intermediates are ``bytearray`` s that are wiped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from diskimg.crypto import HASH_NAMES, KeyBuf, wipe
from diskimg.errors import UnsupportedFeatureError

_DIGEST_SIZES: dict[str, int] = {}
_HASH_PROTOS: dict[str, Any] = {}  # empty hash objects to copy (cheaper than hashlib.new)


def _digest_size(hash_name: str) -> int:
    if hash_name in _DIGEST_SIZES:
        return _DIGEST_SIZES[hash_name]
    if hash_name not in HASH_NAMES:
        raise UnsupportedFeatureError(f"hash algorithm '{hash_name}' is not supported")
    try:
        size = _DIGEST_SIZES[hash_name] = hashlib.new(HASH_NAMES[hash_name]).digest_size
        return size
    except ValueError as err:
        raise UnsupportedFeatureError(f"hash algorithm '{hash_name}' is not available") \
            from err


def _diffuse_into(block: bytearray | memoryview, hash_name: str) -> None:
    """LUKS H1 in place: piece i (digest-sized, last one shorter) becomes
    ``H(be32(i) || piece)`` truncated to the piece's length."""
    hlen = _digest_size(hash_name)
    proto = _HASH_PROTOS.get(hash_name)
    if proto is None:
        proto = _HASH_PROTOS[hash_name] = hashlib.new(HASH_NAMES[hash_name])
    mv = memoryview(block).cast("B")
    for i, start in enumerate(range(0, len(mv), hlen)):
        n = min(hlen, len(mv) - start)
        h = proto.copy()
        h.update(i.to_bytes(4, "big"))
        h.update(mv[start:start + n])
        mv[start:start + n] = memoryview(h.digest())[:n]


def _diffuse(block: bytes | bytearray, hash_name: str) -> bytes:
    """LUKS H1 of ``block`` (a copy; see :func:`_diffuse_into`)."""
    out = bytearray(block)
    _diffuse_into(out, hash_name)
    return bytes(out)


def _xor_into(dst: bytearray | memoryview, src: bytes | bytearray | memoryview) -> None:
    """``dst ^= src`` byte by byte.  Slow-ish on purpose: every intermediate is a cached
    small int, so no copy of key-derived bytes is left in freed memory."""
    for i, x in enumerate(src):
        dst[i] ^= x


def af_split(data: KeyBuf, stripes: int, hash_name: str,
             random: Callable[[int], bytes] = os.urandom) -> bytearray:
    """Anti-forensic split of ``data`` into ``len(data) * stripes`` bytes.

    Stripes 1..n-1 are random; ``d`` starts at zeros and becomes ``H1(d ^ s_k)`` after each;
    the last stripe is ``d ^ data``.  The result is key-equivalent: encrypt it in place and
    :func:`wipe` what is not written.
    """
    if stripes < 1:
        raise ValueError("stripes must be >= 1")
    n = len(data)
    _digest_size(hash_name)
    out = bytearray(n * stripes)
    mv = memoryview(out)
    d = bytearray(n)
    try:
        for k in range(stripes - 1):
            s = random(n)
            mv[k * n:(k + 1) * n] = s
            _xor_into(d, s)
            _diffuse_into(d, hash_name)
        last = mv[(stripes - 1) * n:]
        last[:] = d
        _xor_into(last, memoryview(data).cast("B"))
    finally:
        wipe(d)
    return out


def af_merge(material: bytes | bytearray | memoryview, key_len: int, stripes: int,
             hash_name: str) -> bytearray:
    """Inverse of :func:`af_split`: recover ``key_len`` bytes from the split material
    (a fresh ``bytearray`` the caller wipes)."""
    if len(material) < key_len * stripes:
        raise ValueError("split material shorter than key_len * stripes")
    _digest_size(hash_name)
    mv = memoryview(material).cast("B")
    d = bytearray(key_len)
    for k in range(stripes - 1):
        _xor_into(d, mv[k * key_len:(k + 1) * key_len])
        _diffuse_into(d, hash_name)
    _xor_into(d, mv[(stripes - 1) * key_len:stripes * key_len])
    return d


__all__ = ["af_merge", "af_split"]
