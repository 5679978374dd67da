"""LUKS1 as QEMU uses it inside qcow2 (``crypt_method=2``, ``encrypt.format=luks``).

Written from the LUKS1 on-disk format specification (v1.2.3) and QEMU's documentation,
and checked byte for byte against images qemu-img 7.2 makes.

On-disk header (592 bytes, all integers **big-endian**)::

    0   magic        "LUKS\\xba\\xbe"
    6   version      u16 = 1            (QEMU implements LUKS1 only)
    8   cipher-name  char[32]           "aes", "twofish", "serpent", "cast5"  (NUL terminated)
    40  cipher-mode  char[32]           "xts-plain64", "cbc-essiv:sha256", ... (NUL terminated)
    72  hash-spec    char[32]           "sha256", ...                          (NUL terminated)
    104 payload-offset u32              in 512-byte sectors
    108 key-bytes    u32                master key length
    112 mk-digest    byte[20]           PBKDF2(master key, mk-digest-salt, mk-digest-iter, 20)
    132 mk-digest-salt byte[32]
    164 mk-digest-iter u32
    168 uuid         char[40]
    208 key slot i at 208 + 48*i, i = 0..7:
        active u32 (0x00AC71F3 active / 0x0000DEAD inactive), iterations u32, salt byte[32],
        key-material-offset u32 (sectors), stripes u32 (= 4000)

A key slot holds the master key, anti-forensically split into ``key-bytes * 4000`` bytes
(:func:`af_split`), encrypted with the volume's own cipher and mode, keyed by
``PBKDF2(passphrase, slot salt, slot iterations, key-bytes)``, with sector IVs counted from 0
at the start of the key material.

qcow2 specifics (verified against qemu-img/qemu-io 7.2):

* the LUKS header and key material live in ordinary qcow2 clusters pointed at by the
  *full disk encryption header* extension 0x0537be77 = (offset u64, length u64); the
  length is ``payload-offset * 512`` (2068480 bytes for the default aes-256-xts); QEMU
  refuses to read key material outside that length;
* data clusters are encrypted sector by sector with the IV number = **host** file offset
  / 512 of the sector (QEMU's ``crypt_physical_offset``); the payload offset is not used
  for data;
* qemu lays out a new header like this: header in the first 4096 bytes, key slot *i*
  at ``4096 + i * stride`` where ``stride = align4096(ceil(key-bytes * 4000 / 512) * 512)``,
  payload offset right after slot 7; inactive slots have zero salt and iterations but
  their offset and ``stripes = 4000`` filled in; unused key material is zeros;
* iterations: ``iter-time`` ms (default 2000) worth of PBKDF2 for the slot, and an eighth of
  that for the master-key digest, each at least 1000, from a rate qemu measures separately
  for each (in thread CPU time, PBKDF2 with the real output length: key-bytes for the slot,
  20 for the digest, so with sha256 and a 64-byte key the digest gets ~1/4 the slot count);
* ``qemu-img info`` shows ``format-specific.data.encrypt`` (see :func:`luks_info`) without
  needing the passphrase.

Policy for hostile headers: every field is validated before any big allocation or any
PBKDF2 run (stripes must be 4000, known key sizes, NUL-terminated known names, key material
inside the area and not overlapping the header or other slots).  PBKDF2 iteration counts
above :data:`MAX_PBKDF2_ITERATIONS` are refused at unlock time (an unlock of a 2^32-1
iteration slot would take hours); ``info`` still works on such headers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
import uuid as uuid_mod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from diskimg.crypto import (
    SECTOR_SIZE,
    KeyBuf,
    cbc_decrypt_sectors,
    cbc_encrypt_sectors,
    check_sector_buffer,
    wipe,
    xts_sectors,
)
from diskimg.crypto.ivgen import HASH_NAMES, IVGen, make_ivgen
from diskimg.errors import (
    EncryptionError,
    FormatError,
    InvalidPassphraseError,
    UnsupportedFeatureError,
    UsageError,
)

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_HEADER_SIZE = 592
LUKS_NUM_SLOTS = 8
LUKS_SLOT_OFFSET = 208
LUKS_SLOT_SIZE = 48
LUKS_STRIPES = 4000
LUKS_DIGEST_LEN = 20
LUKS_SALT_LEN = 32
LUKS_KEY_SLOT_ACTIVE = 0x00AC71F3
LUKS_KEY_SLOT_INACTIVE = 0x0000DEAD
LUKS_ALIGN = 4096  # QEMU aligns the header end and every key slot to 4 KiB
MIN_ITERATIONS = 1000  # QEMU's floor for both slot and master-key-digest iterations
#: Unlock refuses slots/digests with more PBKDF2 iterations than this (≈ 25 s of sha256
#: here).  QEMU and cryptsetup have no cap; a 2^32-1 iteration slot is a guaranteed hang.
MAX_PBKDF2_ITERATIONS = 100_000_000
DEFAULT_ITER_TIME_MS = 2000
#: Largest LUKS area (FDE extension length) accepted; qemu's biggest layout is ~2 MiB.
MAX_LUKS_AREA = 64 << 20

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HDR.size == LUKS_SLOT_OFFSET and _SLOT.size == LUKS_SLOT_SIZE

#: LUKS cipher names -> key sizes in bytes (XTS doubles them); QEMU 7.2 knows these four.
CIPHER_KEY_SIZES: dict[str, tuple[int, ...]] = {
    "aes": (16, 24, 32),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
    "cast5": (16,),
}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
#: ciphers whose data path is implemented (needs the primitive in ``cryptography``)
IMPLEMENTED_CIPHERS = ("aes",)
_BATCH_SECTORS = 2048  # sectors per batched AES call (1 MiB)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

def _bad(field_name: str, offset: int, detail: str) -> FormatError:
    return FormatError(f"Invalid LUKS header: {detail} (field '{field_name}' at "
                       f"0x{offset:x})", offset=offset)


def _cstr(raw: bytes, field_name: str, offset: int) -> str:
    nul = raw.find(b"\0")
    if nul < 0:
        raise _bad(field_name, offset, f"{field_name} is not NUL-terminated")
    try:
        return raw[:nul].decode("ascii")
    except UnicodeDecodeError as err:
        raise _bad(field_name, offset, f"{field_name} is not ASCII") from err


def _pad_name(s: str, n: int) -> bytes:
    b = s.encode("ascii")
    if len(b) >= n:
        raise UsageError(f"name '{s}' too long for a {n}-byte LUKS field")
    return b.ljust(n, b"\0")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


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
    if alg is not None and iterations >= 1:
        kdf = PBKDF2HMAC(algorithm=alg(), length=length, salt=salt, iterations=iterations)
        derive_into = getattr(kdf, "derive_into", None)
        if derive_into is not None:
            derive_into(password, out)
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


# --------------------------------------------------------------------------------------
# anti-forensic splitter
# --------------------------------------------------------------------------------------

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


def _diffuse_into(block: bytearray | memoryview, hash_name: str) -> None:
    """LUKS H1 in place: piece i (digest-sized, last one shorter) becomes
    ``H(be32(i) || piece)`` truncated to the piece's length."""
    hlen = _digest_size(hash_name)
    proto = _HASH_PROTOS.get(hash_name)
    if proto is None:
        proto = _HASH_PROTOS[hash_name] = hashlib.new(HASH_NAMES[hash_name])
    mv = memoryview(block).cast("B")
    for i, start in enumerate(range(0, len(mv), hlen)):
        n = min(hlen, len(mv) - start)
        h = proto.copy()
        h.update(i.to_bytes(4, "big"))
        h.update(mv[start:start + n])
        mv[start:start + n] = memoryview(h.digest())[:n]


