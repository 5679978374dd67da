"""vmdk/sparse.py's records: ``SparseHeader``, ``CowdHeader``, ``Marker`` and
``SeSparseHeader`` round trip both ways (parse(pack(x)) == x with hypothesis, and
pack(parse(b)) == b on every sector of fields with zero padding, including the headers
qemu-img writes).  The extent logic: test_vmdk_sparse_extent.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemukit import Qemu

from diskimg.vmdk import markers as M
from diskimg.vmdk import sparse as S
from diskimg.vmdk.cowd import CowdHeader
from diskimg.vmdk.sesparse import SeSparseHeader

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
u32, u64 = st.integers(0, U32), st.integers(0, U64)


@given(version=u32, flags=u32, capacity=u64, grain=u64, doff=u64, dsize=u64, gtes=u32,
       rgd=u64, gd=u64, overhead=u64, unclean=st.integers(0, 255),
       eol=st.binary(min_size=4, max_size=4), comp=st.integers(0, 0xFFFF))
def test_sparse_header_round_trips(version: int, flags: int, capacity: int, grain: int,
                                   doff: int, dsize: int, gtes: int, rgd: int, gd: int,
                                   overhead: int, unclean: int, eol: bytes,
                                   comp: int) -> None:
    h = S.SparseHeader(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
                       unclean, eol, comp)
    raw = h.pack()
    assert len(raw) == 512 and raw[:4] == S.VMDK4_MAGIC and raw[S.SparseHeader.SIZE:] \
        == bytes(512 - S.SparseHeader.SIZE)
    assert S.SparseHeader.parse(raw) == h
    assert S.SparseHeader.parse(raw).pack() == raw


@given(fields=st.binary(min_size=S.SparseHeader.SIZE - 4,
                        max_size=S.SparseHeader.SIZE - 4))
def test_sparse_header_pack_of_parse_is_the_sector(fields: bytes) -> None:
    raw = (S.VMDK4_MAGIC + fields).ljust(512, b"\0")
    assert S.SparseHeader.parse(raw).pack() == raw


@given(fields=st.binary(min_size=S.SparseHeader.SIZE - 4,
                        max_size=S.SparseHeader.SIZE - 4))
def test_sparse_header_layout_is_the_struct_layout(fields: bytes) -> None:
    """The header is read and written with ``int.from_bytes`` (no struct module on a
    read-only open): its fields are those of the spec's packed little-endian layout,
    ``<4sIIQQQQIQQQB4sH``, both ways."""
    import struct

    layout = struct.Struct("<4sIIQQQQIQQQB4sH")
    raw = (S.VMDK4_MAGIC + fields).ljust(512, b"\0")
    h = S.SparseHeader.parse(raw)
    assert layout.unpack_from(raw, 0)[1:] == (
        h.version, h.flags, h.capacity, h.grain_size, h.desc_offset, h.desc_size,
        h.num_gtes_per_gt, h.rgd_offset, h.gd_offset, h.overhead, h.unclean_shutdown,
        h.eol, h.compress_algorithm)
    assert h.pack() == layout.pack(S.VMDK4_MAGIC, *layout.unpack_from(raw, 0)[1:]).ljust(
        512, b"\0")


@given(fields=st.lists(u32, min_size=10, max_size=10))
def test_cowd_header_round_trips(fields: list[int]) -> None:
    h = CowdHeader(*fields)
    raw = h.pack()
    assert len(raw) == 512 and raw[:4] == b"COWD"
    assert CowdHeader.parse(raw) == h and CowdHeader.parse(raw).pack() == raw


@given(value=u64, size=u32, typ=u32)
def test_marker_round_trips(value: int, size: int, typ: int) -> None:
    m = M.Marker(value, size, typ)
    raw = m.pack()
    assert len(raw) == 512 and raw[16:] == bytes(496)
    assert M.Marker.parse(raw) == m and M.Marker.parse(raw).pack() == raw


@given(fields=st.lists(u64, min_size=26, max_size=26))
def test_sesparse_header_round_trips(fields: list[int]) -> None:
    h = SeSparseHeader(tuple(fields))
    raw = h.pack()
    assert len(raw) == 512
    assert SeSparseHeader.parse(raw) == h and SeSparseHeader.parse(raw).pack() == raw
    assert (h.magic, h.grains_size) == (fields[0], fields[25])


@pytest.mark.qemu
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_qemu_written_header_packs_back_identically(
        sub: str, tmp_path: Path, qemu: Qemu) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x5a" * 70000 + bytes(200000) + b"\xa5" * 5000)
    img = tmp_path / "q.vmdk"
    qemu.img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, img)
    raw = img.read_bytes()
    h = S.SparseHeader.parse(raw[:512])
    assert h.pack() == raw[:512]
    # qemu 7.2 writes a streamOptimized file with its grain directory up front (no footer)
    assert h.has_markers == (sub == "streamOptimized")
