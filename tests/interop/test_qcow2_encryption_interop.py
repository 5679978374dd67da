"""Encrypted qcow2 both ways: images qemu encrypted read back through diskimg; images
diskimg created and wrote read back in qemu, pass qemu-img check and show the same info."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]
SECRET = ["--object", "secret,id=s0,data=correct horse"]
SECRETS = {"s0": b"correct horse"}
OPEN = {"secrets": SECRETS, "options": {"encrypt.key-secret": "s0"}}

VARIANTS = {
    "luks": {"encrypt.format": "luks", "encrypt.iter-time": "50"},
    "luks-cbc-essiv": {"encrypt.format": "luks", "encrypt.iter-time": "50",
                       "encrypt.cipher-alg": "aes-128", "encrypt.cipher-mode": "cbc",
                       "encrypt.ivgen-alg": "essiv", "encrypt.ivgen-hash-alg": "sha256"},
    "aes": {"encrypt.format": "aes"},
}


def image_opts(path: Path) -> list[str]:
    return [*SECRET, "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qemu_encrypted_image_reads_through_diskimg(tmp_path: Path, variant: str) -> None:
    img = tmp_path / "q.qcow2"
    opts = ",".join(f"{k}={v}" for k, v in {**VARIANTS[variant],
                                             "encrypt.key-secret": "s0"}.items())
    # (tests/tools/qemu-img retries qemu's PBKDF2-benchmark flake at create)
    QEMU.img("create", "-q", "-f", "qcow2", *SECRET, "-o", opts, img, "2M")
    *io_opts, spec = image_opts(img)
    QEMU.io(spec, "write -P 0x5c 1000 100000", "write -z 1M 64k", fmt=None, extra=io_opts)
    with diskimg.open(img, **OPEN) as d:  # type: ignore[arg-type]
        assert d.read(0, d.size) == QEMU.raw_bytes(spec, None, *io_opts)
    with diskimg.open(img) as d:  # info works without the secret
        ours = d.info().to_json()
        with pytest.raises(diskimg.MissingSecretError, match="encrypt.key-secret"):
            d.read(0, 512)
    theirs = QEMU.info(img)
    assert ours["format-specific"] == theirs["format-specific"]
    assert ours["encrypted"] is True and theirs["encrypted"] is True


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diskimg_encrypted_image_verified_by_qemu(tmp_path: Path, variant: str) -> None:
    img = tmp_path / "d.qcow2"
    diskimg.create(img, "qcow2", 2 << 20, options={**VARIANTS[variant],
                                                   "encrypt.key-secret": "s0"},
                   secrets=SECRETS)
    model = bytearray(2 << 20)
    with diskimg.open(img, "r+", **OPEN) as d:  # type: ignore[arg-type]
        for off, n in ((0, 70000), (333, 3), (1 << 20, 200000)):
            data = os.urandom(n)
            d.write(off, data)
            model[off : off + n] = data
    ref = tmp_path / "model.raw"
    ref.write_bytes(model)
    cmp = QEMU.img("compare", *image_opts(img), f"driver=raw,file.filename={ref}", ok=None)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    chk = QEMU.img("check", *image_opts(img), ok=None)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    # the plaintext must not be on disk
    assert bytes(model[:4096]) not in img.read_bytes()


def test_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "w.qcow2"
    diskimg.create(img, "qcow2", 1 << 20, options={**VARIANTS["luks"],
                                                   "encrypt.key-secret": "s0"},
                   secrets=SECRETS)
    with pytest.raises(diskimg.InvalidPassphraseError):
        diskimg.open(img, secrets={"s0": b"wrong"}, options={"encrypt.key-secret": "s0"})


def test_legacy_aes_converts_to_luks(tmp_path: Path) -> None:
    old = tmp_path / "old.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", *SECRET, "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", old, "1M")
    QEMU.io(image_opts(old)[-1], "write -P 0x42 0 300k", fmt=None, extra=image_opts(old)[:-1])
    new = tmp_path / "new.qcow2"
    with diskimg.open(old, **OPEN) as src:  # type: ignore[arg-type]
        diskimg.convert(src, new, "qcow2", secrets=SECRETS, options={
            "encrypt.format": "luks", "encrypt.key-secret": "s0", "encrypt.iter-time": "50"},
            target_options={"encrypt.key-secret": "s0"})
    QEMU.io(image_opts(new)[-1], "read -P 0x42 0 300k", fmt=None, extra=image_opts(new)[:-1])
    info = QEMU.info(new)
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"


def test_cli_convert_plain_encrypted_and_rekey(tmp_path: Path) -> None:
    """diskimg convert: plain -> LUKS, LUKS -> LUKS with a new key, LUKS -> plain, with
    qemu-img's --object/--image-opts syntax; no plaintext reaches the encrypted files."""
    import sys

    plain = tmp_path / "plain.raw"
    pattern = b"PLAINTEXT-SENTINEL-" * 3000
    plain.write_bytes(pattern.ljust(1 << 20, b"\0"))

    def di(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr

    objs = ["--object", "secret,id=a,data=old", "--object", "secret,id=b,data=new"]
    di("convert", *objs, "-O", "qcow2", "-o",
       "encrypt.format=luks,encrypt.key-secret=a,encrypt.iter-time=50", "plain.raw", "a.qcow2")
    di("convert", *objs, "--image-opts", "driver=qcow2,file.filename=a.qcow2,"
       "encrypt.key-secret=a", "-O", "qcow2", "-o",
       "encrypt.format=luks,encrypt.key-secret=b,encrypt.iter-time=50", "b.qcow2")
    di("convert", *objs, "--image-opts", "driver=qcow2,file.filename=b.qcow2,"
       "encrypt.key-secret=b", "-O", "raw", "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == plain.read_bytes()
    for enc in ("a.qcow2", "b.qcow2"):
        assert b"PLAINTEXT-SENTINEL" not in (tmp_path / enc).read_bytes()
    cmp = QEMU.img("compare", "--object", "secret,id=b,data=new", "--image-opts",
                   "driver=qcow2,file.filename=b.qcow2,encrypt.key-secret=b",
                   "driver=raw,file.filename=plain.raw", ok=None, cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
