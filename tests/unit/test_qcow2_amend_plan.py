"""qcow2.amend_plan: amend's option syntax and its plan -- which option combinations are
refused with which message, computed from a header alone (no file) -- and, end to end,
that every such refusal leaves the image byte-identical (the plan runs before any
write)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

import diskimg
from diskimg.crypto.luks import KeySlotAmend
from diskimg.errors import DiskImgError, UnsupportedFeatureError, UsageError
from diskimg.qcow2.amend import amend
from diskimg.qcow2.amend_plan import (
    AmendPlan,
    check_resize,
    keyslot_request,
    plan_amend,
    qemu_number,
    validate_amend_options,
)
from diskimg.qcow2.create import plan_header
from diskimg.qcow2.layout import QCOW_CRYPT_AES, QCOW_CRYPT_LUKS, Header

MiB = 1 << 20


def header(backing: str | None = None, **opts: str) -> Header:
    """A new image's header as ``create -o`` would write it (nothing on disk)."""
    return plan_header(16 * MiB, dict(opts), backing, "qcow2" if backing else None)[0]


def with_crypt(h: Header, method: int) -> Header:
    h = h.copy()
    h.crypt_method = method
    return h


V3 = header()
V2 = header(compat="0.10")
LAZY_MSG = ("Lazy refcounts only supported with compatibility level 1.1 and above (use "
            "compat=1.1 or greater)")
WIDTH_MSG = "Refcount width must be a power of two and may not exceed 64 bits"

# (header, options, error class, message)
REFUSALS: list[tuple[Header, dict[str, str], type[Exception], str]] = [
    (V3, {"compat": "0.9"}, UsageError, "Unknown compatibility level 0.9"),
    (V3, {"data_file": "x"}, UsageError,
     "data-file can only be set for images that use an external data file"),
    (V3, {"data_file": ""}, UsageError,  # qemu: an empty name is still a name
     "data-file can only be set for images that use an external data file"),
    (header(data_file="d.raw"), {"data_file_raw": "on"}, UsageError,
     "data-file-raw cannot be set on existing images"),
    (V3, {"encrypt.state": "active"}, UsageError,
     "Can't amend encryption options - encryption not present"),
    (with_crypt(V3, QCOW_CRYPT_AES), {"encrypt.state": "active"}, UnsupportedFeatureError,
     "Only LUKS encryption options can be amended"),
    (header("b.qcow2"), {"backing_file": "c.qcow2"}, UsageError,
     "Cannot amend the backing file\nYou can use 'diskimg rebase' instead."),
    (V3, {"backing_fmt": "raw"}, UsageError,
     "Cannot amend the backing file\nYou can use 'diskimg rebase' instead."),
    (V3, {"refcount_bits": "3"}, UsageError, WIDTH_MSG),
    (V3, {"refcount_bits": "0"}, UsageError, WIDTH_MSG),
    (V3, {"refcount_bits": "128"}, UsageError, WIDTH_MSG),
    (V3, {"refcount_bits": "x"}, UsageError, "Parameter 'refcount_bits' expects a number"),
    (V3, {"compat": "0.10", "refcount_bits": "8"}, UsageError,
     "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
     "compat=1.1 or greater)"),
    (header(refcount_bits="8"), {"compat": "0.10"}, UsageError,
     "compat=0.10 requires refcount_bits=16"),
    (V3, {"compat": "0.10", "lazy_refcounts": "on"}, UsageError, LAZY_MSG),
    (V2, {"lazy_refcounts": "on"}, UsageError, LAZY_MSG),
    (V3, {"lazy_refcounts": "maybe"}, UsageError,
     "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    (header(data_file="d.raw"), {"compat": "0.10"}, UsageError,
     "Cannot downgrade an image with a data file"),
    (header(extended_l2="on"), {"compat": "0.10"}, UsageError,
     "Cannot downgrade an image with incompatible features 0x10 set"),
    (header(compression_type="zstd"), {"compat": "0.10"}, UsageError,
     "Cannot downgrade an image with incompatible features 0x8 set"),
    (V3, {"size": "1x"}, UsageError, "Parameter 'size' expects a non-negative number "
     "below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
     "peta-\nand exabytes, respectively."),
]


