"""qcow2 amend both ways against qemu-img: LUKS key slots added/removed by one tool work (or
stop working) in the other, and compat / lazy_refcounts / refcount_bits / backing_file
amended by one tool leave an image the other finds clean and reads identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import InvalidPassphraseError
from diskimg.qcow2.amend import amend, luks_add_key, luks_remove_keys

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]
SECRETS = ["--object", "secret,id=s0,data=first", "--object", "secret,id=s1,data=second",
           "--object", "secret,id=s2,data=third"]
PW = {"s0": b"first", "s1": b"second", "s2": b"third"}


def iopts(img: Path, key: str) -> list[str]:
    return ["--image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret={key}"]


def qemu_plain(img: Path, key: str, out: Path) -> bytes | None:
    """The guest bytes via ``qemu-img convert -O raw`` with secret ``key``; None when qemu
    cannot open the image with it."""
    p = QEMU.img("convert", *SECRETS, *iopts(img, key), "-O", "raw", out, ok=None)
    if p.returncode:
        assert "Invalid password, cannot unlock any keyslot" in p.stderr, p.stderr
        return None
    return out.read_bytes()


def ours(img: Path, key: str) -> bytes | None:
    try:
        with diskimg.open(img, secrets=PW, options={"encrypt.key-secret": key}) as d:
            return d.read(0, d.size)
    except InvalidPassphraseError as e:
        assert "first" not in str(e) and "second" not in str(e) and "third" not in str(e)
        return None


@pytest.fixture(scope="module")
def qemu_luks(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A qemu-made LUKS qcow2 (key "first" in slot 0) with data written by qemu-io."""
    d = tmp_path_factory.mktemp("luks")
    img = d / "l.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", *SECRETS[:2], "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", img, "4M")
    QEMU.io(iopts(img, "s0")[1], "write -P 0x5a 0 100k", "write -P 0x33 3M 70k",
            image_opts=True, extra=SECRETS[:2])
    return img.read_bytes()


@pytest.fixture
def luks(tmp_path: Path, qemu_luks: bytes) -> Path:
    img = tmp_path / "l.qcow2"
    img.write_bytes(qemu_luks)
    return img


def test_key_added_by_diskimg_opens_in_qemu(luks: Path, tmp_path: Path) -> None:
    want = qemu_plain(luks, "s0", tmp_path / "ref.raw")
    assert want is not None and want[:100 << 10] == b"\x5a" * (100 << 10)
    assert qemu_plain(luks, "s1", tmp_path / "x.raw") is None
    slot = luks_add_key(luks, b"first", b"second", iter_time_ms=10)
    assert slot == 1
    slot = luks_add_key(luks, b"second", b"third", keyslot=6, iter_time_ms=0)
    assert slot == 6
    for key in ("s0", "s1", "s2"):
        assert qemu_plain(luks, key, tmp_path / f"{key}.raw") == want
        assert ours(luks, key) == want
    check = QEMU.img("check", *SECRETS, *iopts(luks, "s2"))
    assert "No errors were found on the image." in check.stdout
    info = json.loads(QEMU.img("info", "--output=json", luks).stdout)
    slots = info["format-specific"]["data"]["encrypt"]["slots"]
    assert [s["active"] for s in slots] == [True, True, False, False, False, False, True,
                                            False]
    assert slots[6]["iters"] == 1000  # iter-time 0: qemu's floor


def test_key_added_by_qemu_opens_in_diskimg(luks: Path, tmp_path: Path) -> None:
    want = ours(luks, "s0")
    QEMU.img("amend", *SECRETS, *iopts(luks, "s0"), "-o",
             "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=3,encrypt.iter-time=10")
    assert ours(luks, "s1") == want
    assert ours(luks, "s2") is None


def test_keys_removed_by_diskimg_stop_working_in_qemu(luks: Path, tmp_path: Path) -> None:
    want = ours(luks, "s0")
    luks_add_key(luks, b"first", b"second", iter_time_ms=0)
    luks_add_key(luks, b"first", b"second", iter_time_ms=0)
    assert luks_remove_keys(luks, b"first", old_secret=b"second") == [1, 2]
    assert qemu_plain(luks, "s1", tmp_path / "x.raw") is None
    assert ours(luks, "s1") is None
    assert qemu_plain(luks, "s0", tmp_path / "y.raw") == want
    # the erased slots' key material is overwritten, not just flagged inactive
    area_off = struct_fde(luks)
    raw = luks.read_bytes()
    for slot_off in (262144, 520192):
        assert raw[area_off + slot_off:area_off + slot_off + 256000] != bytes(256000)


