"""vmdk vs qemu-img 7.2: read what qemu writes (map/info JSON equal, same bytes), qemu
accepts what diskimg writes (check clean, compare identical), create is byte-identical
except the random CID."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.errors import BackingChainError
from diskimg.hostio import open_host_file
from diskimg.raw import RawImage
from diskimg.vmdk import VmdkImage, create_vmdk, open_vmdk, write_stream_optimized
from diskimg.vmdk.sesparse import (
    SESPARSE_CONST_MAGIC,
    SESPARSE_VERSION,
    SESPARSE_VOLATILE_MAGIC,
    SeSparseHeader,
)

pytestmark = pytest.mark.qemu
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat"]
BIG = (2 << 30) + (3 << 20)   # two extents for the twoGbMaxExtent* subformats


def _size(sub: str) -> int:
    return BIG if sub.startswith("twoGb") else 6 << 20


def _io_writes(sub: str) -> list[str]:
    base = (2 << 30) - (1 << 20) if sub.startswith("twoGb") else 0
    return [f"write -P 0xab {base} 4k", f"write -P 0xcd {base + 1000 * 1024} 70k",
            f"write -z {base + (3 << 20)} 64k", f"write -P 0x11 {base + (1 << 20) + 512} 1M"]


def _compare_json(path: Path) -> None:
    with open_vmdk(open_host_file(path)) as img:
        mine_map = [e.to_json() for e in img.map()]
        mine_info = img.info().to_json()
    assert mine_map == QEMU.json("map", path)
    theirs = QEMU.json("info", path)
    assert isinstance(theirs, dict)
    mine_info.pop("actual-size")
    theirs.pop("actual-size")
    assert mine_info == theirs


def _dump_data(img: VmdkImage, out: Path) -> None:
    """Write the image's data runs into a sparse raw file (fast compare for huge disks)."""
    with open(out, "wb") as f:
        f.truncate(img.size)
        for e in img.map():
            if e.data and not e.zero:
                for o in range(e.start, e.start + e.length, 1 << 20):
                    n = min(1 << 20, e.start + e.length - o)
                    f.seek(o)
                    f.write(img.read(o, n))


@pytest.mark.parametrize("sub", [*SUBFORMATS, "streamOptimized"])
def test_read_qemu_images(tmp_path: Path, sub: str) -> None:
    p = tmp_path / "d.vmdk"
    size = _size(sub)
    if sub == "streamOptimized":
        src = tmp_path / "src.raw"
        with open(src, "wb") as f:
            f.truncate(size)
            f.write(os.urandom(100000))
            f.seek(3 << 20)
            f.write(b"x" * 300000)
        QEMU.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, p)
    else:
        QEMU.img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", p, str(size))
        cmds = _io_writes(sub)
        QEMU.io(p, *cmds, fmt="vmdk")
    _compare_json(p)
    with open_vmdk(open_host_file(p)) as img:
        _dump_data(img, tmp_path / "mine.raw")
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", p, tmp_path / "mine.raw")


def test_read_qemu_zeroed_grain(tmp_path: Path) -> None:
    p = tmp_path / "z.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", p, "4M")
    QEMU.io(p, "write -P 7 0 1M", "write -z 64k 256k", fmt="vmdk")
    _compare_json(p)
    with open_vmdk(open_host_file(p)) as img:
        assert img.read(0, 1 << 20) == b"\7" * 65536 + bytes(262144) + b"\7" * (720896)


def _host_map(path: Path) -> list[dict[str, object]]:
    """``qemu-img map`` of a host file read as raw: where its data and holes lie."""
    got: list[dict[str, object]] = QEMU.json("map", "-f", "raw", path)
    return got


@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("opts", [
    {}, {"adapter_type": "lsilogic", "zeroed_grain": "on", "hwversion": "7",
         "toolsversion": "123"},
    {"compat6": "on", "adapter_type": "legacyESX"}, {"adapter_type": "buslogic"}])