@pytest.mark.parametrize("h,options,cls,message", REFUSALS,
                         ids=[",".join(f"{k}={v}" for k, v in c[1].items()) for c in REFUSALS])
def test_plan_refusals(h: Header, options: dict[str, str], cls: type[Exception],
                       message: str) -> None:
    before = h.pack()
    with pytest.raises(cls) as exc:
        plan_amend(h, options)
    assert str(exc.value) == message
    assert h.pack() == before  # the header object is not changed either


def test_plan_accepts_current_values() -> None:
    # data_file / backing_* may be given with their current values (qemu accepts them)
    h = header(data_file="d.raw")
    assert plan_amend(h, {"data_file": "d.raw"}) == AmendPlan(3, 3, 16, data_file="d.raw")
    # data_file_raw may be cleared (also without a data file) but not set
    assert plan_amend(h, {"data_file_raw": "off"}) == AmendPlan(3, 3, 16, data_file_raw=False)
    assert plan_amend(V3, {"data_file_raw": "off"}) == AmendPlan(3, 3, 16, data_file_raw=False)
    b = header("b.qcow2")
    assert plan_amend(b, {"backing_file": "b.qcow2", "backing_fmt": "qcow2"}) == \
        AmendPlan(3, 3, 16)


def test_plan_fields() -> None:
    p = plan_amend(V2, {"compat": "1.1", "refcount_bits": "64", "lazy_refcounts": "on",
                        "size": "33554432"})
    assert p == AmendPlan(2, 3, 64, True, 32 * MiB, None)
    assert (p.upgrade, p.downgrade, p.refcount_order) == (True, False, 6)
    d = plan_amend(V3, {"compat": "v2", "lazy_refcounts": "off"})
    assert (d.upgrade, d.downgrade, d.refcount_bits, d.lazy_refcounts) == (False, True, 16,
                                                                          False)
    assert plan_amend(V3, {}) == AmendPlan(3, 3, 16)
    luks = with_crypt(V3, QCOW_CRYPT_LUKS)
    k = plan_amend(luks, {"encrypt.state": "inactive", "encrypt.keyslot": "1"})
    assert k.keyslots == KeySlotAmend("inactive", keyslot=1)


def test_keyslot_request() -> None:
    assert keyslot_request({"encrypt.state": "active", "encrypt.new-secret": "n",
                            "encrypt.old-secret": "o", "encrypt.keyslot": "-1",
                            "encrypt.iter-time": "10"}) == KeySlotAmend(
        "active", new_secret="n", old_secret="o", keyslot=-1, iter_time=10)
    with pytest.raises(UsageError, match="'encrypt.keyslot' expects a number"):
        keyslot_request({"encrypt.keyslot": "one"})


def test_qemu_number() -> None:
    assert [qemu_number("n", t) for t in ("10", "0x10", "010", "+7", " 3 ")] == [
        10, 16, 8, 7, 3]
    assert qemu_number("n", "-1") == (1 << 64) - 1
    for bad, msg in (("abc", "Parameter 'n' expects a number"),
                     ("1.5", "Parameter 'n' expects a number"),
                     (str(1 << 64), f"Value '{1 << 64}' is too large for parameter 'n'")):
        with pytest.raises(UsageError) as exc:
            qemu_number("n", bad)
        assert str(exc.value) == msg


def test_validate_amend_options() -> None:
    assert validate_amend_options([("encrypt.keyslot", "0xffffffffffffffff"),
                                   ("encrypt.iter-time", "010"), ("size", "1M"),
                                   ("compat", "1.1"), ("encrypt.state", "active")]) == {
        "encrypt.keyslot": "-1", "encrypt.iter-time": "8", "size": str(MiB),
        "compat": "1.1", "encrypt.state": "active"}
    for pairs, msg in (
            ([("cluster_size", "4k")],
             "Invalid parameter 'cluster_size'\nThis option is only supported for image "
             "creation"),
            ([("foo", "bar")], "Invalid parameter 'foo'"),
            ([("lazy_refcounts", "yes please")],
             "Parameter 'lazy_refcounts' expects 'on' or 'off'")):
        with pytest.raises(UsageError) as exc:
            validate_amend_options(pairs)
        assert str(exc.value) == msg


