"""Batched AES-CBC/XTS sector kernels shared by the LUKS and legacy qcow2 AES ciphers.

Building a ``Cipher`` per 512-byte sector costs ~20 µs (a cap of ~25 MB/s), so these
process many sectors with a handful of AES-ECB calls over the whole buffer plus big-integer
XORs; 16-byte blocks are gathered/scattered with strided ``array("Q")`` slices.  Results
are identical to per-sector CBC/XTS (tested against ``cryptography``'s modes).  Sector
``i`` of ``data`` uses the 16-byte IV/tweak ``ivs[16*i:16*i+16]``.

XTS has two kernels with the same bytes: :class:`PureXtsKernel` here (the default, capped
by CPython's big-integer conversions at ~100 MB/s) and, when numpy is importable (the
optional extra ``diskimg[fast]``), :class:`~diskimg.crypto.kernels_numpy.NumpyXtsKernel`,
several times faster and able to use two cores.  :data:`XtsKernel` is the one in use,
decided once when this module is imported.
"""

from __future__ import annotations

from array import array as _array
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
from cryptography.hazmat.primitives.ciphers import algorithms as _algorithms
from cryptography.hazmat.primitives.ciphers import modes as _modes

from diskimg.crypto import SECTOR_SIZE, KeyBuf

if TYPE_CHECKING:
    from diskimg.crypto.kernels_numpy import NumpyXtsKernel

Data = bytes | bytearray | memoryview
_BLOCKS = SECTOR_SIZE // 16  # AES blocks per sector
_QPS = SECTOR_SIZE // 8  # 64-bit words per sector
assert _array("Q").itemsize == 8


def xor_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """``a ^ b`` for equal-length byte strings."""
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _ecb(key: KeyBuf, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
    c = _Cipher(_algorithms.AES(key), _modes.ECB())
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data)


def _gather(words: _array, j: int, n: int) -> _array:  # type: ignore[type-arg]
    """Block ``j`` of each of ``n`` sectors, as 2n words."""
    out = _array("Q", bytes(16 * n))
    out[0::2] = words[2 * j::_QPS]
    out[1::2] = words[2 * j + 1::_QPS]
    return out


def _scatter(words: _array, j: int, blocks: _array) -> None:  # type: ignore[type-arg]
    words[2 * j::_QPS] = blocks[0::2]
    words[2 * j + 1::_QPS] = blocks[1::2]


#: below this many sectors one ``Cipher`` per sector is cheaper than the batched kernels
SMALL_BATCH = 12
#: sectors per pass of the pure-Python kernels: 64 KiB, whose big-integer temporaries
#: stay small (2 MiB ones cost a page fault per 4 KiB, and the kernels are 2x slower there)
PIECE_SECTORS = 128


