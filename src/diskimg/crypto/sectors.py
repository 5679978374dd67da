"""The encrypted-payload loop shared by every format that stores guest data encrypted
sector by sector (qcow2 with ``encrypt.format=luks|aes``, the standalone ``luks`` format).

Both directions work on whole 512-byte sectors of the host file.  The IV sector of the
sector at host offset ``h`` is ``(h + iv_shift) // 512``: ``iv_shift`` is 0 when the IV
counts host sectors (qcow2 LUKS), ``guest - host`` when it counts guest sectors (legacy
qcow2 AES, the ``luks`` format whose payload starts ``payload_offset`` bytes in); it is
always a multiple of 512.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diskimg.crypto import SectorCipher
    from diskimg.hostio.host import Host

__all__ = ["CRYPT_PIECE", "encrypt_sectors", "read_decrypt"]

#: bytes en/decrypted per cipher call through a bounce buffer (a multiple of 512): big
#: enough for the cipher to split a call over two threads, small enough for the bounce
#: buffers of a write (the kernels work in their own smaller pieces)
CRYPT_PIECE = 1 << 20


def read_decrypt(src: Host, cipher: SectorCipher, host: int, iv_shift: int,
                 dst: memoryview) -> None:
    """Fill ``dst`` with the plaintext of the bytes stored encrypted at ``host`` in
    ``src``: whole sectors are read into ``dst`` and decrypted in place; a partial sector
    goes through a bounce buffer, :data:`CRYPT_PIECE` at a time."""
    d = host & 511
    if not d and not len(dst) & 511:  # whole sectors: decrypted where they are read
        src.preadinto(host, dst)
        cipher.decrypt((host + iv_shift) // 512, dst)
        return
    if not d and len(dst) > CRYPT_PIECE:
        for k in range(0, len(dst), CRYPT_PIECE):
            read_decrypt(src, cipher, host + k, iv_shift, dst[k : k + CRYPT_PIECE])
        return
    lo = host - d
    buf = bytearray(-(-(d + len(dst)) // 512) * 512)
    src.preadinto(lo, memoryview(buf))
    cipher.decrypt((lo + iv_shift) // 512, buf)
    dst[:] = memoryview(buf)[d : d + len(dst)]


def encrypt_sectors(cipher: SectorCipher, host: int, data: Any, iv_shift: int,
                    fill_plain: Callable[[memoryview], None]) -> list[tuple[int, bytearray]]:
    """The (host offset, ciphertext) pieces that store ``data`` at ``host``, whole sectors
    only.  A write that does not cover whole sectors is completed with the current
    plaintext first: ``fill_plain(buf)`` fills ``buf`` with the plaintext of the sectors
    from ``host - host % 512`` (as far as the image reaches).  Whole-sector data is
    encrypted :data:`CRYPT_PIECE` at a time, so the pieces can still go out in one
    ``pwritev``."""
    d = host & 511
    n = len(data)
    if d or n % 512:
        full = bytearray(-(-(d + n) // 512) * 512)
        fill_plain(memoryview(full))
        full[d : d + n] = data
        cipher.encrypt((host - d + iv_shift) // 512, full)
        return [(host - d, full)]
    out = []
    mv = memoryview(data)
    for k in range(0, n, CRYPT_PIECE):
        piece = bytearray(mv[k : k + CRYPT_PIECE])
        cipher.encrypt((host + k + iv_shift) // 512, piece)
        out.append((host + k, piece))
    return out
