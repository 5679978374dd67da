"""LUKS and legacy AES against qemu-img/qemu-io 7.2, on the crypto layer alone.

qemu makes encrypted qcow2 images and writes known patterns; we read the LUKS area through
the FDE header extension, unlock it, compare ``luks_info`` with ``qemu-img info``, and decrypt
the data clusters (found through L1/L2) with the **host** sector (LUKS) or the **guest**
sector (AES).  The other way round, a header and data we encrypted are put into a qemu-made
image and qemu-io must read the pattern back.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

from diskimg.crypto.luks import (
    LuksHeader,
    build_luks,
    luks_info,
    open_luks,
    parse_fde_extension,
)
from diskimg.crypto.qcow_aes import QcowAesCipher
from diskimg.errors import InvalidPassphraseError
from diskimg.qcow2.layout import QCOW2_EXT_MAGIC_CRYPTO_HEADER, Header

pytestmark = pytest.mark.qemu

PW = "s3cret-Pw"
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def _qemu_create(path: Path, fmt: str, opts: str = "") -> None:
    o = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "luks":
        o += ",encrypt.iter-time=10"
    if opts:
        o += "," + opts
    QEMU.img("create", "-q", "-f", "qcow2", "--object", f"secret,id=sec0,data={PW}", "-o", o,
             path, "1M")


def _qemu_io(path: Path, *cmds: str, pw: str = PW, ok: bool = True) -> str:
    """qemu-io on the encrypted qcow2 ``path`` opened with passphrase ``pw``; with ``ok``
    it must succeed without a pattern mismatch.  Returns stdout + stderr."""
    res = QEMU.io(f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0", *cmds,
                  image_opts=True, objects=[f"secret,id=sec0,data={pw}"],
                  ok=(0,) if ok else None, verify=ok)
    return res.stdout + res.stderr


def _qemu_encrypt_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = QEMU.json("info", path)["format-specific"]["data"]["encrypt"]
    return info


def _area(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    hdr = Header.parse(raw[:65536], len(raw))
    ext = hdr.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    off, length = parse_fde_extension(ext.data if ext else None, hdr.cluster_size, len(raw))
    return off, raw[off:off + length]


def _host_offset(path: Path, guest: int) -> int:
    raw = path.read_bytes()
    hdr = Header.parse(raw[:65536], len(raw))
    cs = hdr.cluster_size
    per_l2 = cs // 8
    l1e = struct.unpack_from(">Q", raw, hdr.l1_table_offset + 8 * (guest // cs // per_l2))[0]
    l2 = l1e & L2_OFFSET_MASK
    assert l2, "guest offset not allocated"
    l2e = struct.unpack_from(">Q", raw, l2 + 8 * ((guest // cs) % per_l2))[0]
    host = l2e & L2_OFFSET_MASK
    assert host, "guest offset not allocated"
    return host + guest % cs


LUKS_OPTIONS = [
    "",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts",
    "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
    "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,"
    "encrypt.hash-alg=sha512",
    "encrypt.cipher-mode=ctr",
    "encrypt.cipher-mode=ecb,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5",
]


@pytest.mark.parametrize("opts", LUKS_OPTIONS, ids=lambda o: o.replace("encrypt.", "") or
                         "default")
def test_qemu_luks_image(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "l.qcow2"
    _qemu_create(img, "luks", opts)
    _qemu_io(img, "write -P 0x5a 0 64k", "write -P 0x6b 132k 8k")
    off, area = _area(img)
    hdr = LuksHeader.parse(area, len(area))
    assert hdr.pack() == area[:592]
    assert luks_info(hdr) == _qemu_encrypt_info(img)
    assert len(area) == hdr.payload_offset * 512

    cipher, payload = open_luks(area, PW.encode())
    assert payload == len(area)
    with pytest.raises(InvalidPassphraseError):
        open_luks(area, b"wrong")

    raw = img.read_bytes()
    for guest, length, pat in ((0, 65536, 0x5A), (132 << 10, 8192, 0x6B)):
        host = _host_offset(img, guest)
        buf = bytearray(raw[host:host + length])
        assert bytes([pat]) * 16 not in buf  # no plaintext in the file
        cipher.decrypt(host // 512, buf)  # LUKS in qcow2: IV from the HOST sector
        assert buf == bytes([pat]) * length
        if host != guest and "ecb" not in opts:
            buf = bytearray(raw[host:host + 512])
            cipher.decrypt(guest // 512, buf)
            assert buf != bytes([pat]) * 512


def test_qemu_aes_image(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _qemu_create(img, "aes")
    assert _qemu_encrypt_info(img) == {"format": "aes"}
    _qemu_io(img, "write -P 0x42 0 64k", "write -P 0x43 192k 4k")
    raw = img.read_bytes()
    cipher = QcowAesCipher.from_passphrase(PW)
    for guest, length, pat in ((0, 65536, 0x42), (192 << 10, 4096, 0x43)):
        host = _host_offset(img, guest)
        assert host != guest
        buf = bytearray(raw[host:host + length])
        cipher.decrypt(guest // 512, buf)  # legacy AES: IV from the GUEST sector
        assert buf == bytes([pat]) * length
        buf = bytearray(raw[host:host + 512])
        cipher.decrypt(host // 512, buf)
        assert buf != bytes([pat]) * 512


def test_our_aes_data_read_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _qemu_create(img, "aes")
    _qemu_io(img, "write -P 0x11 64k 64k")
    host = _host_offset(img, 64 << 10)
    buf = bytearray(b"\x99" * 65536)
    QcowAesCipher.from_passphrase(PW).encrypt(128, buf)
    with img.open("r+b") as f:
        f.seek(host)
        f.write(buf)
    _qemu_io(img, "read -P 0x99 64k 64k")


@pytest.mark.parametrize("opts", [{}, {"cipher-alg": "aes-128", "cipher-mode": "cbc",
                                      "ivgen-alg": "essiv", "hash-alg": "sha1"}],
                         ids=["default", "aes128-cbc-essiv"])
def test_our_luks_header_and_data_read_by_qemu(tmp_path: Path, opts: dict[str, str]) -> None:
    """A qemu image with the LUKS area replaced by ours and a cluster encrypted by us."""
    img = tmp_path / "l.qcow2"
    qopts = ",".join(f"encrypt.{k}={v}" for k, v in opts.items())
    _qemu_create(img, "luks", qopts)
    _qemu_io(img, "write -P 0x11 0 64k")
    off, old_area = _area(img)
    area, cipher, hdr = build_luks("new-pass", opts, 10)
    assert len(area) == len(old_area)  # qemu's layout
    host = _host_offset(img, 0)
    data = bytearray(b"\x77" * 65536)
    cipher.encrypt(host // 512, data)
    with img.open("r+b") as f:
        f.seek(off)
        f.write(area)
        f.seek(host)
        f.write(data)
    assert _qemu_encrypt_info(img) == luks_info(hdr)
    _qemu_io(img, "read -P 0x77 0 64k", pw="new-pass")
    out = _qemu_io(img, "read 0 512", ok=False)  # the old passphrase no longer opens it
    assert "Invalid password" in out
