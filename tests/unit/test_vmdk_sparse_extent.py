"""diskimg.vmdk.sparse_extent: grain-table lookups return typed Runs whose host offsets
are where the grains lie, and executing them reads back exactly what was written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import CorruptImageError
from diskimg.plan import Run, RunKind, check_plan
from diskimg.vmdk import create_vmdk
from diskimg.vmdk import markers as M
from diskimg.vmdk import sparse as S
from diskimg.vmdk.image import VmdkImage
from diskimg.vmdk.sparse_extent import SparseExtent

MiB = 1 << 20
GB = 64 << 10                     # qemu's grain: 128 sectors
D, Z, U, C = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED


def _plan(ext: SparseExtent, off: int, length: int) -> list[Run]:
    runs: list[Run] = []
    pos = off
    while pos < off + length:
        r = ext.lookup(pos, off + length - pos)
        runs.append(r)
        pos = r.end
    check_plan(runs, off, off + length, ext.size)
    return runs


def _extent(img: diskimg.BlockDevice) -> SparseExtent:
    assert isinstance(img, VmdkImage)
    ext = img.extents[0]
    assert isinstance(ext, SparseExtent)
    return ext


def _sparse(tmp_path: Path) -> tuple[Path, bytes]:
    """64 MiB monolithicSparse with zeroed grains: grains 0-1 written together, grain 3,
    grain 5 marked zeroed, grains 511-512 (across grain tables 0 and 1)."""
    p = tmp_path / "s.vmdk"
    create_vmdk(p, 64 * MiB, options={"zeroed_grain": "on"})
    want = bytearray(64 * MiB)
    with diskimg.open(p, "r+", format="vmdk") as img:
        for off, data in ((0, b"\x11" * 2 * GB), (3 * GB, b"\x33" * GB),
                          (511 * GB, b"\x44" * 2 * GB)):
            img.write(off, data)
            want[off:off + len(data)] = data
        img.write_zeroes(5 * GB, GB)
    return p, bytes(want)


def test_lookups_are_runs_at_the_grains_host_offsets(tmp_path: Path) -> None:
    p, want = _sparse(tmp_path)
    with diskimg.open(p, "r", format="vmdk") as img:
        ext = _extent(img)
        first = ext.header.overhead * S.SECTOR            # grains are appended from here
        name = str(p)
        runs = _plan(ext, 0, 64 * MiB)
        assert runs == [
            Run(0, 2 * GB, D, first, first // S.SECTOR, name),
            Run(2 * GB, GB, U),
            Run(3 * GB, GB, D, first + 2 * GB, (first + 2 * GB) // S.SECTOR, name),
            Run(4 * GB, GB, U),
            Run(5 * GB, GB, Z, entry=S.GTE_ZEROED),
            Run(6 * GB, 505 * GB, U),                     # the rest of table 0
            Run(511 * GB, GB, D, first + 3 * GB, (first + 3 * GB) // S.SECTOR, name),
            Run(512 * GB, GB, D, first + 4 * GB, (first + 4 * GB) // S.SECTOR, name),
            Run(513 * GB, 64 * MiB - 513 * GB, U),
        ]
        # a lookup inside a grain starts there and its host offset follows
        assert ext.lookup(GB + 100, 10) == Run(GB + 100, 10, D, first + GB + 100,
                                               first // S.SECTOR + 128, name)
        got = img.read(0, img.size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    raw = p.read_bytes()
    assert raw[first:first + 2 * GB] == b"\x11" * 2 * GB     # where the run says
    assert raw[first + 2 * GB:first + 3 * GB] == b"\x33" * GB


def test_compressed_runs_name_the_first_grain_record(tmp_path: Path) -> None:
    p = tmp_path / "st.vmdk"
    create_vmdk(p, 4 * MiB, options={"subformat": "streamOptimized"})
    want = bytearray(4 * MiB)
    want[0:3 * GB] = bytes(range(256)) * (3 * GB // 256)
    want[5 * GB:5 * GB + 10] = b"x" * 10
    with diskimg.open(p, "r+", format="vmdk") as img:
        img.write(0, bytes(want[:6 * GB]))
    with diskimg.open(p, "r", format="vmdk") as img:
        ext = _extent(img)
        runs = _plan(ext, 0, 4 * MiB)
        assert [(r.offset, r.length, r.kind) for r in runs] == [
            (0, 3 * GB, C), (3 * GB, 2 * GB, U), (5 * GB, GB, C), (6 * GB, 4 * MiB - 6 * GB, U)]
        raw = p.read_bytes()
        for r, lba in ((runs[0], 0), (runs[2], 5 * GB // S.SECTOR)):
            assert r.host is not None and r.filename == str(p)
            assert M.GRAIN_MARKER.unpack_from(raw, r.host)[0] == lba
        part = bytearray(GB + 7)                          # a whole grain and a piece
        ext.read_compressed(Run(GB, len(part), C, ext.lookup(GB, 1).host), memoryview(part))
        assert bytes(part) == want[GB:2 * GB + 7]
        assert img.read(0, img.size) == bytes(want)


def test_a_data_run_past_the_file_end_is_refused_with_its_offset(tmp_path: Path) -> None:
    p, _ = _sparse(tmp_path)
    with diskimg.open(p, "r", format="vmdk") as img:
        ext = _extent(img)
        gt0 = ext.gd[0] * S.SECTOR
    bad = (p.stat().st_size // S.SECTOR + 1000)
    with open(p, "r+b") as f:                  # grain 3's entry now points past the end
        f.seek(gt0 + 4 * 3)
        f.write(bad.to_bytes(4, "little"))
    before = p.read_bytes()
    with diskimg.open(p, "r", format="vmdk") as img:
        r = _extent(img).lookup(3 * GB, GB)
        assert (r.kind, r.host) == (D, bad * S.SECTOR)
        with pytest.raises(CorruptImageError) as ei:
            img.read(3 * GB, 512)
    assert ei.value.offset == bad * S.SECTOR and f"{bad * S.SECTOR:#x}" in str(ei.value)
    assert p.read_bytes() == before


def test_a_grain_table_past_the_file_end_names_its_directory_entry(tmp_path: Path) -> None:
    p, _ = _sparse(tmp_path)
    with diskimg.open(p, "r", format="vmdk") as img:
        h = _extent(img).header
    gde = h.gd_offset * S.SECTOR + 4              # directory entry of grain table 1
    with open(p, "r+b") as f:
        f.seek(gde)
        f.write((0xFFFFFF).to_bytes(4, "little"))
    with diskimg.open(p, "r", format="vmdk") as img:
        ext = _extent(img)
        assert ext.lookup(0, GB).kind is D          # table 0 is fine
        with pytest.raises(CorruptImageError) as ei:
            ext.lookup(512 * GB, GB)
    assert ei.value.offset == gde
