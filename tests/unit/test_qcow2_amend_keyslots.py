"""qcow2.amend_keyslots: LUKS key slots of a qcow2 image added and erased in the LUKS area
the FDE extension points at; the data stays readable with the remaining keys, and
refusals (last slot, read-only image, no LUKS) change no byte.  PBKDF2 runs with
iter-time 0: QEMU's floor of 1000 iterations, no benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

import diskimg
from diskimg.crypto.luks import LuksHeader
from diskimg.errors import (
    InvalidPassphraseError,
    UnsupportedFeatureError,
    UsageError,
)
from diskimg.hostio import open_host_file
from diskimg.qcow2.amend import luks_add_key, luks_remove_keys, read_header
from diskimg.qcow2.amend_keyslots import amend_keyslots, luks_area
from diskimg.qcow2.amend_plan import check_encryption_amendable, keyslot_request
from diskimg.qcow2.create import plan_header
from diskimg.qcow2.layout import QCOW_CRYPT_AES
from tests.unit.qcow2_amend_testlib import assert_clean

MiB = 1 << 20
DATA = bytes(range(256)) * 256


@pytest.fixture(scope="module")
def luks_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("luks") / "k.qcow2"
    diskimg.create(p, "qcow2", MiB, options={"encrypt.format": "luks",
                                             "encrypt.key-secret": "k",
                                             "encrypt.iter-time": "0"},
                   secrets={"k": b"pw0"})
    with _open(p, b"pw0", "r+") as d:
        d.write(0, DATA)
    return p.read_bytes()


@pytest.fixture
def luks(tmp_path: Path, luks_bytes: bytes) -> Path:
    p = tmp_path / "k.qcow2"
    p.write_bytes(luks_bytes)
    return p


def _open(p: Path, pw: bytes, mode: str = "r") -> diskimg.BlockDevice:
    return diskimg.open(p, mode, "qcow2", secrets={"k": pw},
                        options={"encrypt.key-secret": "k"})


def _active(p: Path) -> list[bool]:
    """The slots' states, read through the LUKS header codec."""
    host = open_host_file(p, False)
    try:
        off, length = luks_area(read_header(host), host.size())
        hdr = LuksHeader.parse(host.pread(off, length), length)
    finally:
        host.close()
    return [s.active for s in hdr.slots]


def test_luks_area_is_inside_the_file(luks: Path) -> None:
    p = luks
    host = open_host_file(p, False)
    try:
        h = read_header(host)
        off, length = luks_area(h, host.size())
        assert off % h.cluster_size == 0 and off + length <= host.size()
        assert host.pread(off, 6) == b"LUKS\xba\xbe"
    finally:
        host.close()


def test_add_then_remove(luks: Path) -> None:
    p = luks
    assert luks_add_key(p, b"pw0", b"pw1", iter_time_ms=0) == 1
    assert _active(p)[:3] == [True, True, False]
    with _open(p, b"pw1") as d:
        assert d.read(0, len(DATA)) == DATA
    assert luks_remove_keys(p, b"pw1", keyslot=0) == [0]
    assert _active(p)[:2] == [False, True]
    with pytest.raises(InvalidPassphraseError):
        _open(p, b"pw0").close()
    with _open(p, b"pw1") as d:
        assert d.read(0, len(DATA)) == DATA
    assert_clean(p, secrets={"k": b"pw1"}, options={"encrypt.key-secret": "k"})


def test_refusals_change_nothing(luks: Path) -> None:
    p = luks
    raw = p.read_bytes()
    with pytest.raises(UsageError, match="only active keyslot 0"):
        luks_remove_keys(p, b"pw0", keyslot=0)
    assert p.read_bytes() == raw
    with _open(p, b"pw0") as d:  # read-only
        with pytest.raises(UsageError, match="opened read-only"):
            amend_keyslots(d, keyslot_request({"encrypt.state": "active",
                                               "encrypt.new-secret": "n"}), {"n": b"x"})
    assert p.read_bytes() == raw


def test_check_encryption_amendable() -> None:
    plain = plan_header(MiB, {})[0]
    with pytest.raises(UsageError) as exc:
        check_encryption_amendable(plain)
    assert str(exc.value) == "Can't amend encryption options - encryption not present"
    aes = plain.copy()
    aes.crypt_method = QCOW_CRYPT_AES
    with pytest.raises(UnsupportedFeatureError) as uexc:
        check_encryption_amendable(aes)
    assert str(uexc.value) == "Only LUKS encryption options can be amended"