def struct_fde(img: Path) -> int:
    from diskimg.hostio import open_host_file
    from diskimg.qcow2.amend import luks_area, read_header

    host = open_host_file(img, False, lock_mode=False)
    try:
        return luks_area(read_header(host), None)[0]
    finally:
        host.close()


def test_keys_removed_by_qemu_stop_working_in_diskimg(luks: Path, tmp_path: Path) -> None:
    want = ours(luks, "s0")
    luks_add_key(luks, b"first", b"second", keyslot=4, iter_time_ms=0)
    assert ours(luks, "s1") == want
    QEMU.img("amend", *SECRETS, *iopts(luks, "s1"), "-o",
             "encrypt.state=inactive,encrypt.keyslot=0")
    assert ours(luks, "s0") is None
    assert ours(luks, "s1") == want
    assert qemu_plain(luks, "s1", tmp_path / "z.raw") == want


# --- non-key amend options, both directions ---------------------------------------------

def build(img: Path, *opts: str) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", *opts, img, "8M")
    QEMU.io(img, "write -P 1 0 64k", "write -z 1M 128k", "write -P 2 3M 64k",
            "write -c -P 5 5M 64k", fmt=None)


AMENDS = [
    ([], {"compat": "0.10"}),
    (["-o", "compat=0.10"], {"compat": "1.1"}),
    ([], {"lazy_refcounts": "on"}),
    (["-o", "lazy_refcounts=on"], {"lazy_refcounts": "off"}),
    ([], {"refcount_bits": "1"}),
    ([], {"refcount_bits": "64"}),
    (["-o", "refcount_bits=8"], {"refcount_bits": "16"}),
    ([], {"compat": "0.10", "refcount_bits": "16"}),
]


def _olist(options: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("create_opts,options", AMENDS, ids=lambda x: _olist(x)
                         if isinstance(x, dict) else " ".join(x) or "default")
def test_amend_by_diskimg_checked_by_qemu(tmp_path: Path, create_opts: list[str],
                                          options: dict[str, str]) -> None:
    img, ref = tmp_path / "a.qcow2", tmp_path / "ref.qcow2"
    build(img, *create_opts)
    shutil.copy(img, ref)
    amend(img, options)
    assert QEMU.img("check", img).returncode == 0
    assert QEMU.img("compare", ref, img).stdout == "Images are identical.\n"
    info = json.loads(QEMU.img("info", "--output=json", img).stdout)["format-specific"]["data"]
    if "compat" in options:
        assert info["compat"] == options["compat"]
    if "refcount_bits" in options:
        assert info["refcount-bits"] == int(options["refcount_bits"])
    if "lazy_refcounts" in options:
        assert info["lazy-refcounts"] == (options["lazy_refcounts"] == "on")


@pytest.mark.parametrize("create_opts,options", AMENDS, ids=lambda x: _olist(x)
                         if isinstance(x, dict) else " ".join(x) or "default")
def test_amend_by_qemu_read_by_diskimg(tmp_path: Path, create_opts: list[str],
                                       options: dict[str, str]) -> None:
    img = tmp_path / "a.qcow2"
    build(img, *create_opts)
    with diskimg.open(img) as d:
        want = d.read(0, d.size)
    QEMU.img("amend", "-o", _olist(options), img)
    with diskimg.open(img, "r+") as d:
        assert d.read(0, d.size) == want
        res = d.check()  # type: ignore[attr-defined]
        assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0)


def test_backing_file_amend_both_ways(tmp_path: Path) -> None:
    base, ov = tmp_path / "base.qcow2", tmp_path / "ov.qcow2"
    build(base)
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov)
    QEMU.io(ov, "write -P 9 2M 64k", fmt=None)
    # restating the current backing file (with compat) is what amend allows
    amend(ov, {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "compat": "0.10"})
    assert QEMU.img("check", ov).returncode == 0
    info = json.loads(QEMU.img("info", "--output=json", ov).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.qcow2",
                                                                            "qcow2")
    QEMU.img("amend", "-o", "compat=1.1,backing_file=base.qcow2,backing_fmt=qcow2", ov)
    with diskimg.open(ov) as d:
        data = d.read(0, d.size)
    assert data[2 << 20:(2 << 20) + 65536] == b"\x09" * 65536
    assert data[:65536] == b"\x01" * 65536  # from the backing file
    with pytest.raises(diskimg.UsageError, match="Cannot amend the backing file"):
        amend(ov, {"backing_file": "other.qcow2", "backing_fmt": "qcow2"})
    cmp = QEMU.img("compare", ov, base, ok=None)  # still its own data over the base
    assert (cmp.returncode, cmp.stdout) == (1, "Content mismatch at offset 2097152!\n")
