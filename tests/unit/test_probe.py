"""Format probing: qcow2/vmdk magics, raw last, foreign formats refused (never read as raw)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import DiskImgError, UnsupportedFeatureError, WrongFormatError
from diskimg.hostio import open_host_file
from diskimg.probe import check_format, probe, probe_bytes


def _qcow2_head(version: int) -> bytes:
    return b"QFI\xfb" + struct.pack(">I", version) + bytes(504)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (_qcow2_head(3), "qcow2"),
        (_qcow2_head(2), "qcow2"),
        (_qcow2_head(1), "qcow"),
        (_qcow2_head(4), "qcow2"),  # as qemu: version >= 2 probes qcow2, open then refuses it
        (_qcow2_head(0), "raw"),
        (b"QFI\xfb", "raw"),  # too short to hold a version
        (b"KDMV" + bytes(508), "vmdk"),
        (b"COWD" + bytes(508), "vmdk"),
        (b"# Disk DescriptorFile\nversion=1\n", "vmdk"),
        (b"version=1\ncreateType=\"monolithicFlat\"\n# Extent description\nRW 1 FLAT \"x\" 0\n",
         "vmdk"),
        (b"conectix" + bytes(504), "vpc"),
        (b"vhdxfile" + bytes(504), "vhdx"),
        (b"WithoutFreeSpace" + bytes(496), "parallels"),
        (b"WithouFreSpacExt" + bytes(496), "parallels"),
        (b"Bochs Virtual HD Image" + bytes(490), "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop",
         "cloop"),
        (bytes(0x40) + b"\x7f\x10\xda\xbe" + bytes(444), "vdi"),
        (b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa", "raw"),  # an MBR boot sector
        (bytes(512), "raw"),
        (b"", "raw"),
    ],
)
def test_probe_bytes(head: bytes, fmt: str) -> None:
    assert probe_bytes(head) == fmt


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("magic", "name"),
    [(b"conectix", "vpc"), (b"vhdxfile", "vhdx"), (b"WithoutFreeSpace", "parallels"),
     (b"Bochs Virtual HD Image", "bochs"), (_qcow2_head(1), "qcow")],
)
def test_foreign_formats_are_refused_naming_the_format(tmp_path: Path, magic: bytes,
                                                       name: str) -> None:
    p = _write(tmp_path, "foreign.img", magic.ljust(4096, b"\0"))
    with pytest.raises(UnsupportedFeatureError) as ei:
        diskimg.open(p)
    assert f"'{name}'" in str(ei.value)
    assert str(p) in str(ei.value)
    # naming the format explicitly is the user's decision: raw access is allowed
    with diskimg.open(p, format="raw") as img:
        assert img.format == "raw"
        assert img.read(0, len(magic)) == magic


def test_probe_raw_last(tmp_path: Path) -> None:
    p = _write(tmp_path, "plain.img", b"hello" + bytes(1019))
    with open_host_file(p, lock_mode=False) as hf:
        assert probe(hf) == "raw"
    with diskimg.open(p) as img:
        assert img.format == "raw"
        assert img.size == 1024


def test_check_format_rejects_a_mismatch(tmp_path: Path) -> None:
    raw = _write(tmp_path, "plain.img", bytes(1024))
    with open_host_file(raw, lock_mode=False) as hf:
        with pytest.raises(WrongFormatError):
            check_format(hf, "qcow2")
        with pytest.raises(WrongFormatError):
            check_format(hf, "vmdk")
        check_format(hf, "raw")  # anything can be read as raw
    with pytest.raises(WrongFormatError):
        diskimg.open(raw, format="qcow2")


def test_unknown_format_name_is_a_usage_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "x.img", bytes(512))
    with pytest.raises(diskimg.UsageError, match="Unknown file format 'vhd'"):
        diskimg.open(p, format="vhd")
    with pytest.raises(diskimg.UsageError):
        diskimg.open(p, mode="w")


def test_unknown_qcow2_version_is_a_format_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "v4.qcow2", _qcow2_head(4).ljust(65536, b"\0"))
    with pytest.raises(DiskImgError) as ei:
        diskimg.open(p)
    assert "Unsupported qcow2 version 4" in str(ei.value)  # qemu-img's wording


def test_a_vmdk_magic_is_never_read_as_raw(tmp_path: Path) -> None:
    # A KDMV header full of zeros is not a valid vmdk: today diskimg says vmdk is not
    # implemented, later the vmdk parser must refuse it; either way it is a DiskImgError.
    p = _write(tmp_path, "d.vmdk", b"KDMV" + bytes(1020))
    with pytest.raises(DiskImgError):
        diskimg.open(p)
