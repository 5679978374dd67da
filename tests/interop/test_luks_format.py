"""The standalone ``luks`` format (qemu's ``luks`` block driver) against qemu-img/qemu-io
7.2, both ways: images qemu made and wrote read by diskimg at every byte; images diskimg
made and wrote read by qemu; info, map, measure and check as qemu gives them; key-slot
amend verified by qemu opening with the new secret; refusals leave the file unchanged;
hostile headers end in a DiskImgError naming field and offset.

qemu-img's LUKS create runs a PBKDF2 benchmark of a few seconds whatever the iter-time,
so the qemu-made images are made once per module and copied by the tests that change
them."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg
from diskimg.crypto.luks.header import OFF_PAYLOAD_OFFSET, SLOT_KEY_OFFSET, slot_offset

pytestmark = pytest.mark.qemu

SECRET = ["--object", "secret,id=s0,data=correct horse",
          "--object", "secret,id=s1,data=battery staple"]
SECRETS = {"s0": b"correct horse", "s1": b"battery staple"}
OPEN: dict[str, Any] = {"secrets": SECRETS, "options": {"key-secret": "s0"}}
#: guest size not a multiple of 512 (qemu rounds the virtual size up to a sector)
SIZE = (1 << 20) + 1000
VARIANTS = {
    "xts": {},
    "cbc-essiv": {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
                  "ivgen-hash-alg": "sha256"},
}


def spec(path: Path, sid: str = "s0") -> str:
    return f"driver=luks,key-secret={sid},file.filename={path}"


def olist(d: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in d.items())


def qemu_bytes(path: Path, sid: str = "s0") -> bytes:
    return QEMU.raw_bytes(spec(path, sid), None, *SECRET, "--image-opts")


def qemu_io(path: Path, *cmds: str, sid: str = "s0", ok: Any = (0,)) -> Any:
    return QEMU.io(spec(path, sid), *cmds, image_opts=True,
                   objects=[a for a in SECRET if a != "--object"], ok=ok)


def cli(*args: Any, ok: int = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "diskimg", *map(str, args)],
                         capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == ok, (args, res.returncode, res.stdout, res.stderr)
    return res


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def qemu_made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per variant, a luks image qemu-img created (iter-time 10) and qemu-io wrote: the
    first bytes, an unaligned run in the middle and the last (partial) sector."""
    if QEMU.qemu_io is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    d = tmp_path_factory.mktemp("luksq")
    out = {name: d / f"{name}.luks" for name in VARIANTS}

    def make(name: str) -> None:  # the two creates' benchmarks run side by side
        QEMU.img("create", "-q", "-f", "luks", *SECRET, "-o",
                 olist({"key-secret": "s0", "iter-time": "10", **VARIANTS[name]}),
                 out[name], str(SIZE))
        qemu_io(out[name], "write -P 0x11 0 4096", "write -P 0x22 300000 70001",
                f"write -P 0x33 {SIZE - 1000} 1000")

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        list(pool.map(make, VARIANTS))
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per variant, a luks image diskimg created (iter-time 1) and wrote."""
    d = tmp_path_factory.mktemp("luksd")
    out = {}
    for name, opts in VARIANTS.items():
        p = d / f"{name}.luks"
        diskimg.create(p, "luks", SIZE, secrets=SECRETS,
                       options={"key-secret": "s0", "iter-time": "1", **opts})
        with diskimg.open(p, "r+", **OPEN) as dev:
            dev.write(0, b"\x44" * 5000)
            dev.write(123457, bytes(range(256)) * 300)
            dev.write(dev.size - 700, b"\x55" * 700)
        out[name] = p
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qemu_image_read_by_diskimg(qemu_made: dict[str, Path], variant: str) -> None:
    p = qemu_made[variant]
    theirs = qemu_bytes(p)
    assert len(theirs) == SIZE + 24  # qemu: file size - payload offset, up to a sector
    with diskimg.open(p, **OPEN) as d:
        assert d.format == "luks" and d.size == len(theirs)
        assert d.read(0, d.size) == theirs
        assert d.read(0, 4096) == b"\x11" * 4096
        assert d.read(SIZE - 1000, 1000) == b"\x33" * 1000
    # info needs no secret, probed as luks as qemu probes it; data needs it
    with diskimg.open(p) as d:
        ours = d.info().to_json()
        with pytest.raises(diskimg.MissingSecretError, match="key-secret"):
            d.read(0, 512)
    assert json.loads(cli("info", "--output=json", p).stdout) == QEMU.info(p) == ours


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diskimg_image_read_by_qemu(ours: dict[str, Path], qemu_made: dict[str, Path],
                                    variant: str) -> None:
    p = ours[variant]
    with diskimg.open(p, **OPEN) as d:
        mine = d.read(0, d.size)
    assert mine[:5000] == b"\x44" * 5000 and mine[-700:] == b"\x55" * 700
    assert mine[123457:123457 + 76800] == bytes(range(256)) * 300
    assert qemu_bytes(p) == mine
    qemu_io(p, "read -P 0x44 0 5000", f"read -P 0x55 {len(mine) - 700} 700")
    info = QEMU.info(p)
    assert info == json.loads(cli("info", "--output=json", p).stdout)
    assert info["format"] == "luks" and info["virtual-size"] == SIZE + 24
    # the same layout as qemu's for the same options: header, slots, payload offset
    q = QEMU.info(qemu_made[variant])["format-specific"]["data"]
    d = info["format-specific"]["data"]
    for k in ("cipher-alg", "cipher-mode", "ivgen-alg", "hash-alg", "payload-offset"):
        assert d[k] == q[k]
    assert [s["key-offset"] for s in d["slots"]] == [s["key-offset"] for s in q["slots"]]
    assert p.stat().st_size == qemu_made[variant].stat().st_size


def test_info_map_measure_check_as_qemu(qemu_made: dict[str, Path]) -> None:
    p = qemu_made["xts"]
    # human info, without the secret
    assert cli("info", p).stdout == QEMU.img("info", p).stdout
    # map: the whole disk data at no host offset (json); the human form refuses as qemu
    iopts = [*SECRET, "--image-opts", spec(p)]
    ours = json.loads(cli("map", "--output=json", *iopts).stdout)
    assert ours == QEMU.map(spec(p), None, *SECRET, "--image-opts")
    assert ours == [{"start": 0, "length": SIZE + 24, "depth": 0, "present": True,
                     "zero": False, "data": True}]
    q = QEMU.img("map", *iopts, ok=(1,))
    r = cli("map", *iopts, ok=1)
    assert r.stdout == q.stdout
    assert r.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]
    # check: qemu has none for luks (63); without the secret it does not open (1)
    assert "does not support checks" in cli("check", *iopts, ok=63).stderr
    QEMU.img("check", *iopts, ok=(63,))
    assert "Parameter 'key-secret' is required" in cli("check", p, ok=1).stderr
    # measure: qemu's header area (its payload offset) + size, not rounded, all of it
    # allocated; qemu-img measure -O luks runs a PBKDF2 benchmark of seconds each time,
    # so its numbers are taken from the image qemu made (checked by hand: equal)
    payload = QEMU.info(p)["format-specific"]["data"]["payload-offset"]
    for args, n in ((["--size", "1000"], 1000), (["--image-opts", spec(p)], SIZE + 24)):
        m = cli("measure", "--output=json", *SECRET, "-O", "luks", "-o", "key-secret=s0",
                *args)
        assert json.loads(m.stdout) == {"required": payload + n,
                                        "fully-allocated": payload + n}
    assert "Parameter 'key-secret' is required for cipher" in cli(
        "measure", "-O", "luks", "--size", "1M", ok=1).stderr


def test_two_writers(qemu_made: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "w.luks"
    shutil.copyfile(qemu_made["cbc-essiv"], p)
    model = bytearray(qemu_bytes(p))
    with diskimg.open(p, "r+", **OPEN) as d:
        d.write(299_990, b"\xaa" * 30)  # unaligned, over qemu's 0x22 run
        d.write_zeroes(4096, 8192)
        model[299_990:300_020] = b"\xaa" * 30
        model[4096:12288] = bytes(8192)
    qemu_io(p, "write -P 0xbb 12000 1000")
    model[12000:13000] = b"\xbb" * 1000
    with diskimg.open(p, **OPEN) as d:
        assert d.read(0, d.size) == bytes(model)
    assert qemu_bytes(p) == bytes(model)


def test_convert_both_ways(qemu_made: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = hashlib.shake_256(b"luks").digest(300_000) + bytes(200_000) + b"\x01" * 12_288
    src.write_bytes(data)
    dst = tmp_path / "d.luks"
    cli("convert", *SECRET, "-f", "raw", "-O", "luks", "-o",
        "key-secret=s0,iter-time=1,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        src, dst)
    assert qemu_bytes(dst) == data + bytes(-len(data) % 512)  # raw: sectors, as qemu
    assert QEMU.info(dst)["format-specific"]["data"]["ivgen-alg"] == "essiv"
    back = tmp_path / "back.raw"
    cli("convert", *SECRET, "-O", "raw", "--image-opts", spec(qemu_made["xts"]), back)
    assert back.read_bytes() == qemu_bytes(qemu_made["xts"])


def test_amend_key_slots_verified_by_qemu(ours: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "a.luks"
    shutil.copyfile(ours["xts"], p)
    data = qemu_bytes(p)
    qemu_io(p, "read 0 512", sid="s1", ok=(1,))  # s1 opens nothing yet
    cli("amend", *SECRET, "--image-opts", spec(p), "-o",
        "state=active,new-secret=s1,iter-time=1")
    assert qemu_bytes(p, "s1") == data
    slots = QEMU.info(p)["format-specific"]["data"]["slots"]
    assert [s["active"] for s in slots] == [True, True] + [False] * 6
    # erase slot 0 by its passphrase: s0 opens nothing any more, s1 still does
    cli("amend", *SECRET, "--image-opts", spec(p, "s1"), "-o", "state=inactive,old-secret=s0")
    qemu_io(p, "read 0 512", ok=(1,))
    assert qemu_bytes(p, "s1") == data
    assert json.loads(cli("info", "--output=json", p).stdout) == QEMU.info(p)
    # the last slot is kept, qcow2-style option names are refused: nothing changes
    before = sha(p)
    assert "only active keyslot" in cli("amend", *SECRET, "--image-opts", spec(p, "s1"),
                                        "-o", "state=inactive,keyslot=1", ok=1).stderr
    assert "Invalid parameter 'encrypt.state'" in cli(
        "amend", *SECRET, "--image-opts", spec(p, "s1"), "-o", "encrypt.state=inactive",
        ok=1).stderr
    assert sha(p) == before


def test_refusals_change_nothing(ours: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "r.luks"
    shutil.copyfile(ours["xts"], p)
    before = sha(p)
    with pytest.raises(diskimg.InvalidPassphraseError):
        diskimg.open(p, "r+", secrets={"s0": b"wrong"}, options={"key-secret": "s0"})
    err = cli("amend", "--object", "secret,id=s0,data=wrong", "--object",
              "secret,id=s1,data=x", "--image-opts", spec(p), "-o",
              "state=active,new-secret=s1", ok=1).stderr
    assert "Invalid password, cannot unlock any keyslot" in err
    cli("resize", "--object", "secret,id=s0,data=wrong", "--image-opts", spec(p), "2M", ok=1)
    cli("resize", p, "2M", ok=1)  # no secret
    # create refusals touch nothing: an unknown secret, a qcow2 option name
    for o in ("key-secret=nope", "key-secret=s0,encrypt.format=luks"):
        cli("create", *SECRET, "-f", "luks", "-o", o, p, "1M", ok=1)
    assert sha(p) == before
    # a resize with the secret keeps every byte and grows as qemu sees it
    with diskimg.open(p, **OPEN) as d:
        data = d.read(0, d.size)
    cli("resize", *SECRET, "--image-opts", spec(p), "3M")
    got = qemu_bytes(p)
    assert len(got) == 3 << 20 and got[:len(data) - 512] == data[:-512]


def test_probe_names_luks1_only() -> None:
    """qemu probes a LUKS1 header as luks; another version stays raw (qemu 7.2's luks
    driver reads LUKS1 only), and the pool still reports it as raw with encryption."""
    from diskimg.probe import probe_bytes

    head = b"LUKS\xba\xbe"
    assert probe_bytes(head + b"\0\x01" + bytes(600)) == "luks"
    assert probe_bytes(head + b"\0\x02" + bytes(600)) == "raw"


def test_key_option_is_the_formats_own(qemu_made: dict[str, Path]) -> None:
    """luks takes ``key-secret``, qcow2 ``encrypt.key-secret`` (qemu's names); the other
    one is refused by name, or leaves the key missing, as in qemu-img."""
    p = qemu_made["xts"]
    r = cli("info", *SECRET, "--image-opts",
            f"driver=luks,encrypt.key-secret=s0,file.filename={p}", ok=1)
    assert "does not support the option 'encrypt.key-secret'" in r.stderr
    r = cli("convert", *SECRET, "-O", "raw", "--image-opts",
            f"driver=qcow2,key-secret=s0,file.filename={p}", p.with_suffix(".x"), ok=1)
    assert "Image is not in qcow2 format" in r.stderr


def _hostile(tmp_path: Path, src: Path, name: str, patch: Any) -> Path:
    p = tmp_path / name
    b = bytearray(src.read_bytes())
    b = patch(b)
    p.write_bytes(b)
    return p


def test_hostile_headers(ours: dict[str, Path], tmp_path: Path) -> None:
    good = ours["xts"]
    payload = struct.unpack_from(">I", good.read_bytes(), OFF_PAYLOAD_OFFSET)[0]
    cases = {
        "truncated": (lambda b: b[:300], 0, "truncated"),
        "payload-past-eof": (lambda b: b[:payload * 512 - 4096], OFF_PAYLOAD_OFFSET,
                             "payload-offset"),
        "overlap": (lambda b: b[:slot_offset(1) + SLOT_KEY_OFFSET] + b[
            slot_offset(0) + SLOT_KEY_OFFSET:slot_offset(0) + SLOT_KEY_OFFSET + 4] + b[
            slot_offset(1) + SLOT_KEY_OFFSET + 4:], slot_offset(1) + SLOT_KEY_OFFSET,
            "key-slot[1].key-material-offset"),
    }
    for name, (patch, offset, field) in cases.items():
        p = _hostile(tmp_path, good, name + ".luks", patch)
        before = sha(p)
        for fmt in (None, "luks"):
            with pytest.raises(diskimg.DiskImgError) as ei:
                diskimg.open(p, "r", fmt, **OPEN)
            assert getattr(ei.value, "offset", None) == offset, (name, ei.value)
            assert field in str(ei.value), (name, str(ei.value))
        r = cli("info", p, ok=1)
        assert "Traceback" not in r.stderr and field in r.stderr
        assert sha(p) == before
