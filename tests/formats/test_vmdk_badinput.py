"""Hostile vmdk input (MALICIOUS-INPUTS.md section 3, classes V1-V12) and the corpus files.

Every case must end in a DiskImgError subclass quickly, never a traceback of another type,
a hang or a huge allocation.  Messages name the field (and offset where there is one).
"""

from __future__ import annotations

import bz2
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

from diskimg.errors import (
    BackingChainError,
    CorruptImageError,
    DiskImgError,
    FormatError,
    UnsupportedFeatureError,
)
from diskimg.hostio import open_host_file
from diskimg.vmdk import create_vmdk, open_vmdk
from diskimg.vmdk import sparse as S
from diskimg.vmdk.sesparse import (
    SESPARSE_CONST_MAGIC,
    SESPARSE_VERSION,
    SESPARSE_VOLATILE_MAGIC,
    SeSparseHeader,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.exists():
    CORPUS = Path("/work/shared/corpus")


def _open_read_all(path: Path) -> bytes:
    with open_vmdk(open_host_file(path)) as img:
        out = bytearray()
        for e in img.map():
            if e.data:
                out += img.read(e.start, min(e.length, 1 << 20))
        return bytes(out)


def _expect(path: Path, exc: type[Exception], match: str | None = None) -> None:
    t = time.monotonic()
    with pytest.raises(exc, match=match) as info:
        _open_read_all(path)
    assert time.monotonic() - t < 5
    assert isinstance(info.value, DiskImgError)


@pytest.fixture
def sparse_img(tmp_path: Path) -> Path:
    p = tmp_path / "s.vmdk"
    create_vmdk(p, 4 << 20, options={"subformat": "monolithicSparse"})
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(0, b"\xab" * 65536)
    return p


def _patch(p: Path, off: int, fmt: str, value: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


HEADER_CASES = [
    # (offset, struct format, value, error class, message fragment)   class
    (12, "<Q", 2**64 - 1, FormatError, "L1 size too big"),            # V1
    (12, "<Q", 2**55, FormatError, "L1 size too big"),                # V1
    (20, "<Q", 0, FormatError, "L1 entry size is invalid"),           # V2
    (20, "<Q", 2**40, FormatError, "Invalid granularity"),            # V2
    (44, "<I", 0, FormatError, "L1 entry size is invalid"),           # V3
    (44, "<I", 2**32 - 1, FormatError, "L2 table size too big"),      # V3
    (56, "<Q", 2**64 - 2, CorruptImageError, "gdOffset"),             # V4
    (56, "<Q", 0, CorruptImageError, "gdOffset"),                     # V4
    (56, "<Q", 10**6, CorruptImageError, "gdOffset"),                 # V4
    (28, "<Q", 10**9, FormatError, "descriptor"),                     # V6
    (4, "<I", 0, UnsupportedFeatureError, "version"),                 # V7
    (4, "<I", 4, UnsupportedFeatureError, "version"),                 # V7
    (4, "<I", 2**32 - 1, UnsupportedFeatureError, "version"),         # V7
    (77, "<H", 77, UnsupportedFeatureError, "compression"),           # V7
    (64, "<Q", 2**50, CorruptImageError, "overHead"),                 # V7
]


@pytest.mark.parametrize("off,fmt,value,exc,msg", HEADER_CASES)
def test_header_fields(sparse_img: Path, off: int, fmt: str, value: int,
                       exc: type[Exception], msg: str) -> None:
    _patch(sparse_img, off, fmt, value)
    _expect(sparse_img, exc, msg)


def test_v1_zero_capacity_and_v2_odd_grain(sparse_img: Path) -> None:
    _patch(sparse_img, 12, "<Q", 0)
    with open_vmdk(open_host_file(sparse_img)) as img:
        assert img.size == 0
    _patch(sparse_img, 12, "<Q", 8192)
    _patch(sparse_img, 20, "<Q", 3)          # legal for qemu; must not divide badly
    _open_read_all(sparse_img)


def test_v6_huge_descriptor_size_is_not_allocated(sparse_img: Path) -> None:
    _patch(sparse_img, 36, "<Q", 2**64 - 1)
    with open_vmdk(open_host_file(sparse_img)) as img:
        assert img.desc.create_type == "monolithicSparse"
    before = sparse_img.read_bytes()[512:21 * 512]
    with open_vmdk(open_host_file(sparse_img, True)) as img, \
            pytest.raises(CorruptImageError, match="overlaps"):
        img.write(70000, b"y")     # the claimed descriptor area covers the grain tables
    assert sparse_img.read_bytes()[512:21 * 512] == before


@pytest.mark.parametrize("cut", [4, 60, 512, 4096])
def test_v7_truncated(sparse_img: Path, cut: int) -> None:
    os.truncate(sparse_img, cut)
    _expect(sparse_img, FormatError)


def _gd_entry0(p: Path) -> int:
    h = S.SparseHeader.parse(p.read_bytes()[:512])
    return h.gd_offset * 512


def test_v4_gt_past_eof(sparse_img: Path) -> None:
    _patch(sparse_img, _gd_entry0(sparse_img), "<I", 0xFFFFFF00)
    _expect(sparse_img, CorruptImageError, "Grain table 0")


@pytest.mark.parametrize("value,exc", [(0xFFFFFFFF, CorruptImageError),
                                       (10**8, CorruptImageError)])
def test_v5_grain_past_eof(sparse_img: Path, value: int, exc: type[Exception]) -> None:
    gt = struct.unpack_from("<I", sparse_img.read_bytes(), _gd_entry0(sparse_img))[0] * 512
    _patch(sparse_img, gt, "<I", value)
    _expect(sparse_img, exc, "past the end")


def test_v5_grain_in_header_refuses_writes(sparse_img: Path) -> None:
    gt = struct.unpack_from("<I", sparse_img.read_bytes(), _gd_entry0(sparse_img))[0] * 512
    _patch(sparse_img, gt, "<I", 2)
    _open_read_all(sparse_img)               # reading the header bytes is harmless
    with open_vmdk(open_host_file(sparse_img, True)) as img, \
            pytest.raises(CorruptImageError, match="metadata"):
        img.write(0, b"x")


# --- streamOptimized (V8) ------------------------------------------------------------------
@pytest.fixture
def stream_img(tmp_path: Path) -> Path:
    p = tmp_path / "o.vmdk"
    create_vmdk(p, 2 << 20, options={"subformat": "streamOptimized"})
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(0, os.urandom(1000) + bytes(70000) + b"tail")
    return p


def _first_grain(p: Path) -> int:
    return S.SparseHeader.parse(p.read_bytes()[:512]).overhead * 512


@pytest.mark.parametrize("size", [0, 2**32 - 1, 1 << 20])
def test_v8_grain_marker_size(stream_img: Path, size: int) -> None:
    _patch(stream_img, _first_grain(stream_img) + 8, "<I", size)
    _expect(stream_img, CorruptImageError, "Grain marker")


def test_v8_not_zlib(stream_img: Path) -> None:
    _patch(stream_img, _first_grain(stream_img) + 12, "<Q", 0x1234567890ABCDEF)
    _expect(stream_img, CorruptImageError, "zlib")


@pytest.mark.parametrize("rel,fmt,value,exc,msg", [
    (-1024 + 56, "<Q", 10**9, CorruptImageError, "gdOffset"),
    (-1024 + 56, "<Q", 0, CorruptImageError, "gdOffset"),
    (-1024, "<I", 0, FormatError, "Invalid footer"),
    (-1024 + 12, "<Q", 2**60, FormatError, "L1 size too big"),
    (-1024 + 20, "<Q", 0, FormatError, "L1 entry size"),
    (-1536 + 12, "<I", 7, FormatError, "Invalid footer"),
])
def test_v8_footer(stream_img: Path, rel: int, fmt: str, value: int,
                   exc: type[Exception], msg: str) -> None:
    _patch(stream_img, stream_img.stat().st_size + rel, fmt, value)
    _expect(stream_img, exc, msg)


def test_v8_footer_missing(stream_img: Path) -> None:
    os.truncate(stream_img, stream_img.stat().st_size - 1536)
    _expect(stream_img, FormatError, "Invalid footer")


# --- descriptor files (V9-V12) ---------------------------------------------------------------
def _desc(tmp_path: Path, extents: str, ctype: str = "monolithicFlat",
          extra: str = "") -> Path:
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    (d / "data.bin").write_bytes(b"\x11" * 4096)
    p = d / "desc.vmdk"
    p.write_text(f'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                 f'createType="{ctype}"\n{extra}\n# Extent description\n{extents}\n',
                 encoding="latin-1")
    return p


def test_flat_descriptor_reads(tmp_path: Path) -> None:
    p = _desc(tmp_path, 'RW 8 FLAT "data.bin" 0\nRW 16 FLAT "data.bin" 4')
    with open_vmdk(open_host_file(p)) as img:
        assert img.size == 24 * 512
        assert img.read(0, 4096) == b"\x11" * 4096
        assert img.read(4096, 2048) == b"\x11" * 2048 and img.read(6144, 6144) == bytes(6144)


@pytest.mark.parametrize("name", ["../canary", "../../../../etc/passwd", "/etc/passwd",
                                  "nbd:localhost:10809", "json:{}"])
def test_v9_extent_escape(tmp_path: Path, name: str) -> None:
    (tmp_path / "canary").write_bytes(b"secret" * 100)
    p = _desc(tmp_path, f'RW 1 FLAT "{name}" 0')
    _expect(p, BackingChainError)


def test_v9_absolute_extent_inside_embedded_descriptor_is_ignored(sparse_img: Path) -> None:
    raw = bytearray(sparse_img.read_bytes())
    i = raw.index(b'RW 8192 SPARSE "s.vmdk"')
    raw[i:i + 23] = b'RW 8 FLAT "/etc/passwd"'
    sparse_img.write_bytes(bytes(raw))
    assert _open_read_all(sparse_img) == b"\xab" * 65536


@pytest.mark.parametrize("line,exc", [
    ('RW 9223372036854775808 FLAT "data.bin" 0', FormatError),
    ('RW 9223372036854775807 FLAT "data.bin" 0', FormatError),
    ('RW -1 FLAT "data.bin" 0', FormatError),
    ('RW 0 FLAT "data.bin" 0', FormatError),
    ('RW 8 FLAT "data.bin" 18446744073709551615', FormatError),
    ('RW 8 FLAT "data.bin" -5', FormatError),
    ('RW 8 FLAT "data.bin"', FormatError),
])
def test_v10_extent_sizes(tmp_path: Path, line: str, exc: type[Exception]) -> None:
    _expect(_desc(tmp_path, line), exc)


def test_v10_total_too_large(tmp_path: Path) -> None:
    line = 'RW 18014398509481983 FLAT "data.bin" 0\n' * 3
    _expect(_desc(tmp_path, line), FormatError, "too large")


def test_v10_extent_longer_than_file_reads_zeros(tmp_path: Path) -> None:
    p = _desc(tmp_path, 'RW 2048 FLAT "data.bin" 0')
    with open_vmdk(open_host_file(p)) as img:
        assert img.read((1 << 20) - 4096, 4096) == bytes(4096)


@pytest.mark.parametrize("typ", ["FLAT", "SPARSE"])
def test_v11_extent_is_the_descriptor(tmp_path: Path, typ: str) -> None:
    off = " 0" if typ == "FLAT" else ""
    _expect(_desc(tmp_path, f'RW 8 {typ} "desc.vmdk"{off}'), FormatError)


def test_v11_many_extents(tmp_path: Path) -> None:
    _expect(_desc(tmp_path, 'RW 1 FLAT "data.bin" 0\n' * 5000), FormatError, "extents")


def test_v11_sparse_extent_is_text(tmp_path: Path) -> None:
    p = _desc(tmp_path, 'RW 8 SPARSE "other.vmdk"', "twoGbMaxExtentSparse")
    (p.parent / "other.vmdk").write_text("# Disk DescriptorFile\n")
    _expect(p, FormatError, "not a VMDK")


@pytest.mark.parametrize("body,ctype,exc", [
    ('RW 8 FOO "data.bin" 0', "monolithicFlat", FormatError),
    ('RW 8 SESPARSE "data.bin"', "seSparse", FormatError),
    ('RW 8 VMFSSPARSE "data.bin"', "vmfsSparse", FormatError),
    ('RW 8 FLAT "data.bin 0', "monolithicFlat", FormatError),
    ('RW 8 FLAT "" 0', "monolithicFlat", FormatError),
    ('RW 8 FLAT "." 0', "monolithicFlat", DiskImgError),
    ('RW 8 FLAT "data.bin" 0', "weird\x01\x02type", UnsupportedFeatureError),
    ("", "monolithicFlat", FormatError),
    ('RW 8 FLAT "' + "a" * (1 << 20) + '" 0', "monolithicFlat", FormatError),
    ('RW 8 FLAT "data\0.bin" 0', "monolithicFlat", FormatError),
    ('RW 8 FLAT "data.bin/x" 0', "monolithicFlat", BackingChainError),
], ids=["unknown-type", "sesparse", "vmfssparse", "unterminated-quote", "empty-name",
        "directory", "ctype-control-chars", "no-extents", "1MiB-line", "nul-in-name",
        "file-as-directory"])
def test_v12_syntax(tmp_path: Path, body: str, ctype: str, exc: type[Exception]) -> None:
    _expect(_desc(tmp_path, body, ctype), exc)


def test_v12_garbage_and_header_only(tmp_path: Path) -> None:
    p = tmp_path / "g.vmdk"
    p.write_bytes(b"# Disk DescriptorFile\n" + os.urandom(3000).replace(b"createType", b""))
    _expect(p, FormatError)
    p.write_bytes(b"# Disk DescriptorFile\n")
    _expect(p, FormatError, "invalid VMDK image descriptor")


def test_huge_descriptor_file(tmp_path: Path) -> None:
    p = tmp_path / "big.vmdk"
    with open(p, "wb") as f:
        f.write(b"# Disk DescriptorFile\n")
        f.truncate(1 << 30)
    _expect(p, FormatError, "limit")


# --- corpus -------------------------------------------------------------------------------
def _corpus(rel: str, tmp_path: Path) -> Path:
    src = CORPUS / rel
    if not src.exists():
        pytest.skip(f"corpus file {rel} not available")
    if rel.endswith(".bz2"):
        dst = tmp_path / Path(rel).name[:-4]
        dst.write_bytes(bz2.decompress(src.read_bytes()))
        return dst
    return src


def test_corpus_afl9(tmp_path: Path) -> None:
    _expect(_corpus("qemu-iotests/afl9.vmdk.bz2", tmp_path), FormatError, "L1 size too big")


def test_corpus_descriptor_file_1(tmp_path: Path) -> None:
    _expect(_corpus("libvmdk/descriptor_file.1", tmp_path), UnsupportedFeatureError,
            "Unsupported image type 'monolithicSparse'")


def test_corpus_ext2(tmp_path: Path) -> None:
    p = _corpus("dfvfs/ext2.vmdk", tmp_path)
    with open_vmdk(open_host_file(p)) as img:
        assert img.size == 4194304
        assert img.info().format_specific["data"]["create-type"] == "monolithicSparse"
        data = img.read(0, img.size)
    assert data[1024 + 56:1024 + 58] == b"\x53\xef"     # ext2 superblock magic


def test_corpus_version3(tmp_path: Path) -> None:
    p = _corpus("qemu-iotests/iotest-version3.vmdk.bz2", tmp_path)
    with open_vmdk(open_host_file(p)) as img:
        assert img.size == 17179869184
        runs = [e for e in img.map() if e.data]
        assert runs and all(e.length == 65536 for e in runs)
        assert any(img.read(runs[0].start, 65536))
    with pytest.raises(UnsupportedFeatureError):     # qemu: compressed v3 is not writable
        open_vmdk(open_host_file(p, True))


def test_access_modes_and_zero_extents(tmp_path: Path) -> None:
    p = _desc(tmp_path, 'RDONLY 8 FLAT "data.bin" 0\nRW 8 ZERO\nNOACCESS 8 FLAT "data.bin" 0')
    with open_vmdk(open_host_file(p, True)) as img:
        assert img.size == 24 * 512
        assert img.read(0, 8192) == b"\x11" * 4096 + bytes(4096)
        with pytest.raises(UnsupportedFeatureError, match="NOACCESS"):
            img.read(8192, 512)
        with pytest.raises(DiskImgError, match="read-only"):
            img.write(0, b"x")


def test_a_noaccess_extent_is_named_by_its_bytes(tmp_path: Path) -> None:
    """The refusal names the file the descriptor names (UTF-8 bytes: café), not the
    latin-1 reading of its bytes (cafÃ©)."""
    name = "café.bin".encode().decode("latin-1")  # _desc writes text as latin-1
    p = _desc(tmp_path, f'RW 8 ZERO\nNOACCESS 8 FLAT "{name}" 0')
    with open_vmdk(open_host_file(p, True)) as img, \
            pytest.raises(UnsupportedFeatureError, match="Cannot read extent 'café.bin'"):
        img.read(4096, 512)


def test_mutation_smoke(tmp_path: Path) -> None:
    """Random corruptions of a sparse and a stream image: DiskImgError or success only."""
    import random

    from diskimg.vmdk import write_stream_optimized

    a, b = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    create_vmdk(a, 3 << 20, options={"zeroed_grain": True})
    with open_vmdk(open_host_file(a, True)) as img:
        img.write(0, os.urandom(100000))
        img.write_zeroes(1 << 20, 1 << 20)
        img.write(2 << 20, b"q" * 70000)
    with open_vmdk(open_host_file(a)) as s:
        write_stream_optimized(s, b, threads=1)
    seeds = [a.read_bytes(), b.read_bytes()]
    rnd = random.Random(1234)
    m = tmp_path / "m.vmdk"
    for _ in range(150):
        d = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randrange(1, 5)):
            pos = rnd.choice([rnd.randrange(0, 600), rnd.randrange(0, len(d)),
                              max(0, len(d) - rnd.randrange(1, 1600))])
            width = rnd.choice([1, 4, 8])
            d[pos:pos + width] = rnd.getrandbits(8 * width).to_bytes(width, "little")
        m.write_bytes(bytes(d))
        writable = rnd.random() < 0.3
        try:
            with open_host_file(m, writable) as h, open_vmdk(h) as img:
                for _e in img.map():
                    pass
                img.read(0, min(img.size, 3 << 20))
                if writable:
                    img.write(5000, b"zz")
                img.check()
        except DiskImgError:
            pass


def make_cowd(d: Path, l1_size: int = 1, gran: int = 16) -> Path:
    """A 4 MiB vmfsSparse (COWD) extent + descriptor, grains 0, 3, 100, 511 allocated."""
    import struct

    from diskimg.vmdk.cowd import CowdHeader

    gtes, l2_off = 4096, 2
    f = bytearray(CowdHeader(1, 3, 8192, gran, 1, l1_size).pack())
    f += struct.pack("<I", l2_off).ljust(512, b"\0")
    l2 = [0] * gtes
    data = b""
    sec = l2_off + 32
    for g in (0, 3, 100, 511):
        l2[g] = sec
        data += bytes([g % 251 + 1]) * (gran * 512)
        sec += gran
    f += struct.pack(f"<{gtes}I", *l2) + data
    (d / "c.vmdk").write_bytes(bytes(f))
    p = d / "desc.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=ffffffff\n'
                 'createType="vmfsSparse"\n\n# Extent description\n'
                 'RW 8192 VMFSSPARSE "c.vmdk"\n')
    return p


