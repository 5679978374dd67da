"""qcow2 amend through the Python API: option refusals with their exact classes and
messages (nothing written when refused), and LUKS key slots added and removed, including
the write order that keeps a crash from losing a working key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import diskimg
from diskimg.crypto.luks import LuksHeader, plan_add_key, plan_erase_keys, slot_opens, unlock
from diskimg.errors import (
    InvalidPassphraseError,
    MissingSecretError,
    UnsupportedFeatureError,
    UsageError,
)
from diskimg.qcow2.amend import (
    amend,
    luks_add_key,
    luks_area,
    luks_remove_keys,
    read_header,
    validate_amend_options,
)

KEY = {"encrypt.key-secret": "k"}


@contextmanager
def exact(cls: type[Exception], message: str) -> Iterator[None]:
    """Expect ``cls`` with exactly ``message``."""
    with pytest.raises(cls) as exc:
        yield
    assert str(exc.value) == message


def make(tmp_path: Path, **opts: str) -> Path:
    img = tmp_path / "a.qcow2"
    diskimg.create(img, "qcow2", 1 << 20, options=opts, secrets={"k": b"pw0"})
    return img


def luks(tmp_path: Path) -> Path:
    img = make(tmp_path, **{"encrypt.format": "luks", "encrypt.key-secret": "k",
                            "encrypt.iter-time": "0"})
    with diskimg.open(img, "r+", secrets={"k": b"pw0"}, options=KEY) as d:
        d.write(0, b"secret data" * 100)
    return img


def area_of(img: Path) -> tuple[int, bytes]:
    from diskimg.hostio import open_host_file

    host = open_host_file(img, False, lock_mode=False)
    try:
        off, length = luks_area(read_header(host), None)
        return off, host.pread_exact(off, length, "LUKS area")
    finally:
        host.close()


@pytest.mark.parametrize("create,options,cls,message", [
    ({"extended_l2": "on"}, {"compat": "0.10"}, UsageError,
     "Cannot downgrade an image with incompatible features 0x10 set"),
    ({"compression_type": "zstd"}, {"compat": "0.10"}, UsageError,
     "Cannot downgrade an image with incompatible features 0x8 set"),
    ({"refcount_bits": "8"}, {"compat": "0.10"}, UsageError,
     "compat=0.10 requires refcount_bits=16"),
    ({}, {"compat": "0.10", "refcount_bits": "8"}, UsageError,
     "Refcount widths other than 16 bits require compatibility level 1.1 or above "
     "(use compat=1.1 or greater)"),
    ({"compat": "0.10"}, {"lazy_refcounts": "on"}, UsageError,
     "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
     "or greater)"),
    ({}, {"compat": "2.0"}, UsageError, "Unknown compatibility level 2.0"),
    ({}, {"refcount_bits": "3"}, UsageError,
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({}, {"encrypt.state": "active", "encrypt.new-secret": "k"}, UsageError,
     "Can't amend encryption options - encryption not present"),
    ({"encrypt.format": "aes", "encrypt.key-secret": "k"},
     {"encrypt.state": "inactive", "encrypt.keyslot": "0"}, UnsupportedFeatureError,
     "Only LUKS encryption options can be amended"),
])
def test_refusals_write_nothing(tmp_path: Path, create: dict[str, str],
                                options: dict[str, str], cls: type[Exception],
                                message: str) -> None:
    img = make(tmp_path, **create)
    before = img.read_bytes()
    with pytest.raises(cls) as exc:
        amend(img, options, secrets={"k": b"pw0"}, image_options=KEY)
    assert str(exc.value) == message
    assert img.read_bytes() == before


@pytest.mark.parametrize("pairs,message", [
    ([("foo", "bar")], "Invalid parameter 'foo'"),
    ([("cluster_size", "4k")],
     "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"),
    ([("encrypt.format", "luks")],
     "Invalid parameter 'encrypt.format'\nThis option is only supported for image creation"),
    ([("encrypt.keyslot", "x")], "Parameter 'encrypt.keyslot' expects a number"),
    ([("encrypt.iter-time", "99999999999999999999")],
     "Value '99999999999999999999' is too large for parameter 'encrypt.iter-time'"),
    ([("lazy_refcounts", "yes")], "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
])
def test_unknown_and_malformed_options(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        validate_amend_options(pairs)
    assert str(exc.value) == message


def test_number_syntax_like_qemu() -> None:
    got = validate_amend_options([("encrypt.keyslot", "0x3"), ("encrypt.iter-time", "010")])
    assert got == {"encrypt.keyslot": "3", "encrypt.iter-time": "8"}
    assert validate_amend_options([("encrypt.keyslot", "-1")]) == {"encrypt.keyslot": "-1"}


def test_add_and_remove_keys(tmp_path: Path) -> None:
    img = luks(tmp_path)
    assert luks_add_key(img, b"pw0", b"pw1", iter_time_ms=0) == 1
    assert luks_add_key(img, b"pw1", b"pw2", keyslot=7, iter_time_ms=0) == 7
    for pw in (b"pw0", b"pw1", b"pw2"):
        with diskimg.open(img, secrets={"k": pw}, options=KEY) as d:
            assert d.read(0, 11) == b"secret data"
    with exact(UsageError, "Refusing to overwrite active keyslot 7 - please erase it "
               "first"):
        luks_add_key(img, b"pw0", b"pw3", keyslot=7, iter_time_ms=0)
    assert luks_add_key(img, b"pw0", b"pw3", keyslot=7, iter_time_ms=0, force=True) == 7
    assert luks_remove_keys(img, b"pw0", old_secret=b"pw1") == [1]
    assert luks_remove_keys(img, b"pw3", keyslot=0) == [0]
    with exact(InvalidPassphraseError, "Invalid password, cannot unlock any keyslot"):
        diskimg.open(img, secrets={"k": b"pw0"}, options=KEY)
    with pytest.raises(UsageError) as exc:
        luks_remove_keys(img, b"pw3", keyslot=7)
    assert str(exc.value) == ("Attempt to erase the only active keyslot 7 which will erase "
                              "all the data in the image irreversibly - refusing operation")
    with exact(UsageError, "All the active keyslots match the (old) password that was given "
               "and erasing them will erase all the data in the image irreversibly - refusing "
               "operation"):
        luks_remove_keys(img, b"pw3", old_secret=b"pw3")
    with exact(InvalidPassphraseError, "Given keyslot 7 doesn't contain the given old "
               "password for erase operation"):
        luks_remove_keys(img, b"pw3", keyslot=7, old_secret=b"pw0")
    with diskimg.open(img, secrets={"k": b"pw3"}, options=KEY) as d:
        assert d.read(0, 11) == b"secret data"
    assert luks_remove_keys(img, b"pw3", keyslot=7, force=True) == [7]
    with pytest.raises(InvalidPassphraseError):
        diskimg.open(img, secrets={"k": b"pw3"}, options=KEY)


def test_all_slots_in_use(tmp_path: Path) -> None:
    img = luks(tmp_path)
    for _ in range(7):
        luks_add_key(img, b"pw0", b"pw1", iter_time_ms=0)
    with exact(UsageError, "Can't add a keyslot - all keyslots are in use"):
        luks_add_key(img, b"pw0", b"pw1", iter_time_ms=0)


def test_amend_keyslots_needs_the_unlock_secret(tmp_path: Path) -> None:
    img = luks(tmp_path)
    opts = {"encrypt.state": "active", "encrypt.new-secret": "n", "encrypt.iter-time": "0"}
    with exact(MissingSecretError, "Parameter 'encrypt.key-secret' is required for cipher"):
        amend(img, opts, secrets={"n": b"x"})
    with exact(MissingSecretError, "No secret with id 'n'"):
        amend(img, opts, secrets={"k": b"pw0"}, image_options=KEY)
    with pytest.raises(InvalidPassphraseError) as exc:
        amend(img, opts, secrets={"k": b"hunter2", "n": b"x"}, image_options=KEY)
    assert "hunter2" not in str(exc.value) and "hunter2" not in repr(exc.value)
    amend(img, opts, secrets={"k": b"pw0", "n": b"x"}, image_options=KEY)
    with diskimg.open(img, secrets={"k": b"x"}, options=KEY) as d:
        assert d.read(0, 11) == b"secret data"


def test_crash_between_key_writes_never_loses_a_key(tmp_path: Path) -> None:
    """Replay only a prefix of each plan on the area, as a crash would leave it."""
    img = luks(tmp_path)
    luks_add_key(img, b"pw0", b"pw1", iter_time_ms=0)
    _off, area = area_of(img)
    hdr = LuksHeader.parse(area, len(area))
    mk, _slot = unlock(hdr, area, b"pw0")

    def replay(writes: list, n: int) -> bytes:  # type: ignore[type-arg]
        buf = bytearray(area)
        for w in writes[:n]:
            buf[w.offset:w.offset + len(w.data)] = w.data
        return bytes(buf)

    slot, _new, writes = plan_add_key(hdr, mk, b"pw2", iter_time_ms=0)
    assert slot == 2 and [w.offset for w in writes] == [hdr.slots[2].key_offset * 512, 0]
    half = replay(writes, 1)  # material written, header not yet: old keys still work
    h1 = LuksHeader.parse(half, len(half))
    assert slot_opens(h1, half, 0, b"pw0") and not h1.slots[2].active
    full = replay(writes, 2)
    assert slot_opens(LuksHeader.parse(full, len(full)), full, 2, b"pw2")
    # replacing an active slot deactivates it first: never active over half-written material
    slot, _new, writes = plan_add_key(hdr, mk, b"pw2", keyslot=1, iter_time_ms=0, force=True)
    assert [w.offset for w in writes] == [0, hdr.slots[1].key_offset * 512, 0]
    for n in (1, 2):
        part = replay(writes, n)
        hp = LuksHeader.parse(part, len(part))
        assert not hp.slots[1].active and slot_opens(hp, part, 0, b"pw0")
    # an erase writes the header first: the slot is gone before its material is scrubbed
    _new, writes = plan_erase_keys(hdr, [1])
    assert writes[0].offset == 0 and len(writes) == 2
    part = replay(writes, 1)
    assert not LuksHeader.parse(part, len(part)).slots[1].active
    mk[:] = bytes(len(mk))