def test_create_identical(tmp_path: Path, sub: str, opts: dict[str, str]) -> None:
    if "Flat" in sub and "zeroed_grain" in opts:
        pytest.skip("qemu: Flat image can't enable zeroed grain")
    qd, md = tmp_path / "q", tmp_path / "m"
    qd.mkdir()
    md.mkdir()
    size = _size(sub) + 1000        # also exercises rounding up to a sector
    o = ",".join(f"{k}={v}" for k, v in {"subformat": sub, **opts}.items())
    QEMU.img("create", "-q", "-f", "vmdk", "-o", o, qd / "x.vmdk", str(size))
    create_vmdk(md / "x.vmdk", size, options={"subformat": sub, **opts})
    assert sorted(os.listdir(qd)) == sorted(os.listdir(md))

    def split(b: bytes) -> tuple[bytes, str]:
        """(binary part with the descriptor area zeroed, descriptor text with CID masked)"""
        if b[:4] == b"KDMV":
            text = b[512:512 * 21].split(b"\0")[0]
            b = b[:512] + bytes(512 * 20) + b[512 * 21:]
        else:
            text, b = b, b""
        return b, re.sub(r"\nCID=[0-9a-f]+\n", "\nCID=X\n", text.decode("latin-1"))

    for name in os.listdir(qd):
        sa, sb = (qd / name).stat().st_size, (md / name).stat().st_size
        if sa > 16 << 20:  # a flat extent: an empty file of the extent's size, laid out
            # as qemu's file protocol lays out a new file (its first block allocated)
            assert sa == sb, name
            assert _host_map(qd / name) == _host_map(md / name), name
            continue
        assert split((qd / name).read_bytes()) == split((md / name).read_bytes()), name


@pytest.mark.parametrize("sub", [*SUBFORMATS, "streamOptimized"])
def test_qemu_accepts_diskimg_writes(tmp_path: Path, sub: str) -> None:
    p = tmp_path / "d.vmdk"
    size = _size(sub)
    base = (2 << 30) - (1 << 20) if sub.startswith("twoGb") else 0
    zg = sub.endswith("Sparse")
    create_vmdk(p, size, options={"subformat": sub, "zeroed_grain": zg})
    model = tmp_path / "model.raw"
    ops: list[tuple[int, bytes]] = []
    with open_vmdk(open_host_file(p, True)) as img:
        if sub == "streamOptimized":
            for off, n in [(1000, 70000), (200000, 1), (1 << 20, 1 << 20), (size - 10, 10)]:
                d = os.urandom(n)
                img.write(off, d)
                ops.append((off, d))
        else:
            for off, n in [(1000, 70000), (base + 4096, 200000), (base + (3 << 20), 65536),
                           (size - 100, 100), (base + 10, 1)]:
                d = os.urandom(n)
                img.write(off, d)
                ops.append((off, d))
            img.write_zeroes(base, 131072)
            ops.append((base, bytes(131072)))
    with open(model, "wb") as f:
        f.truncate(size)
        for off, d in ops:
            f.seek(off)
            f.write(d)
    assert "No errors" in QEMU.img("check", p).stdout
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", p, model)
    info = QEMU.json("info", p)
    assert isinstance(info, dict)
    assert info["format-specific"]["data"]["create-type"] == sub