def test_cowd_hostile(tmp_path: Path) -> None:
    p = make_cowd(tmp_path)
    with open_vmdk(open_host_file(p)) as img:
        assert img.read(0, 8192) == b"\1" * 8192
        assert img.extents[0].read_only
    _expect(make_cowd(tmp_path, l1_size=0), FormatError, "l1dir_size")
    _expect(make_cowd(tmp_path, gran=0), FormatError, "L1 entry size")
    make_cowd(tmp_path)
    _patch(tmp_path / "c.vmdk", 16, "<I", 2**31)          # granularity
    _expect(p, FormatError, "granularity")
    _expect(tmp_path / "c.vmdk", UnsupportedFeatureError, "COWD")


def make_sesparse(d: Path, replay: int = 0, bad_gd: bool = False) -> Path:
    """An 8 MiB seSparse extent + descriptor: 4 KiB grains, one 4096-entry table.  Table
    entries 0, 5, 100 hold grains 1, 0, 2 ('B', 'A', 'C'); 7 is a zero grain, 8 unmapped;
    200 holds grain 4097 ('Z', exercising the split grain-number encoding)."""
    import struct

    cap, vol_off, gd_off, gt_off, grains_off = 16384, 1, 2, 4, 4 + 64
    vals = dict(magic=SESPARSE_CONST_MAGIC, version=SESPARSE_VERSION, capacity=cap,
                grain_size=8, grain_table_size=64, volatile_header_offset=vol_off,
                volatile_header_size=1, grain_dir_offset=gd_off, grain_dir_size=1,
                grain_tables_offset=gt_off, grain_tables_size=64, grains_offset=grains_off,
                grains_size=64)
    fields = tuple(vals.get(n, 0) for n in SeSparseHeader.NAMES)
    img = bytearray(SeSparseHeader(fields).pack())
    img += struct.pack("<4Q", SESPARSE_VOLATILE_MAGIC, 0, 0, replay).ljust(512, b"\0")
    gd = [0] * 64
    gd[0] = 0x2000000000000005 if bad_gd else 0x1000000000000000
    img += struct.pack("<64Q", *gd) + bytes(512)
    gt = [0] * 4096
    for i, g in ((0, 1), (5, 0), (100, 2), (200, 4097)):
        gt[i] = (3 << 60) | ((g & 0xFFF) << 48) | (g >> 12)
    gt[7], gt[8] = 2 << 60, 1 << 60
    img += struct.pack("<4096Q", *gt)
    img += b"A" * 4096 + b"B" * 4096 + b"C" * 4096 + bytes(4094 * 4096) + b"Z" * 4096
    (d / "s-sesparse.vmdk").write_bytes(bytes(img))
    p = d / "s.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=ffffffff\n'
                 'createType="seSparse"\n\n# Extent description\n'
                 f'RW {cap} SESPARSE "s-sesparse.vmdk"\n')
    return p


