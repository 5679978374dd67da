"""The LUKS1 on-disk layout: the 592-byte header, its key-slot records, and where QEMU puts
key material.  The one place these facts live; imports no ``cryptography`` (``qemu-img
measure`` uses :func:`luks_header_size` without it).

Written from the LUKS1 on-disk format specification (v1.2.3), checked byte for byte against
images qemu-img 7.2 makes.  All integers are **big-endian**; names are NUL-terminated
ASCII::

    0   magic          "LUKS\\xba\\xbe"
    6   version        u16 = 1            (QEMU implements LUKS1 only)
    8   cipher-name    char[32]           "aes", "twofish", "serpent", "cast5"
    40  cipher-mode    char[32]           "xts-plain64", "cbc-essiv:sha256", ...
    72  hash-spec      char[32]           "sha256", ...
    104 payload-offset u32                in 512-byte sectors
    108 key-bytes      u32                master key length
    112 mk-digest      byte[20]           PBKDF2(master key, mk-digest-salt, mk-digest-iter)
    132 mk-digest-salt byte[32]
    164 mk-digest-iter u32
    168 uuid           char[40]
    208 key slot i at 208 + 48*i, i = 0..7:
        0 active u32 (0x00AC71F3 / 0x0000DEAD), 4 iterations u32, 8 salt byte[32],
        40 key-material-offset u32 (sectors), 44 stripes u32 (= 4000)

QEMU's layout of a new header (:func:`layout`): the header in the first 4096 bytes, key
slot *i* at ``4096 + i * stride`` with ``stride = align4096(ceil(key-bytes * 4000 / 512) *
512)``, the payload right after slot 7; inactive slots keep their offset and stripes.

Invariant of a parsed :class:`LuksHeader`: every field was validated (known names and key
size, 4000 stripes, each slot's key material after the header, before the payload, inside
the area when its length is known, and overlapping no other slot) before anything acts on
it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from diskimg.crypto import HASH_NAMES, IVGEN_NAMES, SECTOR_SIZE
from diskimg.errors import FormatError, UnsupportedFeatureError, UsageError

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

# header field offsets
OFF_MAGIC = 0
OFF_VERSION = 6
OFF_CIPHER_NAME = 8
OFF_CIPHER_MODE = 40
OFF_HASH_SPEC = 72
OFF_PAYLOAD_OFFSET = 104
OFF_KEY_BYTES = 108
OFF_MK_DIGEST = 112
OFF_MK_DIGEST_SALT = 132
OFF_MK_DIGEST_ITER = 164
OFF_UUID = 168
# key-slot field offsets, relative to the slot record (:func:`slot_offset`)
SLOT_ACTIVE = 0
SLOT_ITERATIONS = 4
SLOT_SALT = 8
SLOT_KEY_OFFSET = 40
SLOT_STRIPES = 44

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HDR.size == LUKS_SLOT_OFFSET and _SLOT.size == LUKS_SLOT_SIZE
assert LUKS_SLOT_OFFSET + LUKS_NUM_SLOTS * LUKS_SLOT_SIZE == LUKS_HEADER_SIZE

#: key bytes of every ``encrypt.cipher-alg`` qemu 7.2 accepts (XTS doubles them)
QEMU_CIPHER_KEY_BYTES: dict[str, int] = {
    "aes-128": 16, "aes-192": 24, "aes-256": 32, "des": 8, "3des": 24, "cast5-128": 16,
    "serpent-128": 16, "serpent-192": 24, "serpent-256": 32, "twofish-128": 16,
    "twofish-192": 24, "twofish-256": 32, "sm4": 16,
}
#: cipher names QEMU 7.2 reads in a LUKS header
LUKS_CIPHER_NAMES = ("aes", "serpent", "twofish", "cast5")
#: LUKS cipher names -> key sizes in bytes (XTS doubles them)
CIPHER_KEY_SIZES: dict[str, tuple[int, ...]] = {
    name: tuple(n for alg, n in QEMU_CIPHER_KEY_BYTES.items() if alg.startswith(name + "-"))
    for name in LUKS_CIPHER_NAMES
}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
#: ciphers whose data path is implemented (:mod:`.cipher`, needs the primitive in
#: ``cryptography``); here so that an unlock checks it before importing the cipher
IMPLEMENTED_CIPHERS = ("aes",)


def slot_offset(index: int) -> int:
    """Byte offset of key-slot record ``index`` in the header."""
    return LUKS_SLOT_OFFSET + index * LUKS_SLOT_SIZE


def header_error(field_name: str, offset: int, detail: str) -> FormatError:
    """The error for a bad header field: names the field and its offset in the area."""
    return FormatError(f"Invalid LUKS header: {detail} (field '{field_name}' at "
                       f"0x{offset:x})", offset=offset)


def _cstr(raw: bytes, field_name: str, offset: int) -> str:
    nul = raw.find(b"\0")
    if nul < 0:
        raise header_error(field_name, offset, f"{field_name} is not NUL-terminated")
    try:
        return raw[:nul].decode("ascii")
    except UnicodeDecodeError as err:
        raise header_error(field_name, offset, f"{field_name} is not ASCII") from err


def _pad_name(s: str, n: int) -> bytes:
    b = s.encode("ascii")
    if len(b) >= n:
        raise UsageError(f"name '{s}' too long for a {n}-byte LUKS field")
    return b.ljust(n, b"\0")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def material_sectors(key_bytes: int) -> int:
    """512-byte sectors one key slot's split key (``key_bytes * 4000``) occupies."""
    return -(-key_bytes * LUKS_STRIPES // SECTOR_SIZE)


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
        return material_sectors(self.key_bytes)


def parse_cipher_mode(mode: str, field_offset: int = OFF_CIPHER_MODE
                      ) -> tuple[str, str, str | None]:
    """``"cbc-essiv:sha256"`` -> ("cbc", "essiv", "sha256")."""
    where = f"(field 'cipher-mode' at 0x{field_offset:x})"
    if "-" not in mode:
        raise UnsupportedFeatureError(
            f"Unexpected LUKS cipher mode string format '{mode}' {where}", offset=field_offset)
    m, iv = mode.split("-", 1)
    ivhash: str | None = None
    if ":" in iv:
        iv, ivhash = iv.split(":", 1)
    if m not in CIPHER_MODES:
        raise UnsupportedFeatureError(f"Unsupported LUKS cipher mode '{m}' {where}",
                                      offset=field_offset)
    if iv not in IVGEN_NAMES:
        raise UnsupportedFeatureError(f"Unsupported LUKS IV generator '{iv}' {where}",
                                      offset=field_offset)
    if ivhash is not None and ivhash not in HASH_NAMES:
        raise UnsupportedFeatureError(f"Unsupported LUKS IV generator hash '{ivhash}' {where}",
                                      offset=field_offset)
    if iv == "essiv" and ivhash is None:
        raise FormatError(f"LUKS essiv IV generator without a hash {where}",
                          offset=field_offset)
    return m, iv, ivhash


@dataclass(slots=True)
class KeySlot:
    """One key-slot record (``key_offset`` in sectors)."""

    active: bool
    iterations: int
    salt: bytes
    key_offset: int
    stripes: int = LUKS_STRIPES

    def pack(self) -> bytes:
        return _SLOT.pack(LUKS_KEY_SLOT_ACTIVE if self.active else LUKS_KEY_SLOT_INACTIVE,
                          self.iterations, self.salt, self.key_offset, self.stripes)

    def erased(self) -> KeySlot:
        """This slot inactive: zero iterations and salt, offset and stripes kept."""
        return KeySlot(False, 0, bytes(LUKS_SALT_LEN), self.key_offset, self.stripes)


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
        return material_sectors(self.key_bytes) * SECTOR_SIZE

    def copy(self) -> LuksHeader:
        """A deep copy (the slots are new objects)."""
        return LuksHeader(self.cipher_name, self.cipher_mode, self.hash_spec,
                          self.payload_offset, self.key_bytes, self.mk_digest,
                          self.mk_digest_salt, self.mk_digest_iter, self.uuid,
                          [KeySlot(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
                           for s in self.slots])

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
                              offset=OFF_MAGIC)
        if version != LUKS_VERSION:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS version {version} (field 'version' at 0x6)",
                offset=OFF_VERSION)
        cipher_name = _cstr(cname, "cipher-name", OFF_CIPHER_NAME)
        cipher_mode = _cstr(cmode, "cipher-mode", OFF_CIPHER_MODE)
        hash_spec = _cstr(hspec, "hash-spec", OFF_HASH_SPEC)
        uuid = _cstr(uuid_raw, "uuid", OFF_UUID)
        if cipher_name not in CIPHER_KEY_SIZES:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS cipher '{cipher_name}' (field 'cipher-name' at 0x8)",
                offset=OFF_CIPHER_NAME)
        mode, _iv, _ivh = parse_cipher_mode(cipher_mode)
        if hash_spec not in HASH_NAMES:
            raise UnsupportedFeatureError(
                f"Unsupported LUKS hash '{hash_spec}' (field 'hash-spec' at 0x48)",
                offset=OFF_HASH_SPEC)
        sizes = CIPHER_KEY_SIZES[cipher_name]
        if mode == "xts":
            sizes = tuple(2 * s for s in sizes)
        if key_bytes not in sizes:
            raise header_error("key-bytes", OFF_KEY_BYTES, f"key length {key_bytes} is not "
                               f"valid for {cipher_name}-{mode} (expected one of "
                               f"{list(sizes)})")
        if diter < 1:
            raise header_error("mk-digest-iter", OFF_MK_DIGEST_ITER,
                               "master key digest iterations is 0")
        hdr = cls(cipher_name, cipher_mode, hash_spec, payload, key_bytes, digest, dsalt,
                  diter, uuid)
        if area_len is not None and payload * SECTOR_SIZE > area_len:
            raise header_error("payload-offset", OFF_PAYLOAD_OFFSET, f"payload offset {payload} "
                               f"sectors lies past the end of the {area_len}-byte LUKS area")
        for i in range(LUKS_NUM_SLOTS):
            hdr.slots.append(_parse_slot(buf, i, hdr, area_len))
        return hdr

    # ---- pack ----
    def pack(self) -> bytes:
        out = bytearray(_HDR.pack(
            LUKS_MAGIC, LUKS_VERSION, _pad_name(self.cipher_name, 32),
            _pad_name(self.cipher_mode, 32), _pad_name(self.hash_spec, 32),
            self.payload_offset, self.key_bytes, self.mk_digest, self.mk_digest_salt,
            self.mk_digest_iter, _pad_name(self.uuid, 40)))
        for s in self.slots:
            out += s.pack()
        assert len(out) == LUKS_HEADER_SIZE
        return bytes(out)