def test_write_stream_optimized_from_raw(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    with open(src, "wb") as f:
        f.truncate((7 << 20) + 512)
        f.write(os.urandom(1 << 20))
        f.seek(5 << 20)
        f.write(b"hello" * 100000)
        f.seek((7 << 20) + 100)
        f.write(b"end")
    dst = tmp_path / "o.vmdk"
    with RawImage(open_host_file(src)) as r:
        write_stream_optimized(r, dst, options={"adapter_type": "lsilogic",
                                                "hwversion": "8"})
    assert "No errors" in QEMU.img("check", dst).stdout
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", dst, src)
    text = dst.read_bytes()[512:512 * 21].rstrip(b"\0").decode()
    assert 'ddb.toolsVersion = "2147483647"' in text and 'ddb.virtualHWVersion = "8"' in text
    _compare_json(dst)


def test_qemu_writes_into_diskimg_created(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    create_vmdk(p, 4 << 20, options={"subformat": "monolithicSparse"})
    QEMU.io(p, "write -P 0x5a 65536 100k", fmt="vmdk")
    with open_vmdk(open_host_file(p)) as img:
        assert img.read(65536, 102400) == b"\x5a" * 102400
    _compare_json(p)


def test_parent_chain_and_cid_check(tmp_path: Path) -> None:
    base, top = tmp_path / "base.vmdk", tmp_path / "top.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", base, "4M")
    QEMU.io(base, "write -P 1 0 1M", fmt="vmdk")
    create_vmdk(top, 4 << 20, backing_file="base.vmdk")
    with open_vmdk(open_host_file(top, True)) as img:
        img.backing = open_vmdk(open_host_file(base))
        img.backing_attached()
        assert img.backing_file_name() == ("base.vmdk", "vmdk")
        img.write(4096, b"\2" * 4096)
        assert img.read(0, 12288) == b"\1" * 4096 + b"\2" * 4096 + b"\1" * 4096
        info = img.info().to_json()
    QEMU.io(top, "read -P 1 0 4k", "read -P 2 4k 4k", "read -P 1 8k 1016k", fmt="vmdk")
    theirs = QEMU.json("info", top)
    assert isinstance(theirs, dict)
    for k in ("backing-filename", "backing-filename-format", "format-specific"):
        assert info[k] == theirs[k]
    assert "No errors" in QEMU.img("check", top).stdout
    QEMU.io(base, "write -P 3 2M 4k", fmt="vmdk")     # changes base's CID
    with open_vmdk(open_host_file(top)) as img:
        img.backing = open_vmdk(open_host_file(base))
        img.backing_attached()
        with pytest.raises(BackingChainError, match="CID"):
            img.read(2 << 20, 4096)


def test_vmfs_descriptor(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(os.urandom(1 << 20))
    p = tmp_path / "x.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                 'createType="vmfs"\n\n# Extent description\nRW 2048 VMFS "x-flat.vmdk"\n\n'
                 'ddb.adapterType = "lsilogic"\n')
    _compare_json(p)
    with open_vmdk(open_host_file(p)) as img:
        assert img.read(0, 1 << 20) == (tmp_path / "x-flat.vmdk").read_bytes()


def test_check_grain_past_eof(tmp_path: Path) -> None:
    import struct

    p = tmp_path / "d.vmdk"
    create_vmdk(p, 4 << 20, options={})
    with open_vmdk(open_host_file(p)) as img:
        assert img.check().exit_code == 0
        gd = img.extents[0].header.gd_offset * 512
    raw = bytearray(p.read_bytes())
    gt = struct.unpack_from("<I", raw, gd)[0] * 512
    struct.pack_into("<I", raw, gt + 4, 10**7)
    p.write_bytes(bytes(raw))
    with open_vmdk(open_host_file(p)) as img:
        res = img.check()
    r = QEMU.img("check", p, ok=(1,))
    assert res.exit_code == 1 and res.corruptions == 1
    assert res.messages == [r.stderr.splitlines()[0]]
    assert r.stderr.splitlines()[1].endswith(res.failure_message)


def test_fill_qemu_created_stream(tmp_path: Path) -> None:
    """An empty streamOptimized file in qemu's layout (GD in front) is filled front to back
    and comes out in VMware's layout, readable by qemu."""
    from diskimg.errors import UnsupportedFeatureError

    p = tmp_path / "o.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", p, "3M")
    data = os.urandom(100000)
    with open_vmdk(open_host_file(p, True)) as img:
        img.write(5000, data)
        img.write(2 << 20, b"end")
    model = tmp_path / "m.raw"
    with open(model, "wb") as f:
        f.truncate(3 << 20)
        f.seek(5000)
        f.write(data)
        f.seek(2 << 20)
        f.write(b"end")
    assert "No errors" in QEMU.img("check", p).stdout
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", p, model)
    _compare_json(p)
    src = tmp_path / "s.raw"
    src.write_bytes(os.urandom(1 << 20))
    QEMU.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src,
             tmp_path / "q.vmdk")
    for f in (p, tmp_path / "q.vmdk"):       # holding data: no longer appendable
        with open_host_file(f, True) as h, pytest.raises(UnsupportedFeatureError):
            open_vmdk(h)


