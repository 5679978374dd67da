"""Pool volumes with ``<encryption format='luks'>`` and format raw: created as libvirt has
qemu-img create them (``-f luks``), so qemu opens them with the secret; probed back as
libvirt reports them (format raw, encryption luks, capacity without the LUKS header)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import PoolError
from diskimg.pool import Pool, PoolRegistry

pytestmark = pytest.mark.qemu
UUID = "6c1ee3a6-3a6c-4b0e-8d7e-7b8b0cbb0a12"
PW = b"volume passphrase"
XML = ("<volume><name>{name}</name><capacity unit='KiB'>{kib}</capacity><target>"
       "<format type='raw'/><encryption format='luks'><secret type='passphrase' "
       f"uuid='{UUID}'/></encryption></target></volume>")


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pool:
    # libvirt leaves iter-time at qemu's default of 2 s; a test does not need the cost
    monkeypatch.setattr("diskimg.crypto.luks.create.DEFAULT_ITER_TIME_MS", 1)
    p = PoolRegistry(tmp_path / "cfg", tmp_path / "state").define("p1", tmp_path / "img")
    p.build()
    p.start()
    return p


def qemu_bytes(path: str) -> bytes:
    return QEMU.raw_bytes(f"driver=luks,key-secret=v0,file.filename={path}", None,
                          "--object", f"secret,id=v0,data={PW.decode()}", "--image-opts")


def test_encrypted_raw_volume_is_a_luks_image(pool: Pool, tmp_path: Path) -> None:
    xml = XML.format(name="enc.img", kib=1000)
    with pytest.raises(PoolError, match="Secret not found"):
        pool.create_volume_xml(xml)
    assert os.listdir(pool.path) == []
    v = pool.create_volume_xml(xml, secrets={UUID: PW})
    info = QEMU.info(v.path)
    assert info["format"] == "luks" and info["virtual-size"] == 1000 << 10
    with diskimg.open(v.path, secrets={"k": PW}, options={"key-secret": "k"}) as dev:
        assert qemu_bytes(v.path) == dev.read(0, dev.size)
    # as libvirt reports it: raw with LUKS encryption, capacity without the header
    d = v.definition()
    assert (d.format, d.capacity) == ("raw", 1000 << 10)
    assert d.encryption is not None and d.encryption.format == "luks"
    assert "<encryption format='luks'" in v.to_xml()
    # resizing it as raw bytes would cut the payload short: refused, file unchanged
    before = Path(v.path).read_bytes()
    with pytest.raises(PoolError, match="LUKS-encrypted raw volume"):
        v.resize(1 << 20)
    assert Path(v.path).read_bytes() == before

    # vol-create-from a raw volume: its guest bytes, encrypted, as qemu reads them
    src = pool.create_volume("src.raw", 600 << 10, "raw")
    data = bytes(range(256)) * 1200 + bytes(600 * 1024 - 307200)
    with open(src.path, "r+b") as f:
        f.write(data)
    c = pool.create_volume_from(XML.format(name="copy.img", kib=600), src,
                                secrets={UUID: PW})
    assert qemu_bytes(c.path) == data
    assert QEMU.info(c.path)["format"] == "luks"
