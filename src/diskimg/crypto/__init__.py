"""Sector ciphers for encrypted images.

Every cipher here works on whole 512-byte sectors, in place::

    cipher.encrypt(sector, buf)   # buf: bytearray or writable memoryview, len % 512 == 0
    cipher.decrypt(sector, buf)

``sector`` is the number of the first 512-byte sector of ``buf`` *as the IV generator sees
it*; the following sectors of ``buf`` use ``sector + 1``, ``sector + 2``, ...  Which number a
qcow2 image passes is the caller's business, and differs by format (verified against
qemu-img/qemu-io 7.2):

* legacy qcow2 AES (``crypt_method=1``): the **guest** offset / 512;
* LUKS in qcow2 (``crypt_method=2``): the **host** offset / 512 of the data in the image
  file (QEMU's ``crypt_physical_offset``), i.e. the cluster's host offset plus the offset
  inside the cluster.

Modules: :mod:`.ivgen` (plain, plain64, essiv), :mod:`.qcow_aes` (legacy AES),
:mod:`.luks` (the LUKS1 package: header, kdf, af, cipher, keyslots, create),
:mod:`.kernels` (the batched AES-CBC/XTS sector kernels both ciphers use).  This module
imports no ``cryptography``: the LUKS header layout (and ``qemu-img measure``) need none.

Integration API for qcow2::

    cipher = QcowAesCipher.from_passphrase(secret)            # crypt_method 1
    off, length = luks.parse_fde_extension(ext_data, cluster_size, file_size)
    cipher, payload = luks.open_luks(area_bytes, secret)      # crypt_method 2
    area_bytes, cipher = luks.create_luks(secret, {"cipher-alg": ...}, iter_time_ms)
    info["encrypt"] = luks.luks_info(area_bytes[:592])        # no secret needed
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

    from diskimg.crypto.kernels import (
        cbc_decrypt_sectors,
        cbc_encrypt_sectors,
        xor_bytes,
        xts_sectors,
    )

SECTOR_SIZE = 512
#: key arguments: a ``memoryview`` of a key ``bytearray`` slices without copying the key
KeyBuf = bytes | bytearray | memoryview

#: IV generator names QEMU knows (:mod:`.ivgen` implements them)
IVGEN_NAMES = ("plain", "plain64", "essiv")
#: hash names QEMU accepts (LUKS ``hash-spec`` field, ``ivgen-hash-alg``) -> hashlib names
HASH_NAMES = {
    "md5": "md5",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
}


@runtime_checkable
class SectorCipher(Protocol):
    """Encrypts/decrypts whole 512-byte sectors in place."""

    def encrypt(self, sector: int, buf: bytearray | memoryview) -> None: ...

    def decrypt(self, sector: int, buf: bytearray | memoryview) -> None: ...

    def wipe(self) -> None:
        """Zero the key material in place; every later encrypt/decrypt fails."""


def wipe(*bufs: bytearray | memoryview | None) -> None:
    """Overwrite each writable buffer with zeros in place (keys that are no longer needed).

    Only mutable buffers can be scrubbed: ``bytes`` objects (what ``hashlib``, ``os.urandom``
    and most of ``cryptography`` return) are immutable and stay in freed memory until it is
    reused.  ``None`` entries are skipped, so ``finally: wipe(a, b)`` needs no guards."""
    for b in bufs:
        if b is None:
            continue
        mv = memoryview(b)
        if mv.readonly:
            raise TypeError("cannot wipe a read-only buffer")
        mv = mv.cast("B")
        mv[:] = bytes(len(mv))


def check_sector_buffer(sector: int, buf: bytearray | memoryview) -> int:
    """Validate arguments of encrypt/decrypt; return the number of sectors in ``buf``."""
    n = len(buf)
    if n % SECTOR_SIZE:
        raise ValueError(f"encrypted I/O must be a multiple of {SECTOR_SIZE} bytes, got {n}")
    if sector < 0:
        raise ValueError(f"negative sector number {sector}")
    if isinstance(buf, memoryview) and buf.readonly:
        raise TypeError("buffer is read-only")
    return n // SECTOR_SIZE


def preload_kernels() -> Callable[[], None]:
    """Start importing the sector kernels (:mod:`.kernels`: ``cryptography``'s ciphers and,
    with ``diskimg[fast]``, numpy: ~50 ms of imports) on a thread, for a caller about to
    spend a while without the GIL (a key slot's PBKDF2 run).  The import is the ordinary
    one: whoever imports the module next waits for it to finish (Python's per-module
    import lock), and a failure is left for that import to raise.  Returns the function
    that waits for the thread: call it before returning, also on errors, so no import
    is left running (a no-op when the kernels were loaded already)."""
    import sys

    if "diskimg.crypto.kernels" in sys.modules:
        return _loaded
    import threading

    def load() -> None:
        try:
            import diskimg.crypto.kernels  # noqa: F401
        except BaseException:  # raised again by the caller's own import
            pass

    t = threading.Thread(target=load, name="diskimg-preload", daemon=True)
    t.start()
    return t.join


def _loaded() -> None:
    """:func:`preload_kernels`' wait when there was nothing to load."""


_KERNELS = ("cbc_decrypt_sectors", "cbc_encrypt_sectors", "xor_bytes", "xts_sectors")


def __getattr__(name: str) -> object:
    """The sector kernels (which need ``cryptography``) under their old names, imported on
    first use."""
    if name in _KERNELS:
        import importlib

        return getattr(importlib.import_module("diskimg.crypto.kernels"), name)
    raise AttributeError(f"module 'diskimg.crypto' has no attribute '{name}'")


__all__ = ["HASH_NAMES", "IVGEN_NAMES", "SECTOR_SIZE", "SectorCipher", "cbc_decrypt_sectors",
           "cbc_encrypt_sectors", "check_sector_buffer", "preload_kernels", "wipe", "xor_bytes",
           "xts_sectors"]
