"""diskimg.pool.probe: what a directory entry is, learnt from its bytes, changing none."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from diskimg.pool.probe import Probed, probe_volume
from tests.conftest import RunFn


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.qemu
@pytest.mark.parametrize(("fmt", "options"), [
    ("raw", {}),
    ("qcow2", {"compat": "0.10", "cluster_size": "4096"}),
    ("qcow2", {"compat": "1.1", "lazy_refcounts": "on"}),
    ("vmdk", {}),
])
def test_probe_agrees_with_qemu_img_and_changes_nothing(
        make_image: Callable[..., Path], qemu_img: str, run: RunFn, fmt: str,
        options: dict[str, str]) -> None:
    img = make_image(f"v.{fmt}", fmt, "3M", options=options)
    before = digest(img)
    p = probe_volume(str(img))
    assert p is not None
    info = json.loads(run([qemu_img, "info", "--output=json", "-U", img]).stdout)
    st = os.stat(img)
    assert (p.type, p.format) == ("file", fmt)
    assert p.capacity == info["virtual-size"] == 3 << 20
    assert p.physical == st.st_size and p.allocation == st.st_blocks * 512
    if fmt == "qcow2":
        data = info["format-specific"]["data"]
        assert p.cluster_size == info["cluster-size"]
        assert p.compat == ("1.1" if data["compat"] == "1.1" else None)
        assert p.features == (["lazy_refcounts"] if data.get("lazy-refcounts") else
                              None if data["compat"] == "0.10" else [])
    assert digest(img) == before


@pytest.mark.qemu
def test_probe_resolves_the_backing_file(make_image: Callable[..., Path], qemu_img: str,
                                         run: RunFn, tmp_path: Path) -> None:
    make_image("base.raw", "raw", "1M")
    top = tmp_path / "top.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top],
        cwd=tmp_path)
    p = probe_volume(str(top))
    assert p is not None
    assert (p.backing, p.backing_format) == (str(tmp_path / "base.raw"), "raw")


def test_what_is_not_a_volume(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "d").mkdir()
    assert probe_volume(str(tmp_path / "fifo")) is None  # never opened: would block
    assert probe_volume(str(tmp_path / "dangling")) is None
    assert probe_volume(str(tmp_path / "missing")) is None
    assert probe_volume(str(tmp_path / "d")) == Probed("dir", "dir", 0, 0, None)


def test_raw_files_by_content_not_name(tmp_path: Path) -> None:
    iso = tmp_path / "disk.qcow2"  # the name lies; the bytes decide
    iso.write_bytes(bytes(0x8001) + b"CD001" + bytes(100))
    luks = tmp_path / "l.iso"
    luks.write_bytes(b"LUKS\xba\xbe" + bytes(4090))
    plain = tmp_path / "p.vmdk"
    plain.write_bytes(b"hello")
    assert probe_volume(str(iso)) == Probed("file", "iso", 0x8001 + 105,
                                            os.stat(iso).st_blocks * 512, 0x8001 + 105)
    pl = probe_volume(str(luks))
    assert pl is not None and (pl.format, pl.encryption) == ("raw", "luks")
    pp = probe_volume(str(plain))
    assert pp is not None and (pp.format, pp.capacity, pp.encryption) == ("raw", 5, None)


def test_a_vmdk_diskimg_cannot_open_still_gets_its_capacity(tmp_path: Path) -> None:
    """A descriptor whose extent is missing: the capacity comes from the extent lines."""
    desc = tmp_path / "d.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\n# Extent description\n'
                    'RW 2048 FLAT "missing-flat.vmdk" 0\nRW 6 FLAT "missing2.vmdk" 0\n')
    p = probe_volume(str(desc))
    assert p is not None
    assert (p.format, p.capacity) == ("vmdk", (2048 + 6) * 512)


def test_a_sparse_vmdk_diskimg_cannot_open_gets_its_header_capacity(tmp_path: Path) -> None:
    """A KDMV header whose grain size is 0 (the driver refuses it): capacity from the header,
    read by the vmdk codec."""
    from diskimg.vmdk.sparse import SparseHeader

    hdr = SparseHeader(version=1, flags=3, capacity=4096, grain_size=0, desc_offset=0,
                       desc_size=0, num_gtes_per_gt=512, rgd_offset=0, gd_offset=1,
                       overhead=1)
    f = tmp_path / "s.vmdk"
    f.write_bytes(hdr.pack())
    before = digest(f)
    p = probe_volume(str(f))
    assert p is not None
    assert (p.format, p.capacity, p.physical) == ("vmdk", 4096 * 512, 512)
    assert digest(f) == before


def test_a_malformed_descriptor_keeps_the_file_size(tmp_path: Path) -> None:
    """Extent lines the vmdk codec refuses give no capacity: the file's size stands."""
    desc = tmp_path / "d.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                    'RW 2048 BOGUS "x.vmdk" 0\n')
    p = probe_volume(str(desc))
    assert p is not None
    assert (p.format, p.capacity) == ("vmdk", desc.stat().st_size)
