"""qcow2 with an external data file, from the stored fixture pair (no qemu needed).

Guest cluster 0 lies at data-file offset 0: its L2 entry is QCOW_OFLAG_COPIED with host
offset 0, a data cluster only because the image has a data file (issue 15, bug 2).  The
differential tests against qemu are tests/interop/test_qcow2_data_file.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import diskimg

SIZE = 256 << 10
CS = 4096


def _model() -> bytearray:
    """The guest disk fixtures/README.md describes for datafile.qcow2."""
    m = bytearray(SIZE)
    m[0 : 6 << 10] = b"\x5d" * (6 << 10)
    m[100 << 10 : 104 << 10] = b"\x6e" * 4096
    m[255 << 10 : 256 << 10] = b"\x7f" * 1024
    return m


def _pair(fixture_file: Callable[[str], Path]) -> tuple[Path, Path]:
    return fixture_file("datafile.qcow2"), fixture_file("datafile.raw")


# qemu-img 7.2 map --output=json of the fixture
QEMU_MAP = [
    {"start": 0, "length": 8192, "depth": 0, "present": True, "zero": False, "data": True,
     "offset": 0},
    {"start": 8192, "length": 4096, "depth": 0, "present": True, "zero": True, "data": False},
    {"start": 12288, "length": 90112, "depth": 0, "present": False, "zero": True,
     "data": False},
    {"start": 102400, "length": 4096, "depth": 0, "present": True, "zero": False,
     "data": True, "offset": 102400},
    {"start": 106496, "length": 151552, "depth": 0, "present": False, "zero": True,
     "data": False},
    {"start": 258048, "length": 4096, "depth": 0, "present": True, "zero": False,
     "data": True, "offset": 258048},
]


def test_reads_guest_cluster_0_from_data_file_offset_0(
        fixture_file: Callable[[str], Path]) -> None:
    img, _ = _pair(fixture_file)
    with diskimg.open(img) as d:
        assert d.read(0, CS) == b"\x5d" * CS
        got = d.read(0, SIZE)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(_model()).hexdigest()
        assert [e.to_json() for e in d.map()] == QEMU_MAP


def test_partial_write_to_cluster_0_keeps_its_other_bytes(
        fixture_file: Callable[[str], Path]) -> None:
    """The write goes in place at data-file offset 0; nothing else in the cluster (or the
    disk) changes, and the image stays clean for diskimg's checker."""
    img, raw = _pair(fixture_file)
    before = img.read_bytes()
    model = _model()
    with diskimg.open(img, "r+") as d:
        d.write(100, b"\x01" * 50)
        d.write(5000, b"\x02" * 10)  # the half-written cluster 1
    model[100:150] = b"\x01" * 50
    model[5000:5010] = b"\x02" * 10
    # in-place writes change no metadata: the qcow2 file is byte-identical
    assert hashlib.sha256(img.read_bytes()).digest() == hashlib.sha256(before).digest()
    assert raw.read_bytes()[: 2 * CS].hex() == model[: 2 * CS].hex()
    with diskimg.open(img) as d:
        got = d.read(0, SIZE)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest()
        assert [e.to_json() for e in d.map()] == QEMU_MAP
    with diskimg.open(img) as d:
        res = d.check()
    assert res.exit_code == 0 and not res.corruptions and not res.leaks, res.to_json()
