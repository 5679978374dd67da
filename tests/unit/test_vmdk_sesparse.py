"""diskimg.vmdk.sesparse: u64 grain table entries mapped to typed Runs (allocated grains
at their split-encoded grain numbers, zero and unmapped as ZERO, empty as UNALLOCATED)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskimg.errors import CorruptImageError
from diskimg.hostio import open_host_file
from diskimg.plan import Run, RunKind
from diskimg.vmdk import open_vmdk
from diskimg.vmdk.sesparse import SeSparseExtent
from tests.formats.test_vmdk_badinput import make_sesparse

G = 4096
GRAINS_AT = (4 + 64) * 512        # make_sesparse's grains_offset, in bytes
D, Z, U = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED


def test_entries_map_to_runs_and_reads_execute_them(tmp_path: Path) -> None:
    p = make_sesparse(tmp_path)
    name = str(tmp_path / "s-sesparse.vmdk")
    with open_vmdk(open_host_file(p)) as img:
        ext = img.extents[0]
        assert isinstance(ext, SeSparseExtent)
        e = lambda g: (3 << 60) | ((g & 0xFFF) << 48) | (g >> 12)   # noqa: E731
        assert ext.lookup(0, 10 * G) == Run(0, G, D, GRAINS_AT + G, e(1), name)
        assert ext.lookup(5 * G + 7, 9) == Run(5 * G + 7, 9, D, GRAINS_AT + 7, e(0), name)
        assert ext.lookup(200 * G, G) == Run(200 * G, G, D, GRAINS_AT + 4097 * G, e(4097),
                                             name)
        assert ext.lookup(7 * G, 2 * G) == Run(7 * G, G, Z, entry=2 << 60)
        assert ext.lookup(8 * G, G) == Run(8 * G, G, Z, entry=1 << 60)
        assert ext.lookup(G, 3 * G) == Run(G, G, U)
        data = img.read(0, img.size)
    assert data[:G] == b"B" * G and data[5 * G:6 * G] == b"A" * G
    assert data[100 * G:101 * G] == b"C" * G and data[200 * G:201 * G] == b"Z" * G
    assert data.count(0) == len(data) - 4 * G


def test_an_invalid_table_entry_is_refused_naming_its_offset(tmp_path: Path) -> None:
    p = make_sesparse(tmp_path)
    ext_file = tmp_path / "s-sesparse.vmdk"
    raw = bytearray(ext_file.read_bytes())
    at = 4 * 512 + 8 * 9                      # table entry 9: type 4 does not exist
    raw[at:at + 8] = (4 << 60).to_bytes(8, "little")
    ext_file.write_bytes(raw)
    before = ext_file.read_bytes()
    with open_vmdk(open_host_file(p)) as img, pytest.raises(CorruptImageError,
                                                           match="grain table entry") as ei:
        img.read(9 * G, 1)
    assert ei.value.offset == at and f"{at:#x}" in str(ei.value)     # names where it is
    assert ext_file.read_bytes() == before
