"""diskimg.crypto.luks.header: QEMU's layout, the header/key-slot records (parse/pack of
diskimg- and qemu-made headers), luks_info, hostile fields, and the layout importable
without ``cryptography``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest

from diskimg.crypto.luks import (
    LUKS_HEADER_SIZE,
    LuksHeader,
    build_luks,
    layout,
    luks_info,
    open_luks,
    spec_from_options,
)
from diskimg.errors import (
    DiskImgError,
    FormatError,
    UnsupportedFeatureError,
)

PASS = b"correct horse"
MK64 = bytes(range(1, 65))  # halves differ: XTS accepts it


@pytest.fixture(scope="module")
def default_area() -> bytes:
    area, _cipher, _hdr = build_luks(PASS, {}, 0, master_key=MK64)
    return area


def test_default_header_layout(default_area: bytes) -> None:
    hdr = LuksHeader.parse(default_area, len(default_area))
    assert (hdr.cipher_name, hdr.cipher_mode, hdr.hash_spec, hdr.key_bytes) == \
        ("aes", "xts-plain64", "sha256", 64)
    assert len(default_area) == hdr.payload_offset * 512 == 2068480
    assert [s.key_offset * 512 for s in hdr.slots] == \
        [4096 + i * 258048 for i in range(8)]
    assert [s.active for s in hdr.slots] == [True] + [False] * 7
    assert hdr.slots[0].iterations == 1000 and hdr.mk_digest_iter == 1000
    assert all(s.stripes == 4000 for s in hdr.slots)
    assert all(s.iterations == 0 and s.salt == bytes(32) for s in hdr.slots[1:])
    assert hdr.pack() == default_area[:LUKS_HEADER_SIZE]
    # nothing but slot 0's material after the header
    assert not any(default_area[LUKS_HEADER_SIZE:4096])
    assert not any(default_area[4096 + 256000:])

def test_aes192_cbc_material_padded_to_sectors() -> None:
    spec, _ = spec_from_options({"cipher-alg": "aes-192", "cipher-mode": "cbc"})
    assert spec.material_sectors == 188  # 96000 bytes, qemu 7.2 aborts on this one
    offsets, payload = layout(spec)
    assert offsets[:2] == [8, 8 + 192] and payload == 8 + 8 * 192

# --- luks_info ------------------------------------------------------------------------------

def test_luks_info_shape(default_area: bytes) -> None:
    info = luks_info(default_area)
    assert list(info) == ["ivgen-alg", "hash-alg", "cipher-alg", "uuid", "format",
                          "cipher-mode", "slots", "payload-offset", "master-key-iters"]
    assert info["slots"][0] == {"active": True, "iters": 1000, "key-offset": 4096,
                                "stripes": 4000}
    assert info["slots"][1] == {"active": False, "key-offset": 262144}
    assert info["payload-offset"] == 2068480 and info["format"] == "luks"

# --- malformed headers -----------------------------------------------------------------------

def _patch(area: bytes, off: int, data: bytes) -> bytes:
    b = bytearray(area)
    b[off:off + len(data)] = data
    return bytes(b)


def _u32(v: int) -> bytes:
    return struct.pack(">I", v)

SLOT1 = 208 + 48


BAD: list[tuple[str, Callable[[bytes], bytes], type[DiskImgError], int | None]] = [
    ("magic", lambda a: _patch(a, 0, b"LUKZ"), FormatError, 0),
    ("version 2", lambda a: _patch(a, 6, b"\x00\x02"), UnsupportedFeatureError, 6),
    ("unknown cipher", lambda a: _patch(a, 8, b"rot13\0"), UnsupportedFeatureError, 8),
    ("unterminated cipher", lambda a: _patch(a, 8, b"a" * 32), FormatError, 8),
    ("non-ascii cipher", lambda a: _patch(a, 8, b"\xff\0"), FormatError, 8),
    ("mode without ivgen", lambda a: _patch(a, 40, b"xts\0"), UnsupportedFeatureError, 40),
    ("unknown mode", lambda a: _patch(a, 40, b"lrw-plain64\0"), UnsupportedFeatureError, 40),
    ("unknown ivgen", lambda a: _patch(a, 40, b"xts-benbi\0\0\0\0"), UnsupportedFeatureError,
     40),
    ("essiv without hash", lambda a: _patch(a, 40, b"xts-essiv\0\0\0"), FormatError, 40),
    ("unterminated hash", lambda a: _patch(a, 72, b"s" * 32), FormatError, 72),
    ("unknown hash", lambda a: _patch(a, 72, b"whirlpool\0"), UnsupportedFeatureError, 72),
    ("key bytes 0", lambda a: _patch(a, 108, _u32(0)), FormatError, 108),
    ("key bytes 2^32-1", lambda a: _patch(a, 108, _u32(0xFFFFFFFF)), FormatError, 108),
    ("key bytes 32 for aes-xts-256 is aes-128: 24 not", lambda a: _patch(a, 108, _u32(24)),
     FormatError, 108),
    ("payload 2^32-1", lambda a: _patch(a, 104, _u32(0xFFFFFFFF)), FormatError, 104),
    ("payload inside key material", lambda a: _patch(a, 104, _u32(100)), FormatError, None),
    ("mk digest iter 0", lambda a: _patch(a, 164, _u32(0)), FormatError, 164),
    ("unterminated uuid", lambda a: _patch(a, 168, b"u" * 40), FormatError, 168),
    ("slot state", lambda a: _patch(a, SLOT1, _u32(0x12345678)), FormatError, SLOT1),
    ("stripes 2^32-1", lambda a: _patch(a, SLOT1 + 44, _u32(0xFFFFFFFF)), FormatError,
     SLOT1 + 44),
    ("stripes 1", lambda a: _patch(a, 208 + 44, _u32(1)), FormatError, 208 + 44),
    ("key offset past area", lambda a: _patch(a, SLOT1 + 40, _u32(0xFFFFFF00)), FormatError,
     SLOT1 + 40),
    ("key offset in header", lambda a: _patch(a, 208 + 40, _u32(1)), FormatError, 208 + 40),
    ("key offset overlaps slot 0", lambda a: _patch(a, SLOT1 + 40, _u32(16)), FormatError,
     SLOT1 + 40),
    ("active slot 0 iterations", lambda a: _patch(a, 208 + 4, _u32(0)), FormatError, 212),
    ("truncated", lambda a: a[:300], FormatError, 0),
]


@pytest.mark.parametrize(("what", "mutate", "exc", "offset"), BAD, ids=[b[0] for b in BAD])
def test_malformed_header(default_area: bytes, what: str, mutate: Callable[[bytes], bytes],
                          exc: type[DiskImgError], offset: int | None) -> None:
    bad = mutate(default_area)
    t0 = time.monotonic()
    with pytest.raises(exc) as ei:
        open_luks(bad, PASS)
    assert time.monotonic() - t0 < 2
    assert isinstance(ei.value, FormatError)
    assert "Invalid password" not in str(ei.value)
    if offset is not None:
        assert ei.value.offset == offset
        assert f"0x{offset:x}" in str(ei.value)
