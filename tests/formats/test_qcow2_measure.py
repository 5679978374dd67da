"""qcow2/measure.py: the arithmetic, checked against numbers qemu-img 7.2 printed."""

from __future__ import annotations

import pytest

from diskimg.errors import UsageError
from diskimg.qcow2.measure import (
    MeasureInfo,
    bitmaps_size,
    data_clusters_bytes,
    luks_header_size,
    measure,
    refcount_metadata_size,
)

G = 1 << 30


@pytest.mark.parametrize("size,opts,required,full", [
    (G, {}, 393216, 1074135040),
    (G, {"extended_l2": "on"}, 524288, 1074266112),
    (G, {"cluster_size": "1024"}, 10591232, 1084333056),
    (G, {"preallocation": "full"}, 1074135040, 1074135040),
    (1000, {}, 327680, 393216),
    (0, {}, 196608, 196608),
])
def test_measure_size_matches_qemu(size: int, opts: dict[str, str], required: int,
                                   full: int) -> None:
    info = measure("qcow2", opts, size=size)
    assert (info.required, info.fully_allocated, info.bitmaps) == (required, full, None)


def test_luks_payload() -> None:
    assert luks_header_size() == 2068480
    info = measure("qcow2", {"encrypt.format": "luks", "encrypt.key-secret": "s"}, size=G,
                   has_secret=lambda s: True)
    assert (info.required, info.fully_allocated) == (2490368, 1076232192)


def test_raw_rounds_to_sector() -> None:
    assert measure("raw", {}, size=1000) == MeasureInfo(1024, 1024)


def test_refcount_fixed_point_counts_itself() -> None:
    size, blocks = refcount_metadata_size(32768, 65536, 4)
    assert blocks == 2 and size == 3 * 65536  # 32768 + 3 clusters need 2 blocks
    size, blocks = refcount_metadata_size(32768, 65536, 4, generous_increase=True)
    assert blocks >= 1


def test_data_clusters_round_to_clusters() -> None:
    cs = 65536
    runs = [(0, 4096, False), (4096, 512, True), (4608, 200000, False),
            (204608, 10, True), (204618, 1000, True)]
    # cluster 0 and cluster 3 hold data
    assert data_clusters_bytes(runs, cs) == 2 * cs


def test_bitmaps_size() -> None:
    assert bitmaps_size([("bm0", 10 << 20, 65536), ("bm-longer-name", 10 << 20, 4096)],
                        65536) == 327680


@pytest.mark.parametrize("opts,msg", [
    ({"cluster_size": "3072"}, "Cluster size must be a power of two"),
    ({"compat": "v3"}, "Invalid compatibility level: 'v3'"),
    ({"refcount_bits": "128"}, "Refcount width must be a power of two"),
    ({"compat": "0.10", "refcount_bits": "8"}, "require compatibility level 1.1"),
    ({"preallocation": "x"}, "invalid parameter value: x"),
    ({"extended_l2": "on", "cluster_size": "4096"}, "at least 16384 bytes"),
])
def test_option_errors(opts: dict[str, str], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        measure("qcow2", opts, size=G)


def test_too_large() -> None:
    with pytest.raises(UsageError, match="too large"):
        measure("qcow2", {"cluster_size": "512"}, size=1 << 60)