def _parse_slot(buf: bytes, i: int, hdr: LuksHeader, area_len: int | None) -> KeySlot:
    """Key slot ``i`` of ``buf``, checked against the header and the slots before it
    (``hdr.slots``)."""
    off = slot_offset(i)
    active, iters, salt, koff, stripes = _SLOT.unpack_from(buf, off)
    name = f"key-slot[{i}]"
    if active not in (LUKS_KEY_SLOT_ACTIVE, LUKS_KEY_SLOT_INACTIVE):
        raise header_error(f"{name}.active", off + SLOT_ACTIVE,
                           f"key slot {i} state 0x{active:08x} is neither active nor inactive")
    if stripes != LUKS_STRIPES:
        raise header_error(f"{name}.stripes", off + SLOT_STRIPES,
                           f"key slot {i} has {stripes} stripes, expected {LUKS_STRIPES}")
    if active == LUKS_KEY_SLOT_ACTIVE and iters < 1:
        raise header_error(f"{name}.iterations", off + SLOT_ITERATIONS,
                           f"active key slot {i} has 0 iterations")
    koff_field, koff_at = f"{name}.key-material-offset", off + SLOT_KEY_OFFSET
    if koff < -(-LUKS_HEADER_SIZE // SECTOR_SIZE):
        raise header_error(koff_field, koff_at,
                           f"key slot {i} material at sector {koff} overlaps the LUKS header")
    end = koff + material_sectors(hdr.key_bytes)
    if area_len is not None and end * SECTOR_SIZE > area_len:
        raise header_error(koff_field, koff_at, f"key slot {i} material (sectors "
                           f"{koff}..{end}) lies outside the {area_len}-byte LUKS area")
    if end > hdr.payload_offset:
        raise header_error(koff_field, koff_at, f"key slot {i} material (sectors {koff}..{end}) "
                           f"overlaps the payload at sector {hdr.payload_offset}")
    for j, other in enumerate(hdr.slots):
        if koff < other.key_offset + material_sectors(hdr.key_bytes) and other.key_offset < end:
            raise header_error(koff_field, koff_at, f"key slot {i} material overlaps key slot {j}")
    return KeySlot(active == LUKS_KEY_SLOT_ACTIVE, iters, salt, koff, stripes)


def slot_layout(key_bytes: int) -> tuple[list[int], int]:
    """QEMU's layout for ``key_bytes``: (key material offsets in sectors of the 8 slots,
    payload offset in sectors)."""
    align = LUKS_ALIGN // SECTOR_SIZE
    first = _align(-(-LUKS_HEADER_SIZE // SECTOR_SIZE), align)
    stride = _align(material_sectors(key_bytes), align)
    offsets = [first + i * stride for i in range(LUKS_NUM_SLOTS)]
    return offsets, first + LUKS_NUM_SLOTS * stride


def layout(spec: CipherSpec) -> tuple[list[int], int]:
    """:func:`slot_layout` of ``spec``'s key size."""
    return slot_layout(spec.key_bytes)


def luks_header_size(cipher_alg: str = "aes-256", cipher_mode: str = "xts") -> int:
    """Bytes of the LUKS header and key material qemu writes (its payload offset) for an
    ``encrypt.cipher-alg`` of :data:`QEMU_CIPHER_KEY_BYTES` and a mode."""
    key = QEMU_CIPHER_KEY_BYTES[cipher_alg] * (2 if cipher_mode == "xts" else 1)
    return slot_layout(key)[1] * SECTOR_SIZE


def measured_payload(options: Mapping[str, Any], has_secret: Callable[[str], bool] | None,
                     prefix: str = "") -> int:
    """``qemu-img measure``'s LUKS header size for create options ``options`` (names
    after ``prefix``: ``encrypt.`` in qcow2, none for the luks format), checked as qemu
    checks them: the key secret must be named and exist."""
    sid = options.get(f"{prefix}key-secret")
    if sid is None:
        raise UsageError(f"Parameter '{prefix}key-secret' is required for cipher")
    if has_secret is not None and not has_secret(str(sid)):
        raise UsageError(f"No secret with id '{sid}'")
    alg = str(options.get(f"{prefix}cipher-alg") or "aes-256")
    mode = str(options.get(f"{prefix}cipher-mode") or "xts")
    if alg not in QEMU_CIPHER_KEY_BYTES:
        raise UsageError(f"Parameter 'cipher-alg' does not accept value '{alg}'")
    if mode not in CIPHER_MODES:
        raise UsageError(f"Parameter 'cipher-mode' does not accept value '{mode}'")
    return luks_header_size(alg, mode)


def luks_info(header: LuksHeader | bytes | memoryview) -> dict[str, Any]:
    """qemu-img 7.2's ``format-specific.data.encrypt`` dict for a LUKS qcow2 (same keys,
    values and key order as its JSON output); needs no secret."""
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
