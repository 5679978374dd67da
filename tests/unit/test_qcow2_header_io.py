"""qcow2.header_io: each setter changes exactly its fields' bytes, in one write, and
Header.parse (the one header parser) reads back the value written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diskimg.qcow2 import header_io
from diskimg.qcow2.layout import (
    HDR_AUTOCLEAR_FEATURES,
    HDR_COMPATIBLE_FEATURES,
    HDR_INCOMPATIBLE_FEATURES,
    HDR_L1_SIZE,
    HDR_L1_TABLE_OFFSET,
    HDR_NB_SNAPSHOTS,
    HDR_REFCOUNT_TABLE_CLUSTERS,
    HDR_REFCOUNT_TABLE_OFFSET,
    HDR_SIZE,
    HDR_SNAPSHOTS_OFFSET,
    Header,
)


class _Mem:
    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)
        self.writes: list[tuple[int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, offset: int, data: bytes) -> int:
        self.writes.append((offset, len(data)))
        self.buf[offset:offset + len(data)] = data
        return len(data)


def test_field_offsets_are_qcow2_txt() -> None:
    # docs/interop/qcow2.txt, "Header": byte ranges of each field
    assert [(f.offset, f.size) for f in (
        HDR_SIZE, HDR_L1_SIZE, HDR_L1_TABLE_OFFSET, HDR_REFCOUNT_TABLE_OFFSET,
        HDR_REFCOUNT_TABLE_CLUSTERS, HDR_NB_SNAPSHOTS, HDR_SNAPSHOTS_OFFSET,
        HDR_INCOMPATIBLE_FEATURES, HDR_COMPATIBLE_FEATURES, HDR_AUTOCLEAR_FEATURES)] == [
        (24, 8), (36, 4), (40, 8), (48, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 8),
        (88, 8)]


_A = 0x0102030405060708
_CASES: list[tuple[str, Callable[[Any], None], dict[str, int], tuple[int, int]]] = [
    ("size", lambda h: header_io.set_size(h, 300 << 20), {"size": 300 << 20}, (24, 32)),
    ("l1", lambda h: header_io.set_l1_table(h, 5, 9 << 16),
     {"l1_size": 5, "l1_table_offset": 9 << 16}, (36, 48)),
    ("reftable", lambda h: header_io.set_refcount_table(h, 11 << 16, 3),
     {"refcount_table_offset": 11 << 16, "refcount_table_clusters": 3}, (48, 60)),
    ("snapshots", lambda h: header_io.set_snapshots(h, 2, 13 << 16),
     {"nb_snapshots": 2, "snapshots_offset": 13 << 16}, (60, 72)),
    ("tables", lambda h: header_io.set_tables(h, l1_offset=4 << 16, reftable_offset=6 << 16,
                                              reftable_clusters=2),
     {"l1_table_offset": 4 << 16, "refcount_table_offset": 6 << 16,
      "refcount_table_clusters": 2}, (40, 60)),
    ("tables+snap", lambda h: header_io.set_tables(
        h, l1_offset=4 << 16, reftable_offset=6 << 16, reftable_clusters=2,
        snapshots=(1, 8 << 16)),
     {"l1_table_offset": 4 << 16, "refcount_table_offset": 6 << 16,
      "refcount_table_clusters": 2, "nb_snapshots": 1, "snapshots_offset": 8 << 16},
     (40, 72)),
    ("incompat", lambda h: header_io.set_incompat(h, 3), {"incompatible_features": 3},
     (72, 80)),
    ("autoclear", lambda h: header_io.set_autoclear(h, 2), {"autoclear_features": 2},
     (88, 96)),
    ("features", lambda h: header_io.set_feature_fields(h, 1, 1, 3),
     {"incompatible_features": 1, "compatible_features": 1, "autoclear_features": 3},
     (72, 96)),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "setter", "expect", "span"), _CASES,
                         ids=[c[0] for c in _CASES])
def test_setter_changes_exactly_its_fields(make_image: Callable[..., Path], name: str,
                                           setter: Callable[[Any], None],
                                           expect: dict[str, int],
                                           span: tuple[int, int]) -> None:
    img = make_image("h.qcow2", "qcow2", "1M", options={"cluster_size": "65536"})
    before = img.read_bytes()
    host = _Mem(before)
    setter(host)
    lo, hi = span
    assert host.writes == [(lo, hi - lo)]  # one write: the fields change together
    after = bytes(host.buf)
    assert after[:lo] == before[:lo] and after[hi:] == before[hi:]
    assert after[lo:hi] != before[lo:hi]
    old = Header.parse(before[:65536])
    new = Header.parse(after[:65536])
    for field, value in expect.items():
        assert getattr(new, field) == value
    for field in ("version", "cluster_bits", "size", "l1_size", "l1_table_offset",
                  "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
                  "snapshots_offset", "incompatible_features", "compatible_features",
                  "autoclear_features", "refcount_order", "header_length"):
        if field not in expect:
            assert getattr(new, field) == getattr(old, field), field


def test_update_incompat_sets_clears_and_skips_noop() -> None:
    h = Header(version=3, cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=3 << 16,
               refcount_table_offset=1 << 16, refcount_table_clusters=1,
               incompatible_features=0x10)
    host = _Mem(h.pack().ljust(1 << 16, b"\0"))
    before = bytes(host.buf)
    assert header_io.update_incompat(host, set_bits=0x3) is True
    assert header_io.read_incompat(host) == 0x13
    assert bytes(host.buf[:72]) == before[:72] and bytes(host.buf[80:]) == before[80:]
    assert header_io.update_incompat(host, clear_bits=0x1) is True
    assert Header.parse(bytes(host.buf)).incompatible_features == 0x12
    n = len(host.writes)
    assert header_io.update_incompat(host, set_bits=0x2, clear_bits=0x4) is False
    assert len(host.writes) == n  # nothing to change: nothing written


def test_non_contiguous_fields_are_refused() -> None:
    host = _Mem(bytes(128))
    with pytest.raises(ValueError, match="contiguous"):
        header_io.write_fields(host, (HDR_SIZE, 1), (HDR_L1_TABLE_OFFSET, 2))
    assert host.buf == bytes(128) and host.writes == []