def _diffuse(block: bytes | bytearray, hash_name: str) -> bytes:
    """LUKS H1 of ``block`` (a copy; see :func:`_diffuse_into`)."""
    out = bytearray(block)
    _diffuse_into(out, hash_name)
    return bytes(out)


def _xor_into(dst: bytearray | memoryview, src: bytes | bytearray | memoryview) -> None:
    """``dst ^= src`` byte by byte.  Slow-ish on purpose: every intermediate is a cached
    small int, so no copy of key-derived bytes is left in freed memory."""
    for i, x in enumerate(src):
        dst[i] ^= x


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
    d = bytearray(n)
    try:
        for k in range(stripes - 1):
            s = random(n)
            mv[k * n:(k + 1) * n] = s
            _xor_into(d, s)
            _diffuse_into(d, hash_name)
        last = mv[(stripes - 1) * n:]
        last[:] = d
        _xor_into(last, memoryview(data).cast("B"))
    finally:
        wipe(d)
    return out


def af_merge(material: bytes | bytearray | memoryview, key_len: int, stripes: int,
             hash_name: str) -> bytearray:
    """Inverse of :func:`af_split`: recover ``key_len`` bytes from the split material
    (a fresh ``bytearray`` the caller wipes)."""
    if len(material) < key_len * stripes:
        raise ValueError("split material shorter than key_len * stripes")
    _digest_size(hash_name)
    mv = memoryview(material).cast("B")
    d = bytearray(key_len)
    for k in range(stripes - 1):
        _xor_into(d, mv[k * key_len:(k + 1) * key_len])
        _diffuse_into(d, hash_name)
    _xor_into(d, mv[(stripes - 1) * key_len:stripes * key_len])
    return d