def _per_sector(alg: _algorithms.AES, mode: type[_modes.CBC] | type[_modes.XTS], ivs: bytes,
                data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
    out = bytearray(len(data))
    src = memoryview(data)
    for i in range(len(ivs) // 16):
        c = _Cipher(alg, mode(ivs[16 * i:16 * i + 16]))
        ctx = c.encryptor() if encrypt else c.decryptor()
        a = i * SECTOR_SIZE
        out[a:a + SECTOR_SIZE] = ctx.update(src[a:a + SECTOR_SIZE])
    return bytes(out)


def _in_pieces(kernel: Callable[[KeyBuf, bytes, Data], bytes], key: KeyBuf, ivs: bytes,
               data: Data) -> bytes:
    """``kernel`` over :data:`PIECE_SECTORS` sectors at a time (small temporaries)."""
    if len(ivs) <= 16 * PIECE_SECTORS:
        return kernel(key, ivs, data)
    mv = memoryview(data)
    return b"".join(kernel(key, ivs[16 * i : 16 * (i + PIECE_SECTORS)],
                           mv[SECTOR_SIZE * i : SECTOR_SIZE * (i + PIECE_SECTORS)])
                    for i in range(0, len(ivs) // 16, PIECE_SECTORS))


def cbc_decrypt_sectors(key: KeyBuf, ivs: bytes, data: Data) -> bytes:
    """AES-CBC decryption of ``len(ivs) // 16`` sectors, sector ``i`` with IV ``ivs[i]``."""
    return _in_pieces(_cbc_decrypt, key, ivs, data)


def cbc_encrypt_sectors(key: KeyBuf, ivs: bytes, data: Data) -> bytes:
    """AES-CBC encryption of sectors; the 32 chained steps run over all sectors at once."""
    return _in_pieces(_cbc_encrypt, key, ivs, data)


def _cbc_decrypt(key: KeyBuf, ivs: bytes, data: Data) -> bytes:
    if len(ivs) < 16 * SMALL_BATCH:
        return _per_sector(_algorithms.AES(key), _modes.CBC, ivs, data, False)
    plain = _ecb(key, data, False)
    chain = _array("Q", bytes(16) + bytes(data[:-16]))  # previous ciphertext block
    ivw = _array("Q", ivs)
    chain[0::_QPS] = ivw[0::2]
    chain[1::_QPS] = ivw[1::2]
    return xor_bytes(plain, chain.tobytes())


def _cbc_encrypt(key: KeyBuf, ivs: bytes, data: Data) -> bytes:
    n = len(ivs) // 16
    if n < SMALL_BATCH:
        return _per_sector(_algorithms.AES(key), _modes.CBC, ivs, data, True)
    words = _array("Q", bytes(data))
    enc = _Cipher(_algorithms.AES(key), _modes.ECB()).encryptor()
    prev = int.from_bytes(ivs, "little")
    size = 16 * n
    for j in range(_BLOCKS):
        x = int.from_bytes(_gather(words, j, n).tobytes(), "little") ^ prev
        c = enc.update(x.to_bytes(size, "little"))
        _scatter(words, j, _array("Q", c))
        prev = int.from_bytes(c, "little")
    return words.tobytes()


def _lane_tops(n: int) -> int:
    """Bit 127 of each of ``n`` 128-bit lanes."""
    return int.from_bytes((b"\0" * 15 + b"\x80") * n, "little")


class PureXtsKernel:
    """XTS-AES (IEEE 1619) of whole sectors in place, in pure Python: the tweaks of all
    sectors are doubled together as lanes of one big integer and the data is XORed as one
    big integer; AES runs as a few ECB passes.  Any AES key size pair (so also AES-192-XTS,
    which ``cryptography``'s XTS does not offer).  Holds cipher contexts: one per thread."""

    parallel = False  # big-integer work holds the GIL: threads would only queue
    private = False  # immutable big-integer temporaries: not for key material

    def __init__(self, key: KeyBuf) -> None:
        half = len(key) // 2
        kv = memoryview(key)
        self._key = kv  # the per-sector path of small requests (cryptography's XTS)
        self._enc1 = _Cipher(_algorithms.AES(kv[:half]), _modes.ECB()).encryptor()
        self._dec1 = _Cipher(_algorithms.AES(kv[:half]), _modes.ECB()).decryptor()
        self._enc2 = _Cipher(_algorithms.AES(kv[half:]), _modes.ECB()).encryptor()
        self._small = half in (16, 32)

    def wipe(self) -> None:
        """Nothing to zero: the temporaries are immutable (see :attr:`private`)."""

    def crypt(self, ivs: bytes, buf: memoryview, encrypt: bool) -> None:
        """Encrypt/decrypt the ``len(ivs) // 16`` sectors of ``buf`` in place, sector
        ``i`` with tweak input ``ivs[16*i:16*i+16]``."""
        total = len(ivs) // 16
        for first in range(0, total, PIECE_SECTORS):
            n = min(PIECE_SECTORS, total - first)
            chunk = buf[SECTOR_SIZE * first : SECTOR_SIZE * (first + n)]
            piece_ivs = ivs[16 * first : 16 * (first + n)]
            if n < SMALL_BATCH and self._small:
                chunk[:] = _per_sector(_algorithms.AES(self._key), _modes.XTS, piece_ivs,
                                       chunk, encrypt)
            else:
                chunk[:] = self._batch(piece_ivs, chunk, encrypt)

    def _batch(self, ivs: bytes, data: memoryview, encrypt: bool) -> bytes:
        n = len(ivs) // 16
        t = int.from_bytes(self._enc2.update(ivs), "little")  # n lanes of 128 bits
        top = _lane_tops(n)
        tw = _array("Q", bytes(len(data)))
        size = 16 * n
        for j in range(_BLOCKS):
            _scatter(tw, j, _array("Q", t.to_bytes(size, "little")))
            carry = t & top
            t = ((t ^ carry) << 1) ^ ((carry >> 127) * 0x87)
        ti = int.from_bytes(tw, "little")  # converted once, used on both sides of the AES
        m = len(data)
        x = (int.from_bytes(data, "little") ^ ti).to_bytes(m, "little")
        ecb = self._enc1 if encrypt else self._dec1
        return (int.from_bytes(ecb.update(x), "little") ^ ti).to_bytes(m, "little")


XtsKernel: type[PureXtsKernel] | type[NumpyXtsKernel]
"""The XTS kernel in use: numpy's when it is importable (``diskimg[fast]``), else the
pure-Python one; decided once, here."""
try:
    from diskimg.crypto.kernels_numpy import NumpyXtsKernel as _NumpyXtsKernel
except ImportError:
    XtsKernel = PureXtsKernel
else:
    XtsKernel = _NumpyXtsKernel


def xts_sectors(key: KeyBuf, ivs: bytes, data: bytes | bytearray | memoryview,
                encrypt: bool, kernel: type[PureXtsKernel] | type[NumpyXtsKernel] | None = None
                ) -> bytes:
    """XTS-AES of whole sectors with tweaks ``ivs``, returned as new bytes (``kernel``:
    the kernel class, by default :data:`XtsKernel`)."""
    buf = bytearray(data)
    (kernel or XtsKernel)(key).crypt(ivs, memoryview(buf), encrypt)
    return bytes(buf)


__all__ = ["PIECE_SECTORS", "SMALL_BATCH", "PureXtsKernel", "XtsKernel", "cbc_decrypt_sectors",
           "cbc_encrypt_sectors", "xor_bytes", "xts_sectors"]
