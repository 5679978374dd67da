"""The XTS sector kernel with numpy (the optional extra ``diskimg[fast]``).

Same bytes as the pure-Python kernel of :mod:`diskimg.crypto.kernels`, which selects this
one at import time when numpy is importable.  XTS-AES (IEEE 1619) of sector ``i`` with
tweak ``T_i = AES_k2(iv_i)`` XORs block ``j`` with ``T_i * alpha^j`` in GF(2^128) before
and after ``AES_k1``.  Here every ``T_i * alpha^j`` of a piece is computed at once as two
64-bit halves: ``(T << j) mod P`` is ``T << j`` with the ``j`` bits shifted out of the top
(``h``) folded back in as ``h * (x^7 + x^2 + x + 1)`` (four XORs: ``h < 2^31`` never
overflows the low half), no step depending on another block's result, each one numpy pass
over a planar array (low/high halves apart); the last step of each half writes the masks
in the data's own layout, so both XORs with the data are contiguous passes (a strided XOR
through a transposed view took twice as long).  The AES passes are ``cryptography``'s ECB
contexts writing into preallocated buffers; numpy's XORs and OpenSSL's AES both release
the GIL, so two threads with a kernel each use two cores.  A kernel is not thread-safe:
one per thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import SECTOR_SIZE, KeyBuf

_U64 = np.dtype("<u8")
_COLS = SECTOR_SIZE // 16  # AES blocks per sector
#: sectors per pass: the masks and scratch arrays (~1.5 MiB a kernel) stay in the L2 cache
PIECE_SECTORS = 512
# Shift amounts as whole arrays shaped like the work, (half, sector, block): numpy shifts two
# contiguous arrays several times faster than it broadcasts a 32-long row over each sector.
_J = np.empty((2, PIECE_SECTORS, _COLS), _U64)
_J[...] = np.arange(_COLS, dtype=_U64)  # block index j
# x >> (64 - j): what a shift by j moves out of a half; for j == 0 a shift by 64, which
# numpy defines as 0 for unsigned types (>= 1.17: no C undefined behaviour)
_S = np.uint64(64) - _J
if np.right_shift(np.uint64(1 << 63), np.uint64(64)) != 0:  # never with numpy >= 1.17
    raise ImportError("numpy's shifts by 64 bits are not 0: the pure-Python kernel is used")


class NumpyXtsKernel:
    """XTS over whole sectors, in place; any AES key size pair (also AES-192-XTS)."""

    parallel = True  # the work releases the GIL: worth splitting over threads
    #: no copy of the data outside the caller's buffer but this kernel's scratch arrays,
    #: which :meth:`wipe` zeroes: fit for key material
    private = True

    def __init__(self, key: KeyBuf) -> None:
        half = len(key) // 2
        k1, k2 = memoryview(key)[:half], memoryview(key)[half:]
        self._enc1 = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
        self._dec1 = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
        self._enc2 = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
        n = PIECE_SECTORS
        # planar (low/high 64 bits, sector, block): every step is one contiguous pass
        self._shifted = np.empty((2, n, _COLS), _U64)
        self._out_bits = np.empty((2, n, _COLS), _U64)
        # the masks as the data lays them out (sector, block, half): XORed contiguously
        self._masks = np.empty((n, _COLS, 2), _U64)
        self._tweaks = bytearray(16 * n + 16)  # update_into wants a block of slack
        self._out = bytearray(SECTOR_SIZE * n + 16)
        self._out64 = np.frombuffer(self._out, _U64, count=SECTOR_SIZE * n // 8)

    def _mask(self, ivs: memoryview, n: int) -> Any:
        """``T_i * alpha^j`` for the ``n`` tweaks ``ivs``, flat in the data's layout: computed
        planar (``[half, i, j]``), the last step of each half writing its strided view of
        :attr:`_masks`."""
        self._enc2.update_into(ivs, self._tweaks)
        t = np.frombuffer(self._tweaks, _U64, count=2 * n).reshape(n, 2)
        m = self._shifted[:, :n]  # T << j, per half
        r = self._out_bits[:, :n]  # what a shift by j moves out of each half
        np.copyto(r, t.T[:, :, None])
        np.left_shift(r, _J[:, :n], out=m)
        np.right_shift(r, _S[:, :n], out=r)
        lo, hi = m[0], m[1]
        carry, h = r[0], r[1]  # lo >> (64 - j) moves into hi; h leaves the top
        out = self._masks[:n]
        np.bitwise_or(hi, carry, out=out[..., 1])
        np.bitwise_xor(lo, h, out=lo)
        for k in (1, 2, 7):  # h * (x^7 + x^2 + x + 1), carry-less: h < 2^31 never overflows
            np.left_shift(h, k, out=carry)
            np.bitwise_xor(lo, carry, out=out[..., 0] if k == 7 else lo)
        return out.reshape(-1)

    def wipe(self) -> None:
        """Zero the scratch arrays (tweak masks, the last piece's AES output)."""
        for a in (self._shifted, self._out_bits, self._masks):
            a.fill(0)
        self._tweaks[:] = bytes(len(self._tweaks))
        self._out[:] = bytes(len(self._out))

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
