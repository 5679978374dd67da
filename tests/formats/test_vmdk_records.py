"""vmdk records: descriptor, SparseExtentHeader, markers, qemu's creation layout; and
read/write/create through VmdkImage without qemu (the model of correctness is a bytearray).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from diskimg.errors import UsageError
from diskimg.hostio import open_host_file
from diskimg.vmdk import create_vmdk, open_vmdk, sparse_layout, write_stream_optimized
from diskimg.vmdk import markers as M
from diskimg.vmdk import sparse as S
from diskimg.vmdk.descriptor import Descriptor
from diskimg.vmdk.extent_line import ExtentLine
from diskimg.vmdk.lint import lint_stream

VMWARE_DESC = (
    b"# Disk DescriptorFile\nversion=1 \nCID=a454774a \nparentCID=ffffffff \n"
    b'createType="twoGbMaxExtentSparse" \n\n# Extent description\n'
    b'RW 4192256 SPARSE "a-s001.vmdk"\nRDONLY 100 FLAT "a-f.vmdk" 7\nRW 8 ZERO\n'
    b"\n# The Disk Data Base \n#DDB\n\n"
    b'ddb.adapterType = "lsilogic"\nddb.uuid = "60 00 C2 9a"\n'
    b'ddb.longContentID = "f56c691c480fc22c0f8b7effd5dbb1b1"\nddb.someVendorKey = "x"\n'
)


def test_descriptor_round_trip_and_fields() -> None:
    d = Descriptor.parse(VMWARE_DESC)
    assert d.pack() == VMWARE_DESC
    assert d.cid == 0xA454774A and d.parent_cid == 0xFFFFFFFF
    assert d.create_type == "twoGbMaxExtentSparse"
    assert [e.type for e in d.extents] == ["SPARSE", "FLAT", "ZERO"]
    assert d.extents[1] == ExtentLine("RDONLY", 100, "FLAT", "a-f.vmdk", 7)
    assert d.ddb()["ddb.someVendorKey"] == "x"
    for e in d.extents:
        assert ExtentLine.parse(e.pack()) == e
    d.set("CID", "1234")
    out = d.pack()
    assert b"CID=1234\n" in out and out.replace(b"CID=1234\n", b"CID=a454774a \n") == \
        VMWARE_DESC


def test_descriptor_crlf_and_no_trailing_newline() -> None:
    raw = b'# Disk DescriptorFile\r\nCID=5\r\ncreateType="monolithicFlat"\r\nRW 8 FLAT "f" 0'
    d = Descriptor.parse(raw)
    assert d.pack() == raw
    assert d.create_type == "monolithicFlat" and d.cid == 5 and len(d.extents) == 1


def test_header_parse_pack_round_trip(tmp_path: Path) -> None:
    h, _gt_count, _gt_size, _gd_sectors = sparse_layout(10485760)
    assert (h.rgd_offset, h.gd_offset, h.overhead) == (21, 663, 1408)  # qemu 7.2, 5 GiB
    raw = h.pack()
    assert len(raw) == 512 and S.SparseHeader.parse(raw) == h
    m = M.Marker(4, 0, M.MARKER_GT)
    assert M.Marker.parse(m.pack()) == m
    g = M.pack_grain(128, b"abc")
    assert len(g) == 512 and M.GRAIN_MARKER.unpack_from(g) == (128, 3)


def _roundtrip_image(path: Path, size: int, ops: list[tuple[str, int, bytes | int]]) -> bytes:
    model = bytearray(size)
    img = open_vmdk(open_host_file(path, True))
    for kind, off, arg in ops:
        if kind == "w":
            assert isinstance(arg, bytes)
            img.write(off, arg)
            model[off:off + len(arg)] = arg
        else:
            assert isinstance(arg, int)
            img.write_zeroes(off, arg)
            model[off:off + arg] = bytes(arg)
    img.close()
    img = open_vmdk(open_host_file(path))
    try:
        assert img.read(0, size) == bytes(model)
    finally:
        img.close()
    return bytes(model)


@pytest.mark.parametrize("sub", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                 "twoGbMaxExtentFlat"])
@pytest.mark.parametrize("zeroed", [False, True])
def test_write_read_back(tmp_path: Path, sub: str, zeroed: bool) -> None:
    if zeroed and "Flat" in sub:
        with pytest.raises(UsageError, match="zeroed grain"):
            create_vmdk(tmp_path / "d.vmdk", 1 << 20, options={"subformat": sub,
                                                                "zeroed_grain": True})
        return
    size = 3 << 20
    p = tmp_path / "d.vmdk"
    create_vmdk(p, size, options={"subformat": sub, "zeroed_grain": zeroed})
    rnd = os.urandom(300000)
    _roundtrip_image(p, size, [("w", 1000, rnd[:70000]), ("w", 65536, rnd[:65536]),
                               ("z", 0, 200000), ("w", size - 5, b"12345"),
                               ("w", 130000, rnd), ("z", 140000, 1)])


def test_cid_changes_on_first_write(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    create_vmdk(p, 1 << 20, options={"subformat": "twoGbMaxExtentSparse"})
    with open_vmdk(open_host_file(p)) as img:
        cid = img.cid
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(0, b"x")
    with open_vmdk(open_host_file(p)) as img:
        assert img.cid != cid or cid == 0
        assert img.read(0, 2) == b"x\0"
    assert re.search(rb"\nCID=[0-9a-f]+\n", p.read_bytes())


def test_stream_optimized_roundtrip(tmp_path: Path) -> None:
    size = (5 << 20) + 1536
    src = tmp_path / "s.vmdk"
    create_vmdk(src, size, options={"subformat": "monolithicSparse"})
    model = bytearray(size)
    with open_vmdk(open_host_file(src, True)) as img:
        for off, n in [(0, 70000), (1 << 20, 1), (4 << 20, 1 << 20), (size - 100, 100)]:
            d = os.urandom(n)
            img.write(off, d)
            model[off:off + n] = d
    dst = tmp_path / "o.vmdk"
    with open_vmdk(open_host_file(src)) as s:
        write_stream_optimized(s, dst)
    raw = dst.read_bytes()
    h = S.SparseHeader.parse(raw[:512])
    assert h.version == 3 and h.gd_offset == S.GD_AT_END and h.has_markers
    assert M.Marker.parse(raw[-512:]) == M.Marker(0, 0, M.MARKER_EOS)
    footer = M.parse_footer(raw[-1536:], len(raw) - 1536)
    assert M.Marker.parse(raw[footer.gd_offset * 512 - 512:]).type == M.MARKER_GD
    with open_vmdk(open_host_file(dst)) as img:
        assert img.read(0, size) == bytes(model)
        assert img.info().format_specific["data"]["create-type"] == "streamOptimized"


def test_stream_sequential_writes_and_refusals(tmp_path: Path) -> None:
    p = tmp_path / "o.vmdk"
    create_vmdk(p, 1 << 20, options={"subformat": "streamOptimized"})
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(70000, b"a" * 1000)
        img.write(71000, b"b")
        with pytest.raises(UsageError, match="front to back"):
            img.write(0, b"c")
        img.write(900000, b"z")
    with open_vmdk(open_host_file(p)) as img:
        got = img.read(0, 1 << 20)
    exp = bytearray(1 << 20)
    exp[70000:71001] = b"a" * 1000 + b"b"
    exp[900000] = ord("z")
    assert got == bytes(exp)
    from diskimg.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError):
        open_vmdk(open_host_file(p, True))


def test_create_option_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.vmdk"
    for opts, msg in [({"subformat": "foo"}, "invalid parameter value: foo"),
                      ({"adapter_type": "scsi"}, "invalid parameter value: scsi"),
                      ({"compat6": "on", "hwversion": "7"}, "compat6 cannot be enabled"),
                      ({"zeroed_grain": "maybe"}, "expects 'on' or 'off'"),
                      ({"foo": 1}, "Invalid parameter 'foo'")]:
        with pytest.raises(UsageError, match=re.escape(msg)):
            create_vmdk(p, 1 << 20, options=opts)


def test_embedded_descriptor_cid_rewrite_leaves_no_garbage(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import diskimg.vmdk.image_write as write_mod

    p = tmp_path / "d.vmdk"
    create_vmdk(p, 1 << 20, options={})
    before = p.read_bytes()[512:512 * 21].split(b"\0")[0]
    monkeypatch.setattr(write_mod, "new_cid", lambda previous=0: 5)
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(0, b"x")
    after = p.read_bytes()[512:512 * 21]
    text = after.split(b"\0")[0]
    assert after[len(text):] == bytes(len(after) - len(text))
    assert re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=5\n", before) == text


def test_stream_lint(tmp_path: Path) -> None:
    src = tmp_path / "s.vmdk"
    create_vmdk(src, 3 << 20, options={})
    with open_vmdk(open_host_file(src, True)) as img:
        img.write(1 << 20, os.urandom(200000))
    dst = tmp_path / "o.vmdk"
    with open_vmdk(open_host_file(src)) as s:
        write_stream_optimized(s, dst)
    with open_vmdk(open_host_file(dst)) as img:
        assert img.lint() == []
        assert img.check().findings == [] and img.check().exit_code == 0
    raw = bytearray(dst.read_bytes())
    raw[-512 - 1024 + 12] = 9                  # footer marker type
    dst.write_bytes(bytes(raw))
    fs = lint_stream(lambda o, n: bytes(raw[o:o + n]), len(raw), None)
    assert any("unknown marker type" in str(f["problem"]) for f in fs)
    raw = bytearray(dst.read_bytes())
    h = S.SparseHeader.parse(bytes(raw[:512]))
    g = h.overhead * 512
    raw[g:g + 8] = (999 * 128).to_bytes(8, "little")    # grain lba no longer matches its GT
    fs = lint_stream(lambda o, n: bytes(raw[o:o + n]), len(raw), None)
    assert any("does not point at the grain marker" in str(f["problem"]) for f in fs)


def test_redundant_gd_kept_in_sync_and_checked(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    create_vmdk(p, 4 << 20, options={"zeroed_grain": True})
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(100000, os.urandom(300000))
        img.write_zeroes(1 << 20, 1 << 20)
    with open_vmdk(open_host_file(p)) as img:
        assert img.check().findings == []
        h = img.extents[0].header
    raw = bytearray(p.read_bytes())
    rgt = int.from_bytes(raw[h.rgd_offset * 512:h.rgd_offset * 512 + 4], "little") * 512
    raw[rgt + 4:rgt + 8] = b"\0\0\0\0"        # entry of grain 1
    p.write_bytes(bytes(raw))
    with open_vmdk(open_host_file(p)) as img:
        res = img.check()
    assert res.exit_code == 0 and "redundant grain table 0" in res.findings[0]["problem"]


@pytest.mark.parametrize("sub", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                 "twoGbMaxExtentFlat", "streamOptimized"])
def test_create_size_zero(tmp_path: Path, sub: str) -> None:
    p = tmp_path / "x.vmdk"
    create_vmdk(p, 0, options={"subformat": sub})
    assert sorted(os.listdir(tmp_path)) == ["x.vmdk"]    # no extent files, as qemu-img
    if sub in ("monolithicSparse", "streamOptimized"):
        with open_vmdk(open_host_file(p)) as img:
            assert img.size == 0 and list(img.map()) == []
    else:
        from diskimg.errors import FormatError

        with open_host_file(p) as h, pytest.raises(FormatError, match="no extents"):
            open_vmdk(h)          # qemu-img 7.2 aborts on an assertion here


def test_stream_being_written_refuses_reads_instead_of_zeros(tmp_path: Path) -> None:
    """Data written to a new streamOptimized image in this session used to read back (and
    map) as zeros; now reads and map are refused until close, then read the data."""
    import diskimg

    p = tmp_path / "s.vmdk"
    diskimg.create(p, "vmdk", 300 * 1024, options={"subformat": "streamOptimized"})
    img = diskimg.open(p, "r+")
    img.write(0, b"a" * 70000)
    with pytest.raises(diskimg.UsageError, match="cannot be read before it is closed"):
        img.read(0, 1)
    with pytest.raises(diskimg.UsageError, match="cannot be read before it is closed"):
        list(img.map())
    img.close()
    with diskimg.open(p) as img:
        assert img.read(0, 300 * 1024) == b"a" * 70000 + bytes(300 * 1024 - 70000)
