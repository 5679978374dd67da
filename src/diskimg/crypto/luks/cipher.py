"""The LUKS data cipher: ``encrypt.*`` options -> :class:`CipherSpec` -> a
:class:`~diskimg.crypto.SectorCipher` (:class:`LuksCipher`).

AES in XTS/CBC/ECB/CTR with plain/plain64/essiv IVs, through the batched sector kernels of
:mod:`diskimg.crypto.kernels`.  The other LUKS ciphers (serpent, twofish, cast5) parse but
are refused with :class:`UnsupportedFeatureError`.  A cipher owns the only copy of its key
and can be wiped.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from diskimg.crypto import (
    HASH_NAMES,
    IVGEN_NAMES,
    SECTOR_SIZE,
    KeyBuf,
    check_sector_buffer,
    wipe,
)
from diskimg.crypto.ivgen import IVGen, make_ivgen
from diskimg.crypto.kernels import XtsKernel, cbc_decrypt_sectors, cbc_encrypt_sectors
from diskimg.crypto.luks.header import (
    CIPHER_KEY_SIZES,
    CIPHER_MODES,
    IMPLEMENTED_CIPHERS,
    CipherSpec,
)
from diskimg.errors import EncryptionError, UnsupportedFeatureError, UsageError

if TYPE_CHECKING:
    from diskimg.hostio.workers import WorkerPool

_BATCH_SECTORS = 2048  # sectors per batched AES call (1 MiB)
#: a request of at least this many sectors is shared between two threads when the
#: kernel's work releases the GIL (numpy's XTS kernel): the caller and a crypt worker take
#: pieces of :data:`SHARE_SECTORS` from one queue
PARALLEL_SECTORS = 1024
SHARE_SECTORS = 512
_CPUS = os.cpu_count() or 1
_POOL: list[WorkerPool] = []  # the one crypt worker, started on first use


def _pool() -> WorkerPool:
    if not _POOL:
        from diskimg.hostio.workers import worker_pool

        _POOL.append(worker_pool(1, "crypt"))
    return _POOL[0]


# a forked child has no worker thread behind the parent's pool: it starts its own
os.register_at_fork(after_in_child=_POOL.clear)


def equal_halves(key: KeyBuf) -> bool:
    """True for an XTS key whose two halves are equal (the crypto backend refuses it)."""
    mv = memoryview(key).cast("B")  # compares without copying the halves
    return bool(mv[:len(mv) // 2] == mv[len(mv) // 2:])


class LuksCipher:
    """Sector cipher for a LUKS volume: AES in XTS/CBC/ECB/CTR with plain/plain64/essiv IVs.

    For qcow2 the caller passes the **host** sector (host offset / 512).  The key is copied
    into a ``bytearray`` owned by the cipher; :meth:`wipe` zeroes it (and the essiv salt),
    after which every use raises :class:`EncryptionError`.
    """

    def __init__(self, spec: CipherSpec, master_key: KeyBuf) -> None:
        if spec.cipher_name not in IMPLEMENTED_CIPHERS:
            raise UnsupportedFeatureError(
                f"LUKS cipher '{spec.cipher_alg}' is not implemented (only AES)")
        if len(master_key) != spec.key_bytes:
            raise ValueError(f"master key must be {spec.key_bytes} bytes")
        self.spec = spec
        if spec.mode == "xts" and equal_halves(master_key):
            raise UnsupportedFeatureError("XTS master key with two equal halves is refused "
                                          "by the crypto backend")
        half = len(master_key) // 2 if spec.mode == "xts" else len(master_key)
        if half not in (16, 24, 32):
            raise UnsupportedFeatureError(f"bad AES key length {len(master_key)}")
        self._key = bytearray(master_key)
        self._kv = memoryview(self._key)  # slicing a view never copies the key
        self._half = half
        self._alg = algorithms.AES(self._kv[:half])
        self._ivgen: IVGen = make_ivgen(spec.ivgen, master_key=self._kv,
                                        hash_name=spec.ivgen_hash)
        self._xts: list[Any] = []  # idle XTS kernels (cipher contexts: one per thread)
        self._wiped = False

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else "keyed"
        return f"<LuksCipher {self.spec.cipher_alg}-{self.spec.mode_string} ({state})>"

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` ran: the key bytes are zero and the cipher is unusable."""
        return self._wiped

    def wipe(self) -> None:
        """Zero the master key and the essiv salt in place.  Idempotent."""
        self._xts.clear()  # drops the contexts holding key schedules
        wipe(self._key)
        self._ivgen.wipe()
        self._wiped = True

    def export_master_key(self) -> bytearray:
        """A copy of the master key for re-wrapping it in a key slot; the caller wipes it."""
        self._check_keyed()
        return bytearray(self._kv)

    def _check_keyed(self) -> None:
        if self._wiped:
            raise EncryptionError("The encryption key was wiped (image closed)")

    def _run(self, sector: int, buf: bytearray | memoryview, encrypt: bool) -> None:
        self._check_keyed()
        n = check_sector_buffer(sector, buf)
        mv = memoryview(buf).cast("B") if not isinstance(buf, bytearray) else memoryview(buf)
        mode = self.spec.mode
        if mode == "xts":
            self._run_xts(sector, mv, n, encrypt)
            return
        if mode == "ecb":
            if n:
                c = Cipher(self._alg, modes.ECB())
                ctx = c.encryptor() if encrypt else c.decryptor()
                mv[:] = ctx.update(mv)
            return
        for first in range(0, n, _BATCH_SECTORS):
            count = min(_BATCH_SECTORS, n - first)
            chunk = mv[first * SECTOR_SIZE:(first + count) * SECTOR_SIZE]
            ivs = self._ivgen.ivs(sector + first, count)
            if mode == "cbc":
                kernel = cbc_encrypt_sectors if encrypt else cbc_decrypt_sectors
                chunk[:] = kernel(self._kv, ivs, chunk)
            else:  # ctr: one keystream per sector
                for i in range(count):
                    a = i * SECTOR_SIZE
                    ctx = Cipher(self._alg, modes.CTR(ivs[16 * i:16 * i + 16])).encryptor()
                    chunk[a:a + SECTOR_SIZE] = ctx.update(chunk[a:a + SECTOR_SIZE])

    def _xts_part(self, sector: int, mv: memoryview, encrypt: bool) -> None:
        """XTS of the sectors of ``mv`` on the calling thread, with an idle kernel."""
        xts = self._xts
        kernel = xts.pop() if xts else XtsKernel(self._kv)  # list.pop is atomic
        kernel.crypt(self._ivgen.ivs(sector, len(mv) // SECTOR_SIZE), mv, encrypt)
        if not self._wiped:
            xts.append(kernel)

    def _run_xts(self, sector: int, mv: memoryview, n: int, encrypt: bool) -> None:
        if n < PARALLEL_SECTORS or not XtsKernel.parallel or _CPUS < 2:
            for first in range(0, n, _BATCH_SECTORS):
                count = min(_BATCH_SECTORS, n - first)
                self._xts_part(sector + first, mv[first * SECTOR_SIZE:(first + count)
                                                  * SECTOR_SIZE], encrypt)
            return
        # Work sharing: the caller and the crypt worker take pieces from one queue until
        # it is empty.  A worker that is slow to start (a busy machine) costs nothing: the
        # caller does its pieces and cancels it; the caller only ever waits for the one
        # piece the worker is doing.
        todo = deque(range(0, n, SHARE_SECTORS))

        def drain() -> None:
            while todo:
                try:
                    first = todo.popleft()  # atomic: each piece is taken once
                except IndexError:
                    return
                end = min(first + SHARE_SECTORS, n)
                self._xts_part(sector + first, mv[first * SECTOR_SIZE:end * SECTOR_SIZE],
                               encrypt)

        job = _pool().submit(drain)
        try:
            drain()
        finally:
            if not job.cancel():
                job.result()

    def encrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, True)

    def decrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, False)

    def crypt_private(self, sector: int, buf: bytearray | memoryview, encrypt: bool) -> None:
        """Encrypt/decrypt ``buf`` in place, one sector at a time through OpenSSL straight
        into a scratch ``bytearray`` that is wiped afterwards, so no plaintext copy is left
        behind.  Used for key material.  XTS goes through the numpy kernel when it is in
        use (in place, its scratch arrays wiped afterwards: a 4000-stripe key slot in 1 ms
        instead of 8); the pure-Python kernel goes through immutable temporaries, so it
        is only used for AES-192-XTS, which OpenSSL lacks."""
        self._check_keyed()
        n = check_sector_buffer(sector, buf)
        mode = self.spec.mode
        mv = memoryview(buf).cast("B")
        if mode == "xts" and (XtsKernel.private or self._half == 24):
            kernel = XtsKernel(self._kv)
            try:
                kernel.crypt(self._ivgen.ivs(sector, n), mv, encrypt)
            finally:
                kernel.wipe()
            return
        scratch = bytearray(SECTOR_SIZE + 16)
        try:
            ivs = self._ivgen.ivs(sector, n) if mode != "ecb" else b""
            for i in range(n):
                a = i * SECTOR_SIZE
                iv = ivs[16 * i:16 * i + 16]
                m: modes.Mode
                if mode == "xts":
                    alg = algorithms.AES(self._kv)
                    m = modes.XTS(iv)
                else:
                    alg = self._alg
                    m = (modes.ECB() if mode == "ecb" else modes.CBC(iv) if mode == "cbc"
                         else modes.CTR(iv))
                c = Cipher(alg, m)
                ctx = c.encryptor() if encrypt else c.decryptor()
                got = ctx.update_into(mv[a:a + SECTOR_SIZE], scratch)
                assert got == SECTOR_SIZE
                mv[a:a + SECTOR_SIZE] = memoryview(scratch)[:SECTOR_SIZE]
                ctx.finalize()
        finally:
            wipe(scratch)