# --------------------------------------------------------------------------------------
# cipher spec
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CipherSpec:
    """A LUKS cipher: name ("aes"), mode ("xts"), IV generator, key length in bytes."""

    cipher_name: str
    mode: str
    ivgen: str
    ivgen_hash: str | None
    key_bytes: int

    @property
    def cipher_alg(self) -> str:
        """QEMU's name, e.g. ``aes-256`` (XTS: half of the key)."""
        per = self.key_bytes // 2 if self.mode == "xts" else self.key_bytes
        return f"{self.cipher_name}-{per * 8}"

    @property
    def mode_string(self) -> str:
        """The header's cipher-mode field, e.g. ``xts-plain64`` / ``cbc-essiv:sha256``."""
        s = f"{self.mode}-{self.ivgen}"
        return f"{s}:{self.ivgen_hash}" if self.ivgen_hash else s

    @property
    def material_sectors(self) -> int:
        """512-byte sectors one key slot's split key occupies (rounded up)."""
        return -(-self.key_bytes * LUKS_STRIPES // SECTOR_SIZE)


def parse_cipher_mode(mode: str, field_offset: int = 40) -> tuple[str, str, str | None]:
    """``"cbc-essiv:sha256"`` -> ("cbc", "essiv", "sha256")."""
    if "-" not in mode:
        raise UnsupportedFeatureError(
            f"Unexpected LUKS cipher mode string format '{mode}' (field 'cipher-mode' at "
            f"0x{field_offset:x})", offset=field_offset)
    m, iv = mode.split("-", 1)
    ivhash: str | None = None
    if ":" in iv:
        iv, ivhash = iv.split(":", 1)
    if m not in CIPHER_MODES:
        raise UnsupportedFeatureError(
            f"Unsupported LUKS cipher mode '{m}' (field 'cipher-mode' at "
            f"0x{field_offset:x})", offset=field_offset)
    if iv not in ("plain", "plain64", "essiv"):
        raise UnsupportedFeatureError(
            f"Unsupported LUKS IV generator '{iv}' (field 'cipher-mode' at "
            f"0x{field_offset:x})", offset=field_offset)
    if ivhash is not None and ivhash not in HASH_NAMES:
        raise UnsupportedFeatureError(
            f"Unsupported LUKS IV generator hash '{ivhash}' (field 'cipher-mode' at "
            f"0x{field_offset:x})", offset=field_offset)
    if iv == "essiv" and ivhash is None:
        raise FormatError(f"LUKS essiv IV generator without a hash (field 'cipher-mode' at "
                          f"0x{field_offset:x})", offset=field_offset)
    return m, iv, ivhash


# --------------------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------------------

@dataclass(slots=True)
class KeySlot:
    active: bool
    iterations: int
    salt: bytes
    key_offset: int  # sectors
    stripes: int = LUKS_STRIPES


@dataclass(slots=True)
class LuksHeader:
    """A parsed, validated LUKS1 header (the first 592 bytes of the area)."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list[KeySlot] = field(default_factory=list)

    # ---- derived ----
    @property
    def spec(self) -> CipherSpec:
        m, iv, ivh = parse_cipher_mode(self.cipher_mode)
        return CipherSpec(self.cipher_name, m, iv, ivh, self.key_bytes)

    @property
    def material_bytes(self) -> int:
        """Bytes of (sector-padded) encrypted key material per slot."""
        return self.spec.material_sectors * SECTOR_SIZE

    # ---- parse ----
    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, area_len: int | None = None) -> LuksHeader:
        """Parse and validate.  ``area_len``: bytes available for key material (the FDE
        extension length in qcow2); when given, every slot must lie inside it."""
        buf = bytes(buf[:LUKS_HEADER_SIZE])
        if len(buf) < LUKS_HEADER_SIZE:
            raise FormatError(f"LUKS header truncated: {len(buf)} of {LUKS_HEADER_SIZE} "
                              "bytes (header at 0x0)", offset=0)
        (magic, version, cname, cmode, hspec, payload, key_bytes, digest, dsalt, diter,
         uuid_raw) = _HDR.unpack_from(buf, 0)
        if magic != LUKS_MAGIC:
            raise FormatError("Volume is not in LUKS format (field 'magic' at 0x0)",
                              offset=0)
        if version != LUKS_VERSION:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS version {version} (field 'version' at 0x6)", offset=6)
        cipher_name = _cstr(cname, "cipher-name", 8)
        cipher_mode = _cstr(cmode, "cipher-mode", 40)
        hash_spec = _cstr(hspec, "hash-spec", 72)
        uuid = _cstr(uuid_raw, "uuid", 168)
        if cipher_name not in CIPHER_KEY_SIZES:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS cipher '{cipher_name}' (field 'cipher-name' at 0x8)",
                offset=8)
        mode, _iv, _ivh = parse_cipher_mode(cipher_mode)
        if hash_spec not in HASH_NAMES:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS hash '{hash_spec}' (field 'hash-spec' at 0x48)", offset=72)
        sizes = CIPHER_KEY_SIZES[cipher_name]
        if mode == "xts":
            sizes = tuple(2 * s for s in sizes)
        if key_bytes not in sizes:
            raise _bad("key-bytes", 108, f"key length {key_bytes} is not valid for "
                       f"{cipher_name}-{mode} (expected one of {list(sizes)})")
        if diter < 1:
            raise _bad("mk-digest-iter", 164, "master key digest iterations is 0")
        hdr = cls(cipher_name, cipher_mode, hash_spec, payload, key_bytes, digest, dsalt,
                  diter, uuid)
        if area_len is not None and payload * SECTOR_SIZE > area_len:
            raise _bad("payload-offset", 104, f"payload offset {payload} sectors lies past "
                       f"the end of the {area_len}-byte LUKS area")
        material_sectors = hdr.spec.material_sectors
        header_sectors = -(-LUKS_HEADER_SIZE // SECTOR_SIZE)
        ranges: list[tuple[int, int, int]] = []
        for i in range(LUKS_NUM_SLOTS):
            off = LUKS_SLOT_OFFSET + i * LUKS_SLOT_SIZE
            active, iters, salt, koff, stripes = _SLOT.unpack_from(buf, off)
            if active not in (LUKS_KEY_SLOT_ACTIVE, LUKS_KEY_SLOT_INACTIVE):
                raise _bad(f"key-slot[{i}].active", off,
                           f"key slot {i} state 0x{active:08x} is neither active nor inactive")
            if stripes != LUKS_STRIPES:
                raise _bad(f"key-slot[{i}].stripes", off + 44,
                           f"key slot {i} has {stripes} stripes, expected {LUKS_STRIPES}")
            if active == LUKS_KEY_SLOT_ACTIVE and iters < 1:
                raise _bad(f"key-slot[{i}].iterations", off + 4,
                           f"active key slot {i} has 0 iterations")
            if koff < header_sectors:
                raise _bad(f"key-slot[{i}].key-material-offset", off + 40,
                           f"key slot {i} material at sector {koff} overlaps the LUKS header")
            end = koff + material_sectors
            if area_len is not None and end * SECTOR_SIZE > area_len:
                raise _bad(f"key-slot[{i}].key-material-offset", off + 40,
                           f"key slot {i} material (sectors {koff}..{end}) lies outside the "
                           f"{area_len}-byte LUKS area")
            if end > payload:
                raise _bad(f"key-slot[{i}].key-material-offset", off + 40,
                           f"key slot {i} material (sectors {koff}..{end}) overlaps the "
                           f"payload at sector {payload}")
            for j, a, b in ranges:
                if koff < b and a < end:
                    raise _bad(f"key-slot[{i}].key-material-offset", off + 40,
                               f"key slot {i} material overlaps key slot {j}")
            ranges.append((i, koff, end))
            hdr.slots.append(KeySlot(active == LUKS_KEY_SLOT_ACTIVE, iters, salt, koff,
                                     stripes))
        return hdr

    # ---- pack ----
    def pack(self) -> bytes:
        out = bytearray(_HDR.pack(
            LUKS_MAGIC, LUKS_VERSION, _pad_name(self.cipher_name, 32),
            _pad_name(self.cipher_mode, 32), _pad_name(self.hash_spec, 32),
            self.payload_offset, self.key_bytes, self.mk_digest, self.mk_digest_salt,
            self.mk_digest_iter, _pad_name(self.uuid, 40)))
        for s in self.slots:
            out += _SLOT.pack(LUKS_KEY_SLOT_ACTIVE if s.active else LUKS_KEY_SLOT_INACTIVE,
                              s.iterations, s.salt, s.key_offset, s.stripes)
        assert len(out) == LUKS_HEADER_SIZE
        return bytes(out)


# --------------------------------------------------------------------------------------
# the data cipher
# --------------------------------------------------------------------------------------

def _equal_halves(key: KeyBuf) -> bool:
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
        if spec.mode == "xts" and _equal_halves(master_key):
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
        wipe(self._key)
        ivwipe = getattr(self._ivgen, "wipe", None)
        if ivwipe is not None:
            ivwipe()
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
            if mode == "xts":
                chunk[:] = xts_sectors(self._kv, ivs, chunk, encrypt)
            elif mode == "cbc":
                kernel = cbc_encrypt_sectors if encrypt else cbc_decrypt_sectors
                chunk[:] = kernel(self._kv, ivs, chunk)
            else:  # ctr: one keystream per sector
                for i in range(count):
                    a = i * SECTOR_SIZE
                    ctx = Cipher(self._alg, modes.CTR(ivs[16 * i:16 * i + 16])).encryptor()
                    chunk[a:a + SECTOR_SIZE] = ctx.update(chunk[a:a + SECTOR_SIZE])

    def encrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, True)

    def decrypt(self, sector: int, buf: bytearray | memoryview) -> None:
        self._run(sector, buf, False)

    def crypt_private(self, sector: int, buf: bytearray | memoryview, encrypt: bool) -> None:
        """Encrypt/decrypt ``buf`` in place, one sector at a time through OpenSSL straight
        into a scratch ``bytearray`` that is wiped afterwards, so no plaintext copy is left
        behind.  Used for key material; the batched data kernels are faster but go through
        immutable temporaries.  (AES-192-XTS, which OpenSSL lacks, uses the kernels.)"""
        self._check_keyed()
        n = check_sector_buffer(sector, buf)
        mode = self.spec.mode
        if mode == "xts" and self._half == 24:
            self._run(sector, buf, encrypt)
            return
        mv = memoryview(buf).cast("B")
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


# --------------------------------------------------------------------------------------
# unlock
# --------------------------------------------------------------------------------------

def _check_iters(n: int, what: str, off: int, cap: int) -> None:
    if n > cap:
        raise UnsupportedFeatureError(
            f"LUKS {what} uses {n} PBKDF2 iterations, more than the limit of {cap} (field at "
            f"0x{off:x}); refusing to spend the time", offset=off)


def _as_key_bytes(passphrase: KeyBuf | str) -> KeyBuf:
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase


def _check_unlockable(header: LuksHeader, max_iterations: int) -> None:
    spec = header.spec
    if spec.cipher_name not in IMPLEMENTED_CIPHERS:
        raise UnsupportedFeatureError(
            f"LUKS cipher '{spec.cipher_alg}' is not implemented (only AES)")
    if spec.ivgen == "essiv":
        # fail early (with qemu's message) rather than after the PBKDF2 run
        make_ivgen("essiv", master_key=bytes(header.key_bytes), hash_name=spec.ivgen_hash)
    _check_iters(header.mk_digest_iter, "master key digest", 164, max_iterations)
    for i, s in enumerate(header.slots):
        if s.active:
            _check_iters(s.iterations, f"key slot {i}",
                         LUKS_SLOT_OFFSET + i * LUKS_SLOT_SIZE + 4, max_iterations)


def _master_key_matches(header: LuksHeader, candidate: KeyBuf) -> bool:
    digest = pbkdf2(header.hash_spec, candidate, header.mk_digest_salt,
                    header.mk_digest_iter, LUKS_DIGEST_LEN)
    return hmac.compare_digest(digest, header.mk_digest)


def _try_slot(header: LuksHeader, area: bytes | bytearray | memoryview, index: int,
              passphrase: KeyBuf) -> bytearray | None:
    """The master key if ``passphrase`` opens active slot ``index``, else None.

    Every intermediate that could lead to the key (slot key, decrypted split material, a
    candidate that fails the digest) lives in a ``bytearray`` wiped before returning."""
    s = header.slots[index]
    spec = header.spec
    mlen = header.material_bytes
    start = s.key_offset * SECTOR_SIZE
    if start + mlen > len(area):
        raise _bad(f"key-slot[{index}].key-material-offset",
                   LUKS_SLOT_OFFSET + index * LUKS_SLOT_SIZE + 40,
                   f"key slot {index} material lies outside the {len(area)}-byte LUKS area")
    slot_key = pbkdf2_key(header.hash_spec, passphrase, s.salt, s.iterations,
                          header.key_bytes)
    material: bytearray | None = None
    candidate: bytearray | None = None
    try:
        if spec.mode == "xts" and _equal_halves(slot_key):
            return None  # degenerate XTS slot key: the backend refuses it, cannot be it
        slot_cipher = LuksCipher(spec, slot_key)
        try:
            material = bytearray(memoryview(area)[start:start + mlen])
            slot_cipher.crypt_private(0, material, False)
            candidate = af_merge(material, header.key_bytes, s.stripes, header.hash_spec)
        finally:
            slot_cipher.wipe()
        if _master_key_matches(header, candidate):
            found, candidate = candidate, None
            return found
        return None
    finally:
        wipe(slot_key, material, candidate)


def unlock(header: LuksHeader, area: bytes | bytearray | memoryview,
           passphrase: KeyBuf | str,
           max_iterations: int = MAX_PBKDF2_ITERATIONS) -> tuple[bytearray, int]:
    """Find the master key: try every active slot; ``(master_key, slot_index)``.

    ``area`` is the whole LUKS area (header + key material; the FDE extension's bytes).
    The master key is a ``bytearray`` the caller wipes (:func:`diskimg.crypto.wipe`) when
    done.  Raises :class:`InvalidPassphraseError` (never naming the passphrase) when no slot
    opens.
    """
    passphrase = _as_key_bytes(passphrase)
    _check_unlockable(header, max_iterations)
    for i, s in enumerate(header.slots):
        if s.active:
            mk = _try_slot(header, area, i, passphrase)
            if mk is not None:
                return mk, i
    raise InvalidPassphraseError("Invalid password, cannot unlock any keyslot")


def open_luks(area: bytes | bytearray | memoryview, passphrase: KeyBuf | str,
              max_iterations: int = MAX_PBKDF2_ITERATIONS) -> tuple[LuksCipher, int]:
    """Parse + unlock a LUKS area; ``(cipher, payload_offset_bytes)``.  The cipher holds
    the only copy of the master key (wipe it with ``cipher.wipe()``)."""
    header = LuksHeader.parse(area, len(area))
    master_key, _slot = unlock(header, area, passphrase, max_iterations)
    try:
        return LuksCipher(header.spec, master_key), header.payload_offset * SECTOR_SIZE
    finally:
        wipe(master_key)


# --------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------

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
    if ivgen not in ("plain", "plain64", "essiv"):
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


def layout(spec: CipherSpec) -> tuple[list[int], int]:
    """QEMU's layout: (key material offsets in sectors for the 8 slots, payload sectors)."""
    align = LUKS_ALIGN // SECTOR_SIZE
    first = _align(-(-LUKS_HEADER_SIZE // SECTOR_SIZE), align)
    stride = _align(spec.material_sectors, align)
    offsets = [first + i * stride for i in range(LUKS_NUM_SLOTS)]
    return offsets, first + LUKS_NUM_SLOTS * stride


def _fill_random(buf: bytearray) -> None:
    """Random bytes straight into ``buf`` (``/dev/urandom``; ``os.urandom`` elsewhere, which
    leaves an immutable copy)."""
    try:
        with open("/dev/urandom", "rb", buffering=0) as f:
            if f.readinto(buf) == len(buf):
                return
    except OSError:
        pass
    buf[:] = os.urandom(len(buf))


def _random_master_key(spec: CipherSpec) -> bytearray:
    mk = bytearray(spec.key_bytes)
    while True:
        _fill_random(mk)
        if spec.mode != "xts" or not _equal_halves(mk):
            return mk


def _wrap_master_key(header: LuksHeader, master_key: KeyBuf, passphrase: KeyBuf,
                     slot: KeySlot) -> bytearray:
    """The encrypted, sector-padded key material of ``slot`` for ``passphrase``.

    Picks a new salt into ``slot`` while the slot key would be a degenerate XTS key.  The
    split material is encrypted in place; the slot key is wiped."""
    spec = header.spec
    while True:
        slot_key = pbkdf2_key(header.hash_spec, passphrase, slot.salt, slot.iterations,
                              spec.key_bytes)
        if spec.mode != "xts" or not _equal_halves(slot_key):
            break
        wipe(slot_key)  # never in practice
        slot.salt = os.urandom(LUKS_SALT_LEN)
    material = af_split(master_key, slot.stripes, header.hash_spec)
    material += bytes(header.material_bytes - len(material))
    try:
        slot_cipher = LuksCipher(spec, slot_key)
        try:
            slot_cipher.crypt_private(0, material, True)
        finally:
            slot_cipher.wipe()
    except BaseException:
        wipe(material)
        raise
    finally:
        wipe(slot_key)
    return material


def build_luks(passphrase: KeyBuf | str, options: Mapping[str, Any] | None = None,
               iter_time_ms: int | None = None, *, master_key: KeyBuf | None = None,
               slot_iterations: int | None = None, mk_iterations: int | None = None,
               uuid: str | None = None) -> tuple[bytes, LuksCipher, LuksHeader]:
    """Build a new LUKS area the way qemu-img 7.2 does; ``(area, cipher, header)``.

    ``area`` is ``payload_offset * 512`` bytes: the header, slot 0 active, other slots
    inactive, zeros elsewhere.  ``iter_time_ms`` (default ``options['iter-time']`` or 2000)
    is spent on PBKDF2 per slot unlock, an eighth of it on the master key digest; both at
    least 1000 iterations.  The keyword arguments pin values for reproducible tests.  The
    returned cipher holds the only copy of a generated master key.
    """
    passphrase = _as_key_bytes(passphrase)
    options = dict(options or {})
    spec, hash_alg = spec_from_options(options)
    if iter_time_ms is None:
        iter_time_ms = int(options.get("iter-time", options.get("encrypt.iter-time",
                                                                 DEFAULT_ITER_TIME_MS)))
    if iter_time_ms < 0:
        raise UsageError("Parameter 'iter-time' must not be negative")
    if master_key is not None and len(master_key) != spec.key_bytes:
        raise UsageError(f"master key must be {spec.key_bytes} bytes for {spec.cipher_alg}-"
                         f"{spec.mode}")
    if mk_iterations is None:
        mk_iterations = pbkdf2_iterations(hash_alg, LUKS_DIGEST_LEN, iter_time_ms, 8)
    if slot_iterations is None:
        slot_iterations = pbkdf2_iterations(hash_alg, spec.key_bytes, iter_time_ms)
    for n, what in ((mk_iterations, "master key"), (slot_iterations, "key slot")):
        if not 1 <= n <= 0xFFFFFFFF:
            raise UsageError(f"{what} iteration count {n} out of range")
    mk = _random_master_key(spec) if master_key is None else bytearray(master_key)
    try:
        cipher = LuksCipher(spec, mk)  # validates the key (XTS halves)
        mk_salt = os.urandom(LUKS_SALT_LEN)
        digest = pbkdf2(hash_alg, mk, mk_salt, mk_iterations, LUKS_DIGEST_LEN)
        offsets, payload = layout(spec)
        slots = [KeySlot(True, slot_iterations, os.urandom(LUKS_SALT_LEN), offsets[0])]
        slots += [KeySlot(False, 0, bytes(LUKS_SALT_LEN), o) for o in offsets[1:]]
        header = LuksHeader(spec.cipher_name, spec.mode_string, hash_alg, payload,
                            spec.key_bytes, digest, mk_salt, mk_iterations,
                            uuid or str(uuid_mod.uuid4()), slots)
        material = _wrap_master_key(header, mk, passphrase, slots[0])
    finally:
        wipe(mk)
    area = bytearray(payload * SECTOR_SIZE)
    area[:LUKS_HEADER_SIZE] = header.pack()
    start = offsets[0] * SECTOR_SIZE
    area[start:start + len(material)] = material
    return bytes(area), cipher, header


# --------------------------------------------------------------------------------------
# key slot changes (qemu-img amend -o encrypt.*)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AreaWrite:
    """One write into the LUKS area (``offset`` relative to its start).  A plan is a list
    of these in order; each must be durable (flushed) before the next is issued."""

    offset: int
    data: bytes


def _slot_header_write(header: LuksHeader) -> AreaWrite:
    return AreaWrite(0, header.pack())


def _copy_header(header: LuksHeader) -> LuksHeader:
    return LuksHeader(header.cipher_name, header.cipher_mode, header.hash_spec,
                      header.payload_offset, header.key_bytes, header.mk_digest,
                      header.mk_digest_salt, header.mk_digest_iter, header.uuid,
                      [KeySlot(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
                       for s in header.slots])


def _erased(slot: KeySlot) -> KeySlot:
    return KeySlot(False, 0, bytes(LUKS_SALT_LEN), slot.key_offset, slot.stripes)


def plan_add_key(header: LuksHeader, master_key: KeyBuf, passphrase: KeyBuf | str, *,
                 keyslot: int | None = None, iter_time_ms: int | None = None,
                 force: bool = False, slot_iterations: int | None = None
                 ) -> tuple[int, LuksHeader, list[AreaWrite]]:
    """Wrap ``master_key`` for ``passphrase`` in a key slot: ``(slot, new header, writes)``.

    ``keyslot`` None takes the first inactive slot.  An active slot is only replaced with
    ``force``.  Write order (LUKS tools' order, crash-safe): the key material, then the
    header that activates the slot; replacing an active slot first writes a header that
    deactivates it, so no header ever points an active slot at half-written material.
    The master key is checked against the header's digest before anything is planned.
    """
    passphrase = _as_key_bytes(passphrase)
    if len(master_key) != header.key_bytes or not _master_key_matches(header, master_key):
        raise InvalidPassphraseError("The master key does not match the LUKS header")
    if keyslot is None:
        free = [i for i, s in enumerate(header.slots) if not s.active]
        if not free:
            raise UsageError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not 0 <= keyslot < LUKS_NUM_SLOTS:
        raise UsageError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                         f"{LUKS_NUM_SLOTS - 1}")
    if header.slots[keyslot].active and not force:
        raise UsageError(f"Refusing to overwrite active keyslot {keyslot} - please erase it "
                         "first")
    if slot_iterations is None:
        ms = DEFAULT_ITER_TIME_MS if iter_time_ms is None else iter_time_ms
        if ms < 0:
            raise UsageError("Parameter 'iter-time' must not be negative")
        slot_iterations = pbkdf2_iterations(header.hash_spec, header.key_bytes, ms)
    if not 1 <= slot_iterations <= 0xFFFFFFFF:
        raise UsageError(f"key slot iteration count {slot_iterations} out of range")
    new = _copy_header(header)
    writes: list[AreaWrite] = []
    old = new.slots[keyslot]
    if old.active:
        new.slots[keyslot] = _erased(old)
        writes.append(_slot_header_write(new))
        new = _copy_header(new)
    slot = KeySlot(True, slot_iterations, os.urandom(LUKS_SALT_LEN), old.key_offset,
                   LUKS_STRIPES)
    material = _wrap_master_key(new, master_key, passphrase, slot)
    new.slots[keyslot] = slot
    writes.append(AreaWrite(slot.key_offset * SECTOR_SIZE, bytes(material)))
    writes.append(_slot_header_write(new))
    return keyslot, new, writes


def plan_erase_keys(header: LuksHeader, slots: list[int]
                    ) -> tuple[LuksHeader, list[AreaWrite]]:
    """Deactivate ``slots``: ``(new header, writes)``.  Order: the header that marks them
    inactive first (the slots are then gone whatever happens next), then random bytes over
    their key material.  Refusing to erase the last active slot is the caller's policy
    (:func:`plan_keyslot_amend`)."""
    new = _copy_header(header)
    for i in slots:
        new.slots[i] = _erased(new.slots[i])
    writes = [_slot_header_write(new)]
    writes += [AreaWrite(new.slots[i].key_offset * SECTOR_SIZE,
                         os.urandom(header.material_bytes)) for i in slots]
    return new, writes


def slot_opens(header: LuksHeader, area: bytes | bytearray | memoryview, index: int,
               passphrase: KeyBuf | str,
               max_iterations: int = MAX_PBKDF2_ITERATIONS) -> bool:
    """True when ``passphrase`` unlocks active key slot ``index``."""
    _check_unlockable(header, max_iterations)
    if not header.slots[index].active:
        return False
    mk = _try_slot(header, area, index, _as_key_bytes(passphrase))
    wipe(mk)
    return mk is not None


@dataclass(frozen=True, slots=True)
class KeySlotAmend:
    """qemu's LUKS amend options (``encrypt.state``, ``new-secret``, ``old-secret``,
    ``keyslot``, ``iter-time``); the secrets are ids, looked up only when qemu does."""

    state: str | None
    new_secret: str | None = None
    old_secret: str | None = None
    keyslot: int | None = None
    iter_time: int | None = None


def _int32(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n & 0x80000000 else n


def plan_keyslot_amend(header: LuksHeader, area: bytes | bytearray | memoryview,
                       master_key: KeyBuf, req: KeySlotAmend,
                       lookup: Callable[[str], bytes], force: bool = False,
                       max_iterations: int = MAX_PBKDF2_ITERATIONS
                       ) -> tuple[LuksHeader, list[AreaWrite]]:
    """``qemu-img amend -o encrypt.*`` for LUKS: checks in qemu 7.2's order with its
    messages, then the plan of :func:`plan_add_key` or :func:`plan_erase_keys`.

    ``lookup(id)`` returns a secret (raising :class:`MissingSecretError` for unknown ids).
    Without ``force`` an active slot is never overwritten and the last active slot is never
    erased (its erasure makes the data unreadable for ever)."""
    if req.state is None:
        raise UsageError("Parameter 'state' is missing")
    if req.state not in ("active", "inactive"):
        raise UsageError(f"Parameter 'state' does not accept value '{req.state}'")
    keyslot = None if req.keyslot is None else _int32(req.keyslot)
    if req.state == "active":
        if req.new_secret is None:
            raise UsageError("'new-secret' is required to activate a keyslot")
        if req.old_secret is not None:
            raise UsageError("'old-secret' must not be given when activating keyslots")
        if keyslot is not None and not 0 <= keyslot < LUKS_NUM_SLOTS:
            raise UsageError(f"Invalid keyslot {keyslot & 0xFFFFFFFF} specified, must be "
                             f"between 0 and {LUKS_NUM_SLOTS - 1}")
        if keyslot is None and all(s.active for s in header.slots):
            raise UsageError("Can't add a keyslot - all keyslots are in use")
        if keyslot is not None and header.slots[keyslot].active and not force:
            raise UsageError(f"Refusing to overwrite active keyslot {keyslot} - please "
                             "erase it first")
        new_pw = lookup(req.new_secret)
        _slot, new, writes = plan_add_key(header, master_key, new_pw, keyslot=keyslot,
                                          iter_time_ms=req.iter_time, force=force)
        return new, writes
    if req.new_secret is not None:
        raise UsageError("'new-secret' must not be given when erasing keyslots")
    if req.iter_time is not None:
        raise UsageError("'iter-time' must not be given when erasing keyslots")
    old_pw = lookup(req.old_secret) if req.old_secret is not None else None
    active = [i for i, s in enumerate(header.slots) if s.active]
    if keyslot is not None:
        if not 0 <= keyslot < LUKS_NUM_SLOTS:
            raise UsageError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                             f"{LUKS_NUM_SLOTS - 1}")
        if keyslot not in active:
            raise UsageError(f"Given keyslot {keyslot} is already erased (inactive) ")
        if old_pw is not None and not slot_opens(header, area, keyslot, old_pw,
                                                 max_iterations):
            raise InvalidPassphraseError(f"Given keyslot {keyslot} doesn't contain the given "
                                         "old password for erase operation")
        if not force and len(active) == 1:
            raise UsageError(f"Attempt to erase the only active keyslot {keyslot} which will "
                             "erase all the data in the image irreversibly - refusing "
                             "operation")
        return plan_erase_keys(header, [keyslot])
    if old_pw is None:
        raise UsageError("To erase keyslot(s), either explicit keyslot index or the password "
                         "currently contained in them must be given")
    matching = [i for i in active if slot_opens(header, area, i, old_pw, max_iterations)]
    if not force and len(matching) == len(active):
        raise UsageError("All the active keyslots match the (old) password that was given "
                         "and erasing them will erase all the data in the image "
                         "irreversibly - refusing operation")
    if not matching:
        raise InvalidPassphraseError("No keyslots match given (old) password for erase "
                                     "operation")
    return plan_erase_keys(header, matching)


def create_luks(passphrase: bytes | str, options: Mapping[str, Any] | None = None,
                iter_time_ms: int | None = None) -> tuple[bytes, LuksCipher]:
    """Integration API: ``(area_bytes, cipher)`` for a new qcow2 LUKS image.

    Store ``area_bytes`` in freshly allocated clusters and point the FDE extension
    (0x0537be77) at them with ``length = len(area_bytes)``.
    """
    area, cipher, _hdr = build_luks(passphrase, options, iter_time_ms)
    return area, cipher


# --------------------------------------------------------------------------------------
# info + qcow2 glue
# --------------------------------------------------------------------------------------

def luks_info(header: LuksHeader | bytes | memoryview) -> dict[str, Any]:
    """qemu-img 7.2's ``format-specific.data.encrypt`` dict for a LUKS qcow2 (same keys,
    values and key order as its JSON output)."""
    if not isinstance(header, LuksHeader):
        header = LuksHeader.parse(header)
    spec = header.spec
    slots: list[dict[str, Any]] = []
    for s in header.slots:
        if s.active:
            slots.append({"active": True, "iters": s.iterations,
                          "key-offset": s.key_offset * SECTOR_SIZE, "stripes": s.stripes})
        else:
            slots.append({"active": False, "key-offset": s.key_offset * SECTOR_SIZE})
    d: dict[str, Any] = {
        "ivgen-alg": spec.ivgen,
        "hash-alg": header.hash_spec,
        "cipher-alg": spec.cipher_alg,
        "uuid": header.uuid,
    }
    if spec.ivgen == "essiv":
        d["ivgen-hash-alg"] = spec.ivgen_hash
    d.update({
        "format": "luks",
        "cipher-mode": spec.mode,
        "slots": slots,
        "payload-offset": header.payload_offset * SECTOR_SIZE,
        "master-key-iters": header.mk_digest_iter,
    })
    return d


_FDE = struct.Struct(">QQ")


def parse_fde_extension(data: bytes | None, cluster_size: int,
                        file_size: int | None = None) -> tuple[int, int]:
    """Validate the qcow2 full-disk-encryption header extension (0x0537be77).

    ``data`` is the extension payload (None when absent); returns ``(offset, length)``.
    """
    if data is None:
        raise FormatError("qcow2 image uses LUKS encryption (crypt_method 2) but has no "
                          "full disk encryption header extension (0x0537be77)")
    if len(data) != _FDE.size:
        raise FormatError(f"Invalid full disk encryption header extension: length "
                          f"{len(data)}, expected {_FDE.size}")
    off, length = _FDE.unpack(data)
    if off == 0 or off % cluster_size:
        raise FormatError(f"Encryption header offset '{off}' is not a non-zero multiple of "
                          f"the cluster size '{cluster_size}' (FDE extension field 'offset')",
                          offset=off)
    if length < LUKS_HEADER_SIZE or length > MAX_LUKS_AREA:
        raise FormatError(f"Encryption header length {length} is out of range "
                          f"({LUKS_HEADER_SIZE}..{MAX_LUKS_AREA}) (FDE extension field "
                          "'length')", offset=off)
    if file_size is not None and off + length > file_size:
        raise FormatError(f"Encryption header at {off} (+{length} bytes) lies past the end "
                          f"of the file ({file_size} bytes)", offset=off)
    return off, length


def pack_fde_extension(offset: int, length: int) -> bytes:
    return _FDE.pack(offset, length)


__all__ = [
    "MAX_PBKDF2_ITERATIONS",
    "AreaWrite",
    "CipherSpec",
    "KeySlot",
    "KeySlotAmend",
    "LuksCipher",
    "LuksHeader",
    "af_merge",
    "af_split",
    "build_luks",
    "create_luks",
    "iterations_for_time",
    "layout",
    "luks_info",
    "open_luks",
    "pack_fde_extension",
    "parse_cipher_mode",
    "parse_fde_extension",
    "pbkdf2",
    "pbkdf2_count_iters",
    "pbkdf2_iterations",
    "pbkdf2_key",
    "pbkdf2_rate",
    "plan_add_key",
    "plan_erase_keys",
    "plan_keyslot_amend",
    "slot_opens",
    "spec_from_options",
    "unlock",
]
