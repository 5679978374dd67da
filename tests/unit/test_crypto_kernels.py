"""diskimg.crypto.kernels: the batched AES-CBC/XTS sector kernels equal per-sector
``cryptography`` modes (and AES-192-XTS built from single AES blocks).  Both XTS kernels,
the pure-Python default and numpy's (``diskimg[fast]``), give the same bytes: hypothesis
runs them on random keys, tweaks, sector numbers and data against ``cryptography``'s XTS;
the kernel in use is numpy's when it is importable and the pure one when numpy is blocked
(a subprocess), and a LUKS cipher splitting a big request over two threads writes the
same bytes as one sector at a time.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from diskimg.crypto import (
    cbc_decrypt_sectors,
    cbc_encrypt_sectors,
    xts_sectors,
)
from diskimg.crypto.ivgen import counter_ivs
from diskimg.crypto.kernels import PIECE_SECTORS, PureXtsKernel, XtsKernel

try:
    from diskimg.crypto.kernels_numpy import PIECE_SECTORS as NP_PIECE_SECTORS
    from diskimg.crypto.kernels_numpy import NumpyXtsKernel
except ImportError:  # numpy is an optional extra; the test extra installs it
    NumpyXtsKernel = None  # type: ignore[assignment,misc]
    NP_PIECE_SECTORS = 256

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _h(b: bytes | bytearray) -> str:
    """sha256 of big buffers: a failing comparison prints two digests, not a 100 KiB diff."""
    return hashlib.sha256(b).hexdigest()
needs_numpy = pytest.mark.skipif(NumpyXtsKernel is None, reason="numpy not installed")
KERNELS: list[Any] = [PureXtsKernel, pytest.param(NumpyXtsKernel, marks=needs_numpy)]

# --- ciphers ---------------------------------------------------------------------------------

def _pattern(n: int, mul: int = 31) -> bytes:
    return bytes((i * mul + i // 251) & 0xFF for i in range(n))


@pytest.mark.parametrize("kernel", KERNELS, ids=["pure", "numpy"])
@pytest.mark.parametrize("nsect", [1, 2, 7, 11, 12, 64])
@pytest.mark.parametrize("key_len", [32, 64])
def test_batched_xts_equals_cryptography(key_len: int, nsect: int, kernel: Any) -> None:
    key = _pattern(key_len, 13)
    ivs = b"".join((1000 + i).to_bytes(8, "little") + bytes(8) for i in range(nsect))
    ivs = bytes(ivs[:-16]) + b"\xff" * 16  # a tweak with the top bit set (carry path)
    data = _pattern(512 * nsect)
    ref = b"".join(Cipher(algorithms.AES(key), modes.XTS(ivs[16 * i:16 * i + 16]))
                   .encryptor().update(data[512 * i:512 * i + 512]) for i in range(nsect))
    assert xts_sectors(key, ivs, data, True, kernel) == ref
    assert xts_sectors(key, ivs, ref, False, kernel) == data


def _xts_by_definition(key: bytes, ivs: bytes, data: bytes) -> bytes:
    """IEEE 1619 XTS-AES from single AES blocks and a bit-by-bit GF(2^128) doubling."""
    half = len(key) // 2
    k1 = Cipher(algorithms.AES(key[:half]), modes.ECB())
    k2 = Cipher(algorithms.AES(key[half:]), modes.ECB())
    ref = bytearray()
    for i in range(len(ivs) // 16):
        t = int.from_bytes(k2.encryptor().update(ivs[16 * i:16 * i + 16]), "little")
        for j in range(32):
            blk = data[512 * i + 16 * j:512 * i + 16 * j + 16]
            tb = t.to_bytes(16, "little")
            x = bytes(a ^ b for a, b in zip(blk, tb, strict=True))
            y = k1.encryptor().update(x)
            ref += bytes(a ^ b for a, b in zip(y, tb, strict=True))
            t <<= 1
            if t >> 128:
                t = (t & ((1 << 128) - 1)) ^ 0x87
    return bytes(ref)


@pytest.mark.parametrize("kernel", KERNELS, ids=["pure", "numpy"])
@pytest.mark.parametrize("nsect", [1, 12, 40])
def test_batched_xts_aes192_matches_aes_definition(nsect: int, kernel: Any) -> None:
    """AES-192-XTS (no cryptography XTS for it) equals XTS built from single AES blocks."""
    key = _pattern(48, 13)
    ivs = _pattern(16 * nsect, 7)
    data = _pattern(512 * nsect)
    ref = _xts_by_definition(key, ivs, data)
    assert xts_sectors(key, ivs, data, True, kernel) == ref
    assert xts_sectors(key, ivs, ref, False, kernel) == data


@pytest.mark.parametrize("nsect", [1, 3, 12, 64])
@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_batched_cbc_equals_cryptography(key_len: int, nsect: int) -> None:
    key = _pattern(key_len, 17)
    ivs = _pattern(16 * nsect, 101)
    data = _pattern(512 * nsect)
    ref = b"".join(Cipher(algorithms.AES(key), modes.CBC(ivs[16 * i:16 * i + 16]))
                   .encryptor().update(data[512 * i:512 * i + 512]) for i in range(nsect))
    assert cbc_encrypt_sectors(key, ivs, data) == ref
    assert cbc_decrypt_sectors(key, ivs, ref) == data


# --- the two XTS kernels: same bytes ------------------------------------------------------

def _reference_xts(key: bytes, ivs: bytes, data: bytes, encrypt: bool) -> bytes:
    """``cryptography``'s XTS, one ``Cipher`` per sector (AES-128/256 key pairs)."""
    out = []
    for i in range(len(ivs) // 16):
        c = Cipher(algorithms.AES(key), modes.XTS(ivs[16 * i:16 * i + 16]))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out.append(ctx.update(data[512 * i:512 * i + 512]))
    return b"".join(out)


#: sector counts around every piece boundary of both kernels
_COUNTS = st.sampled_from([1, 2, 11, 12, 13, PIECE_SECTORS - 1, PIECE_SECTORS,
                           PIECE_SECTORS + 1, NP_PIECE_SECTORS + 3, 2 * NP_PIECE_SECTORS + 1])


@given(key_len=st.sampled_from([32, 48, 64]), seed=st.integers(0, 2**32 - 1),
       nsect=st.one_of(_COUNTS, st.integers(1, 300)),
       first=st.one_of(st.integers(0, 2**20), st.integers(2**64 - 400, 2**64 - 1)),
       counter=st.booleans(), encrypt=st.booleans())
def test_xts_kernels_agree_with_cryptography(key_len: int, seed: int, nsect: int, first: int,
                                             counter: bool, encrypt: bool) -> None:
    """Pure and numpy kernels on random keys/data, plain64 tweaks (also wrapping past
    2^64) or random 16-byte tweaks (top bits set: the GF(2^128) carry), in place."""
    rnd = random.Random(seed)
    key = rnd.randbytes(key_len)
    if key[:key_len // 2] == key[key_len // 2:]:
        key = bytes(key_len // 2) + b"\x01" * (key_len // 2)
    ivs = counter_ivs(first, nsect, 8, 16) if counter else rnd.randbytes(16 * nsect)
    data = rnd.randbytes(512 * nsect)
    if key_len == 48:  # no AES-192-XTS in cryptography: the definition, on a few sectors
        k = min(nsect, 3)
        ref_head = _xts_by_definition(key, ivs[:16 * k], data[:512 * k]) if encrypt else None
    got = []
    for kernel in (PureXtsKernel, NumpyXtsKernel):
        if kernel is None:
            continue
        buf = bytearray(data)
        kernel(key).crypt(ivs, memoryview(buf), encrypt)
        got.append(bytes(buf))
        back = bytearray(buf)
        kernel(key).crypt(ivs, memoryview(back), not encrypt)
        assert _h(back) == _h(data)
    assert [_h(g) for g in got] == [_h(got[0])] * len(got)
    if key_len == 48:
        if ref_head is not None:
            assert _h(got[0][:512 * k]) == _h(ref_head)
    else:
        assert _h(got[0]) == _h(_reference_xts(key, ivs, data, encrypt))


@needs_numpy
def test_numpy_kernel_is_the_default_when_importable() -> None:
    assert XtsKernel is NumpyXtsKernel


def test_pure_kernel_without_numpy() -> None:
    """numpy blocked (``sys.modules['numpy'] = None``, as if not installed): importing the
    kernels does not fail, picks the pure-Python kernel, a LUKS cipher decrypts a big
    request (the parallel size) to the bytes of ``cryptography``'s XTS, and numpy was
    never imported."""
    code = textwrap.dedent('''
        import sys
        sys.modules["numpy"] = None
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from diskimg.crypto import kernels
        from diskimg.crypto.luks.cipher import PARALLEL_SECTORS, LuksCipher
        from diskimg.crypto.luks.header import CipherSpec
        assert kernels.XtsKernel is kernels.PureXtsKernel, kernels.XtsKernel
        key = bytes(range(64))
        n = PARALLEL_SECTORS + 3
        data = bytes((i * 7 + i // 509) & 255 for i in range(512 * n))
        buf = bytearray(data)
        LuksCipher(CipherSpec("aes", "xts", "plain64", None, 64), key).encrypt(77, buf)
        ref = b"".join(Cipher(algorithms.AES(key), modes.XTS((77 + i).to_bytes(16, "little")))
                       .encryptor().update(data[512 * i:512 * i + 512]) for i in range(n))
        assert buf == ref
        assert sys.modules["numpy"] is None
        print("pure ok")
    ''')
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "pure ok"


def _luks_cipher(key: bytes, ivgen: str = "plain64") -> Any:
    from diskimg.crypto.luks.cipher import LuksCipher
    from diskimg.crypto.luks.header import CipherSpec

    return LuksCipher(CipherSpec("aes", "xts", ivgen, "sha256" if ivgen == "essiv" else None,
                                 len(key)), key)


@pytest.mark.parametrize(("key_len", "ivgen"), [(64, "plain64"), (32, "plain"), (48, "essiv")])
def test_luks_cipher_big_request_equals_sector_by_sector(key_len: int, ivgen: str) -> None:
    """A request big enough to be split over two threads (numpy kernel) gives the bytes
    of the same sectors en/decrypted one at a time (one kernel call each), in place in a
    memoryview of a larger buffer; plain wraps its 32-bit counter inside the request."""
    from diskimg.crypto.luks.cipher import PARALLEL_SECTORS

    rnd = random.Random(key_len)
    key = rnd.randbytes(key_len)
    n = PARALLEL_SECTORS + 5
    first = 2**32 - 700 if ivgen == "plain" else 123456
    data = rnd.randbytes(512 * n)
    big = bytearray(512 + len(data) + 512)
    big[512:-512] = data
    c = _luks_cipher(key, ivgen)
    c.encrypt(first, memoryview(big)[512:-512])
    one = bytearray(data)
    for i in range(n):
        c.encrypt(first + i, memoryview(one)[512 * i:512 * i + 512])
    assert _h(big[512:-512]) == _h(one)
    assert big[:512] == bytes(512) == big[-512:]
    if key_len != 48:
        ivs = c._ivgen.ivs(first, n)
        assert _h(one) == _h(_reference_xts(key, ivs, data, True))
    c.decrypt(first, memoryview(big)[512:-512])
    assert _h(big[512:-512]) == _h(data)


def test_luks_cipher_parallel_error_reaches_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in a piece, whichever thread took it (the caller or the crypt worker),
    is raised to the caller, not lost; every piece was taken once."""
    from diskimg.crypto import kernels
    from diskimg.crypto.luks import cipher as cmod

    if not kernels.XtsKernel.parallel:
        pytest.skip("the kernel in use does not split requests")
    c = _luks_cipher(bytes(range(64)))
    real: Callable[..., None] = cmod.LuksCipher._xts_part
    n = 2 * cmod.PARALLEL_SECTORS
    pieces = list(range(0, n, cmod.SHARE_SECTORS))
    for bad in (pieces[0], pieces[-1]):
        calls: list[int] = []

        def part(self: Any, sector: int, mv: memoryview, encrypt: bool,
                 bad: int = bad, calls: list[int] = calls) -> None:
            calls.append(sector)
            if sector == bad:
                raise RuntimeError("piece failed")
            real(self, sector, mv, encrypt)

        monkeypatch.setattr(cmod.LuksCipher, "_xts_part", part)
        with pytest.raises(RuntimeError, match="piece failed"):
            c.encrypt(0, bytearray(512 * n))
        assert bad in calls and len(set(calls)) == len(calls)  # no piece done twice


def test_luks_cipher_shared_request_without_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crypt worker that never starts (a busy machine: its job still queued) does not
    hold the request up: the caller does every piece, in place, with the right bytes."""
    from concurrent.futures import Future

    from diskimg.crypto import kernels
    from diskimg.crypto.luks import cipher as cmod

    if not kernels.XtsKernel.parallel:
        pytest.skip("the kernel in use does not split requests")

    class Idle:
        def submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
            fut: Future[None] = Future()  # pending, never run: cancel() succeeds

            def late() -> None:  # a caller still waiting after 2 s fails, not hangs
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(AssertionError("waited for a worker never started"))

            t = threading.Timer(2.0, late)
            t.daemon = True
            t.start()
            return fut

    monkeypatch.setattr(cmod, "_pool", Idle)
    key = bytes(range(64))
    n = 2 * cmod.PARALLEL_SECTORS + 7
    data = random.Random(11).randbytes(512 * n)
    buf = bytearray(data)
    c = _luks_cipher(key)
    c.encrypt(5, buf)
    assert _h(buf) == _h(_reference_xts(key, c._ivgen.ivs(5, n), data, True))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_split_request_after_fork() -> None:
    """A child forked after the crypt worker started splits requests too (its own worker:
    the parent's thread does not exist in the child) and gets the same bytes."""
    from diskimg.crypto.luks.cipher import PARALLEL_SECTORS

    key = bytes(range(64))
    data = random.Random(5).randbytes(512 * PARALLEL_SECTORS)
    c = _luks_cipher(key)
    ref = bytearray(data)
    c.encrypt(9, ref)  # starts the worker in this process
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            import signal

            signal.alarm(30)  # a hang (work queued to a thread that is not there) fails
            buf = bytearray(data)
            c.encrypt(9, buf)
            code = 0 if buf == ref else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