def test_create_with_backing_identical(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    QEMU.img("create", "-q", "-f", "vmdk", base, "4M")
    (tmp_path / "q").mkdir()
    (tmp_path / "m").mkdir()
    QEMU.img("create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk",
             tmp_path / "q" / "t.vmdk", "4M")
    create_vmdk(tmp_path / "m" / "t.vmdk", 4 << 20, backing_file="../base.vmdk", options={})
    a, b = (tmp_path / "q" / "t.vmdk").read_bytes(), (tmp_path / "m" / "t.vmdk").read_bytes()
    ta = re.sub(rb"\nCID=[0-9a-f]+\n", b"", a[512:21 * 512].split(b"\0")[0])
    tb = re.sub(rb"\nCID=[0-9a-f]+\n", b"", b[512:21 * 512].split(b"\0")[0])
    assert ta == tb and b'parentFileNameHint="../base.vmdk"' in tb
    assert a[:512] == b[:512] and a[21 * 512:] == b[21 * 512:]
    (tmp_path / "r.raw").write_bytes(bytes(1 << 20))
    with pytest.raises(Exception, match="must be a vmdk image"):
        create_vmdk(tmp_path / "x.vmdk", 1 << 20, backing_file="r.raw", options={})


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


def test_vmfs_sparse_cowd(tmp_path: Path) -> None:
    p = make_cowd(tmp_path)
    _compare_json(p)
    with open_vmdk(open_host_file(p)) as img:
        _dump_data(img, tmp_path / "mine.raw")
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", p, tmp_path / "mine.raw")


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


def test_sesparse(tmp_path: Path) -> None:
    p = make_sesparse(tmp_path)
    _compare_json(p)
    with open_vmdk(open_host_file(p)) as img:
        data = img.read(0, img.size)
    (tmp_path / "mine.raw").write_bytes(data)
    QEMU.img("compare", "-f", "vmdk", "-F", "raw", p, tmp_path / "mine.raw")
    assert data[:4096] == b"B" * 4096 and data[200 * 4096:201 * 4096] == b"Z" * 4096


# --- map parity after writes and write-zeroes (issue 10) ------------------------------------
# qemu 7.2 marks only whole grains of a zeroed_grain extent zeroed; every other zero write
# (unaligned head/tail, no zeroed_grain, flat extents) falls back to writing zero bytes, which
# allocates grains like any write.  Same requests must leave the same map, host offsets and
# zero/data flags included.  (id, create options, size, [(op, offset, length)]; op "w" writes
# 0x5a, "z" write_zeroes, "u" write_zeroes with may_unmap.)
MAP_PARITY = [
    ("zero-empty", {}, 4 << 20, [("z", 0, 64 << 10)]),
    ("zero-unmap-empty", {}, 4 << 20, [("u", 0, 64 << 10)]),
    ("zero-unaligned", {}, 4 << 20, [("z", 8 << 10, 100 << 10)]),
    ("zero-over-data", {}, 4 << 20, [("w", 64 << 10, 64 << 10), ("z", 0, 1 << 20)]),
    ("zero-then-write", {}, 4 << 20, [("z", 0, 128 << 10), ("w", 64 << 10, 4096)]),
    ("zero-over-16M", {}, 40 << 20, [("w", 0, 4096), ("z", 60 << 10, 20 << 20)]),
    ("zg-empty", {"zeroed_grain": "on"}, 4 << 20, [("z", 0, 64 << 10)]),
    ("zg-unmap", {"zeroed_grain": "on"}, 4 << 20, [("u", 0, 64 << 10)]),
    ("zg-over-data", {"zeroed_grain": "on"}, 4 << 20, [("w", 64 << 10, 64 << 10),
                                                        ("z", 0, 1 << 20)]),
    ("zg-head-tail", {"zeroed_grain": "on"}, 4 << 20, [("z", 8 << 10, 200 << 10),
                                                        ("w", 1 << 20, 4096)]),
    ("zg-then-write", {"zeroed_grain": "on"}, 4 << 20, [("z", 0, 128 << 10),
                                                         ("w", 64 << 10, 4096)]),
    ("zg-partial-last-grain", {"zeroed_grain": "on"}, 1000 << 10, [("z", 0, 1000 << 10),
                                                                   ("w", 900 << 10, 1024)]),
    ("flat", {"subformat": "monolithicFlat"}, 4 << 20, [("w", 0, 128 << 10),
                                                        ("z", 0, 64 << 10),
                                                        ("z", 1 << 20, 64 << 10)]),
    ("split-boundary", {"subformat": "twoGbMaxExtentSparse"}, 5 << 30,
     [("z", (2047 << 20), 2 << 20), ("w", 2047 << 20, 4096)]),
    ("split-boundary-zg", {"subformat": "twoGbMaxExtentSparse", "zeroed_grain": "on"}, 5 << 30,
     [("z", (2047 << 20), 2 << 20), ("w", 2049 << 20, 4096)]),
]


@pytest.mark.parametrize("opts,size,ops", [c[1:] for c in MAP_PARITY],
                         ids=[c[0] for c in MAP_PARITY])
def test_map_parity_after_writes_and_zeroes(tmp_path: Path, opts: dict[str, str], size: int,
                                            ops: list[tuple[str, int, int]]) -> None:
    theirs, mine = tmp_path / "q.vmdk", tmp_path / "d.vmdk"
    o = ",".join(f"{k}={v}" for k, v in opts.items()) or "subformat=monolithicSparse"
    for p in (theirs, mine):
        QEMU.img("create", "-q", "-f", "vmdk", "-o", o, p, str(size))
    cmds: list[str] = []
    for op, off, n in ops:
        cmds.append(f"write -P 0x5a {off} {n}" if op == "w" else
                    f"write -z {'-u ' if op == 'u' else ''}{off} {n}")
    QEMU.io(theirs, *cmds, fmt="vmdk")
    with open_vmdk(open_host_file(mine, True)) as img:
        for op, off, n in ops:
            if op == "w":
                img.write(off, b"\x5a" * n)
            else:
                img.write_zeroes(off, n, may_unmap=op == "u")
    with open_vmdk(open_host_file(mine)) as img:
        mine_map = [e.to_json() for e in img.map()]
    assert mine_map == QEMU.json("map", theirs)
    assert QEMU.json("map", mine) == mine_map
    QEMU.img("compare", theirs, mine)
    assert "No errors" in QEMU.img("check", mine).stdout
