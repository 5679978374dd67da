"""The LUKS anti-forensic splitter (AF split/merge with the diffusion function H1).

A key of ``n`` bytes becomes ``n * stripes`` bytes: stripes 1..k-1 random, ``d`` starting at
zeros and becoming ``H1(d ^ s_i)`` after each, the last stripe ``d ^ key``.  Recovering the
key needs every stripe, so destroying any part of the stored material destroys the key.
Only ``hashlib``.  The chain's intermediates are hash outputs (immutable ``bytes`` from
``hashlib``, never scrubbable) and integers one XOR away from them; the key itself is only
formed in place in the ``bytearray`` that is returned.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from diskimg.crypto import HASH_NAMES, KeyBuf
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


def _xor_into(dst: bytearray | memoryview, src: bytes | bytearray | memoryview) -> None:
    """``dst ^= src`` byte by byte.  Slow-ish on purpose: every intermediate is a cached
    small int, so no copy of key-derived bytes is left in freed memory."""
    for i, x in enumerate(src):
        dst[i] ^= x


def _protos(n: int, hash_name: str) -> list[tuple[Any, int, int]]:
    """For H1 over ``n`` bytes: per piece, a hash already fed ``be32(i)`` and the piece's
    start and length."""
    hlen = _digest_size(hash_name)
    proto = _HASH_PROTOS.get(hash_name)
    if proto is None:
        proto = _HASH_PROTOS[hash_name] = hashlib.new(HASH_NAMES[hash_name])
    out = []
    for i, start in enumerate(range(0, n, hlen)):
        h = proto.copy()
        h.update(i.to_bytes(4, "big"))
        out.append((h, start, min(hlen, n - start)))
    return out


def _h1(protos: list[tuple[Any, int, int]], block: bytes) -> bytes:
    """LUKS H1: piece ``i`` (digest-sized, the last one shorter) becomes
    ``H(be32(i) || piece)`` truncated to the piece's length (``protos``: :func:`_protos`)."""
    parts = []
    for proto, start, size in protos:
        h = proto.copy()
        h.update(block[start:start + size])
        parts.append(h.digest()[:size])
    return b"".join(parts)


def _diffuse(block: bytes | bytearray, hash_name: str) -> bytes:
    """LUKS H1 of ``block``."""
    return _h1(_protos(len(block), hash_name), bytes(block))


def _chain(stripes: memoryview, n: int, count: int, hash_name: str) -> int:
    """``d`` after the first ``count`` stripes of ``stripes`` (``d = H1(d ^ s_k)`` from
    zeros), as a little-endian integer.

    One integer XOR and one hash per digest-sized piece a stripe (4000 stripes of a 64-byte
    key: ~10 ms instead of the ~60 ms of byte-by-byte XORs).  Every intermediate is a hash
    output or a hash input one XOR away from it: ``hashlib`` returns digests as immutable
    ``bytes``, so these were never scrubbable; the key itself is only formed in the
    ``bytearray`` the callers return (:func:`_xor_into`)."""
    protos = _protos(n, hash_name)
    d = 0
    for k in range(count):
        x = (d ^ int.from_bytes(stripes[k * n:(k + 1) * n], "little")).to_bytes(n, "little")
        d = int.from_bytes(_h1(protos, x), "little")
    return d


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
    for k in range(stripes - 1):
        mv[k * n:(k + 1) * n] = random(n)
    last = mv[(stripes - 1) * n:]
    last[:] = _chain(mv, n, stripes - 1, hash_name).to_bytes(n, "little")
    _xor_into(last, memoryview(data).cast("B"))
    return out


def af_merge(material: bytes | bytearray | memoryview, key_len: int, stripes: int,
             hash_name: str) -> bytearray:
    """Inverse of :func:`af_split`: recover ``key_len`` bytes from the split material
    (a fresh ``bytearray`` the caller wipes)."""
    if len(material) < key_len * stripes:
        raise ValueError("split material shorter than key_len * stripes")
    _digest_size(hash_name)
    mv = memoryview(material).cast("B")
    d = bytearray(_chain(mv, key_len, stripes - 1, hash_name).to_bytes(key_len, "little"))
    _xor_into(d, mv[(stripes - 1) * key_len:stripes * key_len])
    return d


__all__ = ["af_merge", "af_split"]