def test_sesparse_hostile(tmp_path: Path) -> None:
    p = make_sesparse(tmp_path)
    with open_vmdk(open_host_file(p)) as img:
        assert img.read(5 * 4096, 4) == b"AAAA"
    with open_host_file(p, True) as h, pytest.raises(UnsupportedFeatureError, match="write"):
        open_vmdk(h)
    _expect(make_sesparse(tmp_path, replay=1), UnsupportedFeatureError, "journal")
    _expect(make_sesparse(tmp_path, bad_gd=True), CorruptImageError, "grain directory entry")
    ext = tmp_path / "s-sesparse.vmdk"
    for field, value, msg in [("version", 7, "version"), ("grain_size", 0, "grain size"),
                              ("flags", 1, "flags"), ("grain_dir_size", 0, "directory size"),
                              ("capacity", 2**62, "capacity")]:
        make_sesparse(tmp_path)
        _patch(ext, 8 * SeSparseHeader.NAMES.index(field), "<Q", value)
        _expect(p, DiskImgError, msg)


# --- streamOptimized opened for writing (B5) ------------------------------------------------
def _qemu_layout_stream(p: Path, size: int) -> S.SparseHeader:
    """An empty streamOptimized extent in qemu 7.2's layout (GD/RGD and tables before
    overHead, no footer), as `qemu-img create -o subformat=streamOptimized` writes it."""
    from diskimg.vmdk import sparse_layout

    h = sparse_layout(size // 512, compress=True)[0]
    with open(p, "wb") as f:
        f.write(h.pack())
        f.truncate(h.overhead * 512)
    return h


@pytest.mark.parametrize("field,value,where", [
    ("overhead", 1 << 40, "overHead"),          # past the end: must not grow the file
    ("overhead", 5, "overHead"),                # inside the descriptor
    ("overhead", "gd+1", "gdOffset"),           # the grain directory straddles it
    ("overhead", "rgd+1", "rgdOffset"),
])
def test_stream_rw_open_validates_overhead(tmp_path: Path, field: str, value: int | str,
                                           where: str) -> None:
    p = tmp_path / "s.vmdk"
    h = _qemu_layout_stream(p, 64 << 30)        # GD of 2048 entries: 16 sectors
    v = h.gd_offset + 1 if value == "gd+1" else h.rgd_offset + 1 if value == "rgd+1" else value
    assert isinstance(v, int)
    _patch(p, 64, "<Q", v)
    before = p.read_bytes()
    with open_host_file(p, True) as h, pytest.raises(CorruptImageError, match=where) as info:
        open_vmdk(h).close()
    assert info.value.offset in (48, 56, 64)
    assert p.read_bytes() == before              # opening never changed the file
    with open_vmdk(open_host_file(p)) as img:    # read-only opens still work
        assert img.read(0, 4096) == bytes(4096)


def test_stream_rw_open_without_writes_leaves_the_file_alone(tmp_path: Path) -> None:
    p = tmp_path / "s.vmdk"
    create_vmdk(p, 2 << 20, options={"subformat": "streamOptimized"})
    before = p.read_bytes()
    with open_vmdk(open_host_file(p, True)) as img:
        assert img.read(0, 512) == bytes(512)
    assert p.read_bytes() == before


# --- marker sizes that lie (V8), seen by the VMware-acceptance lint of `check` -------------
def _markers(p: Path) -> dict[int, int]:
    """Sector offsets of the GT (1) / GD (2) markers of a VMware-layout stream."""
    data = p.read_bytes()
    pos = S.SparseHeader.parse(data[:512]).overhead * 512
    out: dict[int, int] = {}
    while pos + 16 <= len(data):
        val, size, typ = struct.unpack_from("<QII", data, pos)
        if size:
            pos += -(-(12 + size) // 512) * 512
            continue
        if typ in (1, 2):
            out.setdefault(typ, pos)
            pos += 512 + val * 512
            continue
        pos += 512
    return out


@pytest.mark.parametrize("typ", [1, 2], ids=["GT", "GD"])
@pytest.mark.parametrize("value", [2**63, 2**40, 5, 2])
def test_v8_table_marker_sizes_that_lie(stream_img: Path, typ: int, value: int) -> None:
    at = _markers(stream_img)[typ]
    _patch(stream_img, at, "<Q", value)
    t = time.monotonic()
    with open_vmdk(open_host_file(stream_img)) as img:
        res = img.check()
    assert time.monotonic() - t < 5
    problems = " | ".join(str(f["problem"]) for f in res.findings)
    assert "marker" in problems, problems


# --- parentFileNameHint loops (V11) ---------------------------------------------------------
@pytest.mark.parametrize("chain", [["a"], ["a", "b"], ["a", "b", "c"]],
                         ids=["self", "a-b-a", "a-b-c-a"])
def test_v11_parent_hint_loop(tmp_path: Path, chain: list[str]) -> None:
    import diskimg

    (tmp_path / "data.bin").write_bytes(bytes(4096))
    for i, name in enumerate(chain):
        parent = chain[(i + 1) % len(chain)]
        (tmp_path / f"{name}.vmdk").write_text(
            '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=1\n'
            f'createType="monolithicFlat"\nparentFileNameHint="{parent}.vmdk"\n'
            '# Extent description\nRW 8 FLAT "data.bin" 0\n')
    t = time.monotonic()
    with pytest.raises(BackingChainError, match=r"(?i)loop"):
        diskimg.open(tmp_path / "a.vmdk").close()
    assert time.monotonic() - t < 5


# --- the issue's bad-input list, in one process under a memory limit -----------------------
BOUNDED = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (384 << 20, 384 << 20))
import diskimg
out = {}
for name in sys.argv[1:]:
    try:
        with diskimg.open(name) as d:
            for e in d.map():
                if e.data:
                    d.read(e.start, min(e.length, 1 << 20))
        out[name] = "ok"
    except diskimg.DiskImgError as e:
        out[name] = type(e).__name__ + ": " + str(e)
    except MemoryError:
        out[name] = "MemoryError"
print(json.dumps(out))
"""


def test_issue_bad_input_list_bounded_memory(tmp_path: Path, sparse_img: Path) -> None:
    """Issue 5's list: a 1 GB descriptor, 5000 extents, zero and negative extents, escaping
    extent names, grain sizes 0 and 2^40, grain tables past the end of the file: each is a
    clean DiskImgError under a 384 MiB address-space limit, all of them in seconds."""
    import subprocess
    import sys

    cases: dict[str, str] = {}

    def desc(name: str, extents: str, expect: str) -> None:
        _desc(tmp_path, extents).rename(tmp_path / "d" / name)
        cases[str(tmp_path / "d" / name)] = expect

    def header(name: str, off: int, fmt: str, value: int, expect: str) -> None:
        p = tmp_path / name
        p.write_bytes(sparse_img.read_bytes())
        _patch(p, off, fmt, value)
        cases[str(p)] = expect

    big = tmp_path / "big.vmdk"
    with open(big, "wb") as f:
        f.write(b"# Disk DescriptorFile\n")
        f.truncate(1 << 30)
    cases[str(big)] = "FormatError: .*limit"
    desc("many.vmdk", 'RW 1 FLAT "data.bin" 0\n' * 5000, "FormatError: .*extents")
    desc("zero.vmdk", 'RW 0 FLAT "data.bin" 0', "FormatError: Invalid extent size")
    desc("neg.vmdk", 'RW -8 FLAT "data.bin" 0', "FormatError: Invalid extent size")
    desc("none.vmdk", "", "FormatError: .*no extents")
    up = "../" * len(tmp_path.parts)                 # ../../etc/passwd from any depth
    desc("passwd.vmdk", f'RW 8 FLAT "{up}etc/passwd" 0', "BackingChainError: .*outside")
    desc("abs.vmdk", 'RW 8 FLAT "/etc/passwd" 0', "BackingChainError: .*outside")
    header("g0.vmdk", 20, "<Q", 0, "FormatError: .*grainSize 0 at offset 20")
    header("g40.vmdk", 20, "<Q", 2**40, "FormatError: .*grainSize 1099511627776 at offset 20")
    header("gt.vmdk", _gd_entry0(sparse_img), "<I", 0xFFFFFF00,
           "CorruptImageError: Grain table 0 .*past the end")
    header("gd.vmdk", 56, "<Q", 1 << 40, "CorruptImageError: .*gdOffset .*offset 56")
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", BOUNDED, *cases], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    for name, expect in cases.items():
        assert re.match(expect, got[name]), (name, got[name])
    assert time.monotonic() - t < 30