def test_check_resize() -> None:
    snap = V2.copy()
    snap.nb_snapshots = 1
    cases: list[tuple[Header, dict[str, str], int, str | None]] = [
        (V3, {"size": "1000"}, 0, "The new size must be a multiple of 512"),
        (snap, {"size": "1048576"}, 0, "Can't resize a v2 image which has snapshots"),
        (snap, {"size": "1048576", "compat": "1.1"}, 0, None),  # resized after the upgrade
        (V3, {"size": "1048576"}, 1, None),  # bitmaps are resized with the disk
        (V3, {"size": str(16 * MiB)}, 1, None),  # the current size: no resize at all
        (V3, {"size": "1000"}, 0, "The new size must be a multiple of 512"),
        (V3, {}, 1, None),
    ]
    for h, options, bitmaps, msg in cases:
        plan = plan_amend(h, options)
        if msg is None:
            check_resize(h, plan, bitmaps)
            continue
        with pytest.raises(DiskImgError) as exc:
            check_resize(h, plan, bitmaps)
        assert str(exc.value) == msg


# --- end to end: a refused amend leaves every byte as it was --------------------------


def _image(tmp_path: Path, name: str, **opts: str) -> Path:
    p = tmp_path / name
    diskimg.create(p, "qcow2", 4 * MiB, options=opts or None)
    with diskimg.open(p, "r+") as d:
        d.write(0, b"\x11" * 65536)
        d.write_zeroes(MiB, 65536)
        d.write(3 * MiB, b"\x22" * 4096)
    return p


def _v2_with_snapshot(tmp_path: Path) -> Path:
    p = _image(tmp_path, "v2s.qcow2", compat="0.10")
    diskimg.snapshot(p, "create", "s1")
    return p


E2E: list[tuple[str, Callable[[Path], Path], dict[str, str], str]] = [
    ("compat-foo", lambda t: _image(t, "a.qcow2"), {"compat": "foo"},
     "Unknown compatibility level foo"),
    ("lazy-v2", lambda t: _image(t, "b.qcow2", compat="0.10"),
     {"lazy_refcounts": "on"}, LAZY_MSG),
    ("downgrade-extl2", lambda t: _image(t, "c.qcow2", extended_l2="on"),
     {"compat": "0.10", "lazy_refcounts": "off"},
     "Cannot downgrade an image with incompatible features 0x10 set"),
    # refused by a later step before e40e1c5/e484e49, after earlier steps had written
    ("lazy+size-1000", lambda t: _image(t, "d.qcow2"),
     {"lazy_refcounts": "on", "size": "1000"}, "The new size must be a multiple of 512"),
    ("refcount8+size-1000", lambda t: _image(t, "e.qcow2"),
     {"refcount_bits": "8", "size": "1000"}, "The new size must be a multiple of 512"),
    ("v2-snapshots+size", _v2_with_snapshot,
     {"lazy_refcounts": "off", "size": str(8 * MiB)},
     "Can't resize a v2 image which has snapshots"),
    ("upgrade+refcount-too-narrow", _v2_with_snapshot,
     {"compat": "1.1", "refcount_bits": "1"},
     "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x50000 has a "
     "refcount of 2"),
]


@pytest.mark.parametrize("make,options,message", [c[1:] for c in E2E],
                         ids=[c[0] for c in E2E])
def test_refused_amend_changes_nothing(tmp_path: Path, make: Callable[[Path], Path],
                                       options: dict[str, str], message: str) -> None:
    p = make(tmp_path)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(DiskImgError) as exc:
        amend(p, options)
    assert str(exc.value) == message
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before
