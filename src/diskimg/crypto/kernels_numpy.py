"""The XTS sector kernel with numpy (the optional extra ``diskimg[fast]``).

Same bytes as the pure-Python kernel of :mod:`diskimg.crypto.kernels`, which selects this
one at import time when numpy is importable.  XTS-AES (IEEE 1619) of sector ``i`` with
tweak ``T_i = AES_k2(iv_i)`` XORs block ``j`` with ``T_i * alpha^j`` in GF(2^128) before
and after ``AES_k1``.  Here every ``T_i * alpha^j`` of a piece is computed at once as two
64-bit halves: ``(T << j) mod P`` is ``T << j`` with the ``j`` bits shifted out of the top
(``h``) folded back in as ``h * (x^7 + x^2 + x + 1)`` (four XORs: ``h < 2^31`` never
overflows the low half).  The AES passes are ``cryptography``'s ECB contexts writing into
preallocated buffers; numpy's XORs and OpenSSL's AES both release the GIL, so two threads
with a kernel each use two cores.  A kernel is not thread-safe: one per thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import SECTOR_SIZE, KeyBuf

_U64 = np.dtype("<u8")
_COLS = SECTOR_SIZE // 16  # AES blocks per sector
_J = np.arange(_COLS, dtype=_U64)  # block index j of each column
_S = np.uint64(63) - _J  # (x >> 1) >> (63 - j) == x >> (64 - j), also for j == 0
#: sectors per pass: the masks (n x 512 bytes) and the AES output stay in the L2 cache
PIECE_SECTORS = 256


class NumpyXtsKernel:
    """XTS over whole sectors, in place; any AES key size pair (also AES-192-XTS)."""

    parallel = True  # the work releases the GIL: worth splitting over threads

    def __init__(self, key: KeyBuf) -> None:
        half = len(key) // 2
        k1, k2 = memoryview(key)[:half], memoryview(key)[half:]
        self._enc1 = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
        self._dec1 = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
        self._enc2 = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
        n = PIECE_SECTORS
        self._masks = np.empty((n, _COLS, 2), _U64)
        self._h = np.empty((n, _COLS), _U64)
        self._tmp = np.empty((n, _COLS), _U64)
        self._tweaks = bytearray(16 * n + 16)  # update_into wants a block of slack
        self._out = bytearray(SECTOR_SIZE * n + 16)
        self._out64 = np.frombuffer(self._out, _U64, count=SECTOR_SIZE * n // 8)

    def _mask(self, ivs: memoryview, n: int) -> Any:
        """``T_i * alpha^j`` for the ``n`` tweaks ``ivs``, laid out like the sectors."""
        self._enc2.update_into(ivs, self._tweaks)
        t = np.frombuffer(self._tweaks, _U64, count=2 * n).reshape(n, 2)
        lo_t, hi_t = t[:, 0:1], t[:, 1:2]
        m = self._masks[:n]
        lo, hi = m[:, :, 0], m[:, :, 1]
        h, tmp = self._h[:n], self._tmp[:n]
        one = tmp[:, :1]
        np.right_shift(hi_t, 1, out=one)
        np.right_shift(one, _S, out=h)  # h = hi >> (64 - j): the bits shifted out
        np.right_shift(lo_t, 1, out=one)
        np.right_shift(one, _S, out=hi)  # lo >> (64 - j): what moves into the high half
        np.left_shift(hi_t, _J, out=tmp)
        np.bitwise_or(hi, tmp, out=hi)
        np.left_shift(lo_t, _J, out=lo)
        np.bitwise_xor(lo, h, out=lo)
        for k in (1, 2, 7):  # h * (x^7 + x^2 + x + 1), carry-less
            np.left_shift(h, k, out=tmp)
            np.bitwise_xor(lo, tmp, out=lo)
        return m.reshape(-1)

    def crypt(self, ivs: bytes, buf: memoryview, encrypt: bool) -> None:
        """Encrypt/decrypt the ``len(ivs) // 16`` sectors of ``buf`` in place, sector
        ``i`` with tweak input ``ivs[16*i:16*i+16]``."""
        ecb = self._enc1 if encrypt else self._dec1
        iv = memoryview(ivs)
        total = len(ivs) // 16
        for first in range(0, total, PIECE_SECTORS):
            n = min(PIECE_SECTORS, total - first)
            mask = self._mask(iv[16 * first : 16 * (first + n)], n)
            chunk = buf[SECTOR_SIZE * first : SECTOR_SIZE * (first + n)]
            data = np.frombuffer(chunk, _U64)
            np.bitwise_xor(data, mask, out=data)
            ecb.update_into(chunk, self._out)
            np.bitwise_xor(self._out64[: 64 * n], mask, out=data)


__all__ = ["PIECE_SECTORS", "NumpyXtsKernel"]
