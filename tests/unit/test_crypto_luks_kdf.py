"""diskimg.crypto.luks.kdf: PBKDF2 vectors, qemu 7.2's benchmark loop and the iteration
counts derived from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from diskimg.crypto import (
    luks,
)
from diskimg.crypto.luks import (
    BENCH_MAX_WALL_S,
    LUKS_DIGEST_LEN,
    QEMU_BENCH_TARGET_MS,
    build_luks,
    iterations_for_time,
    kdf,
    pbkdf2,
    pbkdf2_count_iters,
    pbkdf2_iterations,
    plan_add_key,
)
from diskimg.errors import (
    EncryptionError,
    UsageError,
)
from tests.unit.luks_testlib import MK64, PASS

# -- PBKDF2 iteration counts: qemu 7.2's benchmark and derivation -------------------------

def _fake_machine(per_ms: float) -> tuple[list[int], Callable[[int], None],
                                           Callable[[], float]]:
    """A CPU doing ``per_ms`` PBKDF2 iterations per ms of thread CPU time."""
    runs: list[int] = []
    clock = [0.0]

    def run(n: int) -> None:
        runs.append(n)
        clock[0] += n / per_ms

    return runs, run, lambda: clock[0]


def test_count_iters_follows_qemus_loop() -> None:
    # qemu's thresholds (target 1000 ms): 2^15 iterations take 10.9 ms (<100: x10), 327680
    # take 109 ms (100..500: rescale to 1000 ms), 3e6 take 1000 ms (>500: done).
    runs, run, cpu = _fake_machine(3000)
    assert pbkdf2_count_iters("sha256", 64, run=run, cpu_ms=cpu,
                              target_ms=QEMU_BENCH_TARGET_MS) == 3_000_000
    assert runs == [32768, 327680, 3_000_000]
    # ours: the same loop at a quarter of the length, same rate
    runs, run, cpu = _fake_machine(3000)
    assert pbkdf2_count_iters("sha256", 64, run=run, cpu_ms=cpu) == 3_000_000
    assert runs == [32768, 327680, 750_000]
    # a slow machine: the first run is already over half the target
    runs, run, cpu = _fake_machine(20)
    assert pbkdf2_count_iters("sha256", 64, run=run, cpu_ms=cpu) == 20_000
    assert runs == [32768]


def test_count_iters_is_bounded() -> None:
    # a CPU clock that never moves: qemu's "Unable to get accurate CPU usage", not a hang
    runs: list[int] = []
    with pytest.raises(EncryptionError, match="Unable to get accurate CPU usage"):
        pbkdf2_count_iters("sha256", 64, run=runs.append, cpu_ms=lambda: 0.0)
    assert len(runs) == 7
    # a starved thread: past the wall-clock bound the last measurement is used
    _runs, run, cpu = _fake_machine(3000)
    wall = iter([0.0, BENCH_MAX_WALL_S + 1])
    assert pbkdf2_count_iters("sha256", 64, run=run, cpu_ms=cpu,
                              wall_s=lambda: next(wall)) == 3_000_000


@pytest.mark.parametrize(("rate", "ms", "divisor", "want"), [
    (3_000_000, 2000, 1, 6_000_000),   # key slot, default iter-time
    (6_000_000, 2000, 8, 1_500_000),   # master-key digest: an eighth
    (3_370_000, 10, 1, 33_700),
    (6_000_000, 10, 8, 7_500),
    (50_000, 10, 1, 1000),             # floor
    (6_000_000, 1, 8, 1000),           # floor for the digest too
    (3_000_000, 0, 1, 1000),
    (1_431_655, 3_000_000, 1, 4_294_965_000),  # just under 2^32
])
def test_iterations_for_time(rate: int, ms: int, divisor: int, want: int) -> None:
    assert iterations_for_time(rate, ms, divisor) == want


def test_iterations_for_time_limits() -> None:
    with pytest.raises(UsageError, match=r"PBKDF iterations 4500000000 larger than 4294967295"):
        iterations_for_time(3_000_000, 1_500_000)
    with pytest.raises(UsageError, match="too large to scale"):
        iterations_for_time(3_000_000, 1 << 60)
    with pytest.raises(UsageError, match="negative"):
        iterations_for_time(3_000_000, -1)


def test_build_luks_counts_from_measured_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    # qemu measures each count with its own output length: 20 bytes (one sha256 block)
    # for the digest, key-bytes (two blocks for aes-256-xts) for the slot; the digest gets
    # an eighth of iter-time, so it ends up with about a quarter of the slot's count.
    rates = {LUKS_DIGEST_LEN: 6_000_000, 64: 3_000_000}
    monkeypatch.setattr(kdf, "pbkdf2_rate", lambda _h, n: rates[n])
    _area, _cipher, hdr = build_luks(PASS, {}, 10, master_key=MK64)
    assert (hdr.mk_digest_iter, hdr.slots[0].iterations) == (7_500, 30_000)
    _slot, new, _writes = plan_add_key(hdr, MK64, b"pw2", iter_time_ms=20)
    assert new.slots[1].iterations == 60_000
    # a count over 2^32-1 is refused before any PBKDF2 runs, as qemu does
    with pytest.raises(UsageError, match="larger than 4294967295"):
        build_luks(PASS, {}, 10_000_000)


def test_pbkdf2_iterations_zero_time_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    def bench(h: str, n: int) -> int:
        calls.append((h, n))
        return 2_000_000

    monkeypatch.setattr(kdf, "pbkdf2_count_iters", bench)
    monkeypatch.setattr(kdf, "_rate_cache", {})
    assert pbkdf2_iterations("sha256", 64, 0) == 1000 and calls == []
    assert pbkdf2_iterations("sha256", 64, 100) == 200_000
    assert pbkdf2_iterations("sha256", 64, 200) == 400_000
    assert pbkdf2_iterations("sha256", 20, 100, 8) == 25_000
    assert calls == [("sha256", 64), ("sha256", 20)]  # one benchmark per output length


def test_count_iters_measures_real_pbkdf2() -> None:
    # thread CPU time, not wall clock: eight sha256 blocks per iteration (256-byte output)
    # run at about an eighth of the rate of one block (20 bytes); the wide contrast keeps
    # the check clear of the noise of a shared VM (two blocks against one measured 1.25)
    one = pbkdf2_count_iters("sha256", LUKS_DIGEST_LEN)
    eight = pbkdf2_count_iters("sha256", 256)
    assert 3.0 < one / eight < 16.0


def test_pbkdf2_rfc6070_vector() -> None:
    assert pbkdf2("sha1", b"password", b"salt", 2, 20).hex() == \
        "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"
    assert pbkdf2("ripemd160", b"p", b"s", 3, 8) == \
        hashlib.pbkdf2_hmac("ripemd160", b"p", b"s", 3, 8)

def test_iter_time_beyond_the_unlock_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key slot diskimg could not unlock again is never written."""
    monkeypatch.setattr(kdf, "pbkdf2_rate", lambda hash_name, out_len: 3_300_000)
    assert luks.pbkdf2_iterations("sha256", 64, 30_000) == 99_000_000
    with pytest.raises(UsageError, match=r"iter-time' 31000 ms gives 102300000 PBKDF2"):
        luks.pbkdf2_iterations("sha256", 64, 31_000)