_OPTION_KEYS = ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
                "iter-time")


def spec_from_options(options: Mapping[str, Any]) -> tuple[CipherSpec, str]:
    """QEMU ``encrypt.*`` options (without the ``encrypt.`` prefix) -> (spec, hash-alg).

    Defaults are qemu's: aes-256, xts, plain64, hash sha256; essiv defaults its hash to
    sha256.  ``ivgen-hash-alg`` given with plain/plain64 is written into the header as qemu
    does (``xts-plain64:sha1``) but otherwise unused.
    """
    opts = {k.removeprefix("encrypt."): v for k, v in options.items()}
    unknown = set(opts) - set(_OPTION_KEYS) - {"format", "key-secret"}
    if unknown:
        raise UsageError(f"Invalid parameter '{sorted(unknown)[0]}'")
    alg = str(opts.get("cipher-alg", "aes-256"))
    mode = str(opts.get("cipher-mode", "xts"))
    ivgen = str(opts.get("ivgen-alg", "plain64"))
    ivhash = opts.get("ivgen-hash-alg")
    hash_alg = str(opts.get("hash-alg", "sha256"))
    try:
        cname, bits_s = alg.rsplit("-", 1)
        bits = int(bits_s)
    except ValueError:
        raise UsageError(f"Parameter 'cipher-alg' does not accept value '{alg}'") from None
    if cname not in CIPHER_KEY_SIZES or bits // 8 not in CIPHER_KEY_SIZES[cname] or bits % 8:
        raise UsageError(f"Parameter 'cipher-alg' does not accept value '{alg}'")
    if mode not in CIPHER_MODES:
        raise UsageError(f"Parameter 'cipher-mode' does not accept value '{mode}'")
    if ivgen not in IVGEN_NAMES:
        raise UsageError(f"Parameter 'ivgen-alg' does not accept value '{ivgen}'")
    if hash_alg not in HASH_NAMES:
        raise UsageError(f"Parameter 'hash-alg' does not accept value '{hash_alg}'")
    if ivhash is not None and str(ivhash) not in HASH_NAMES:
        raise UsageError(f"Parameter 'ivgen-hash-alg' does not accept value '{ivhash}'")
    if ivgen == "essiv" and ivhash is None:
        ivhash = "sha256"
    if cname not in IMPLEMENTED_CIPHERS:
        raise UnsupportedFeatureError(f"LUKS cipher '{alg}' is not implemented (only AES)")
    key_bytes = bits // 8 * (2 if mode == "xts" else 1)
    spec = CipherSpec(cname, mode, ivgen, str(ivhash) if ivhash is not None else None,
                      key_bytes)
    if ivgen == "essiv":
        make_ivgen("essiv", master_key=bytes(key_bytes), hash_name=spec.ivgen_hash)
    return spec, hash_alg


__all__ = ["IMPLEMENTED_CIPHERS", "LuksCipher", "spec_from_options"]
