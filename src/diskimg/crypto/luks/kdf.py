"""PBKDF2 for LUKS (slot keys and the master-key digest) and qemu 7.2's iteration-count
benchmark.

Counts: ``iter-time`` ms (default 2000) worth of PBKDF2 for a key slot, an eighth of that
for the master-key digest, each at least :data:`MIN_ITERATIONS`, from a rate measured
separately for each output length (in thread CPU time, as qemu does).  Unlock refuses counts
above :data:`MAX_PBKDF2_ITERATIONS`; creation never writes one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from diskimg.crypto import HASH_NAMES, KeyBuf
from diskimg.crypto.luks.header import LUKS_SALT_LEN
from diskimg.errors import EncryptionError, UnsupportedFeatureError, UsageError

MIN_ITERATIONS = 1000  # QEMU's floor for both slot and master-key-digest iterations
#: Unlock refuses slots/digests with more PBKDF2 iterations than this (≈ 25 s of sha256
#: here).  QEMU and cryptsetup have no cap; a 2^32-1 iteration slot is a guaranteed hang.
MAX_PBKDF2_ITERATIONS = 100_000_000
DEFAULT_ITER_TIME_MS = 2000

_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

#: a library-version feature, decided once at import (not a device capability probe):
#: ``PBKDF2HMAC.derive_into`` (cryptography >= 47) derives a key into a caller's buffer
_DERIVE_INTO = hasattr(PBKDF2HMAC, "derive_into")


def pbkdf2(hash_name: str, password: KeyBuf, salt: bytes, iterations: int,
           length: int) -> bytes:
    """PBKDF2-HMAC with a LUKS hash name (``cryptography``; hashlib for ripemd160)."""
    if iterations < 1:
        raise ValueError("PBKDF2 needs at least one iteration")
    alg = _CRYPTO_HASHES.get(hash_name)
    if alg is not None:
        return PBKDF2HMAC(algorithm=alg(), length=length, salt=salt,
                          iterations=iterations).derive(password)
    if hash_name not in HASH_NAMES:
        raise UnsupportedFeatureError(f"hash algorithm '{hash_name}' is not supported")
    try:
        return hashlib.pbkdf2_hmac(HASH_NAMES[hash_name], password, salt, iterations, length)
    except ValueError as err:
        raise UnsupportedFeatureError(f"hash algorithm '{hash_name}' is not available") \
            from err


def pbkdf2_key(hash_name: str, password: KeyBuf, salt: bytes, iterations: int,
               length: int) -> bytearray:
    """:func:`pbkdf2` into a fresh ``bytearray`` the caller wipes (:func:`wipe`) when done.

    With ``cryptography`` >= 47 the key is derived straight into the buffer; older
    versions (and ripemd160, which only ``hashlib`` has) leave one immutable ``bytes``
    copy behind that cannot be scrubbed."""
    out = bytearray(length)
    alg = _CRYPTO_HASHES.get(hash_name)
    if _DERIVE_INTO and alg is not None and iterations >= 1:
        kdf = PBKDF2HMAC(algorithm=alg(), length=length, salt=salt, iterations=iterations)
        kdf.derive_into(password, out)
        return out
    out[:] = pbkdf2(hash_name, password, salt, iterations, length)
    return out


#: qemu 7.2's PBKDF2 benchmark (crypto/pbkdf.c): the first run does 2^15 iterations; a run
#: under 100 ms of thread CPU time is repeated with 10x the iterations, one between 100 and
#: 500 ms is rescaled to take about 1000 ms (the target), and the first run over 500 ms
#: (half the target) ends it.  That costs qemu 1-2 s of CPU per count, two counts per image.
BENCH_START_ITERATIONS = 1 << 15
QEMU_BENCH_TARGET_MS = 1000
#: Our target: the same loop with every threshold scaled to a quarter (runs over 62.5 ms
#: end it); the rate it measures agrees with the full-length loop's within run-to-run noise
#: and one count costs ~0.2-0.4 s of CPU.
BENCH_TARGET_MS = 250
#: Our bound (qemu has none): a benchmark that has not finished after this much wall-clock
#: time (a starved thread) ends with its last non-zero measurement.
BENCH_MAX_WALL_S = 10.0
#: A measured rate is reused for this long in the same process, so creating many images
#: (or a create followed by an amend) pays for the benchmark once.
BENCH_CACHE_S = 60.0
_UINT32_MAX = 0xFFFFFFFF
_ULLONG_MAX = (1 << 64) - 1
_BENCH_KEY = b"diskimg-pbkdf2-benchmark-key-32b"
_rate_cache: dict[tuple[str, int], tuple[int, float]] = {}


def pbkdf2_count_iters(hash_name: str, out_len: int, *,
                       run: Callable[[int], None] | None = None,
                       cpu_ms: Callable[[], float] | None = None,
                       wall_s: Callable[[], float] = time.monotonic,
                       target_ms: float = BENCH_TARGET_MS) -> int:
    """PBKDF2 iterations per second producing ``out_len`` bytes, measured as qemu 7.2 does.

    Same loop as qemu's ``qcrypto_pbkdf2_count_iters`` (see :data:`BENCH_START_ITERATIONS`)
    timed with this thread's CPU time, so other processes competing for the CPU do not
    lower the result, with thresholds scaled to ``target_ms`` (qemu's is
    :data:`QEMU_BENCH_TARGET_MS`); returns ``iterations * 1000 / cpu_ms`` of the last run.
    ``run`` (PBKDF2 with the given count) and the clocks are injectable for tests.  Ends within
    :data:`BENCH_MAX_WALL_S` plus one run; raises :class:`EncryptionError` if the CPU
    clock never advances (qemu's "Unable to get accurate CPU usage").
    """
    if run is None:
        salt = bytes(LUKS_SALT_LEN)

        def run(n: int) -> None:
            pbkdf2(hash_name, _BENCH_KEY, salt, n, out_len)
    if cpu_ms is None:
        def cpu_ms() -> float:
            return time.thread_time() * 1000.0
    done_ms, low_ms = target_ms / 2, target_ms / 10
    iterations = BENCH_START_ITERATIONS
    deadline = wall_s() + BENCH_MAX_WALL_S
    scaled = 0
    while True:
        t0 = cpu_ms()
        run(iterations)
        delta = cpu_ms() - t0
        if delta <= 0:
            if scaled > 5:
                raise EncryptionError("Unable to get accurate CPU usage")
            iterations *= 10
        elif delta > done_ms or wall_s() > deadline:
            break
        elif delta < low_ms:
            iterations *= 10
        else:
            iterations = max(1, int(iterations * target_ms / delta))
        scaled += 1
    return max(1, int(iterations * 1000 / delta))


def pbkdf2_rate(hash_name: str, out_len: int) -> int:
    """:func:`pbkdf2_count_iters`, reused for :data:`BENCH_CACHE_S` per (hash, length)."""
    key = (hash_name, out_len)
    now = time.monotonic()
    hit = _rate_cache.get(key)
    if hit is not None and now - hit[1] < BENCH_CACHE_S:
        return hit[0]
    rate = pbkdf2_count_iters(hash_name, out_len)
    _rate_cache[key] = (rate, time.monotonic())
    return rate


def iterations_for_time(rate: int, time_ms: int, divisor: int = 1) -> int:
    """qemu 7.2's iteration count for ``time_ms`` of PBKDF2 at ``rate`` iterations/second.

    ``rate * time_ms // 1000 // divisor`` (``divisor`` 8 for the master-key digest, 1 for a
    key slot), at least :data:`MIN_ITERATIONS`.  Raises :class:`UsageError` with qemu's
    messages when the product overflows 64 bits or the count exceeds 2^32-1.
    """
    if time_ms < 0:
        raise UsageError("Parameter 'iter-time' must not be negative")
    if time_ms and rate > _ULLONG_MAX // time_ms:
        raise UsageError(f"PBKDF iterations {rate} too large to scale: "
                         "Numerical result out of range")
    iters = rate * time_ms // 1000 // divisor
    if iters > _UINT32_MAX:
        raise UsageError(f"PBKDF iterations {iters} larger than {_UINT32_MAX}: "
                         "Numerical result out of range")
    return max(iters, MIN_ITERATIONS)


def pbkdf2_iterations(hash_name: str, out_len: int, time_ms: int, divisor: int = 1) -> int:
    """Iterations of PBKDF2 producing ``out_len`` bytes for ``time_ms`` here, as qemu 7.2.

    The master-key digest uses ``out_len=20, divisor=8``; a key slot ``out_len=key-bytes``.
    ``time_ms`` 0 gives the floor of :data:`MIN_ITERATIONS` without benchmarking (qemu
    benchmarks first, to the same result).  See :func:`iterations_for_time`.  A count above
    :data:`MAX_PBKDF2_ITERATIONS` (the unlock cap) raises :class:`UsageError` rather than
    writing a key slot diskimg would refuse to open.
    """
    if time_ms == 0:
        return MIN_ITERATIONS
    iters = iterations_for_time(pbkdf2_rate(hash_name, out_len), time_ms, divisor)
    if iters > MAX_PBKDF2_ITERATIONS:  # diskimg would refuse to unlock its own image
        raise UsageError(f"Parameter 'iter-time' {time_ms} ms gives {iters} PBKDF2 "
                         f"iterations here, more than the {MAX_PBKDF2_ITERATIONS} diskimg "
                         "unlocks; use a smaller iter-time")
    return iters


__all__ = ["MAX_PBKDF2_ITERATIONS", "iterations_for_time", "pbkdf2", "pbkdf2_count_iters",
           "pbkdf2_iterations", "pbkdf2_key", "pbkdf2_rate"]
