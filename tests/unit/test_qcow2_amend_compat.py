"""qcow2.amend_compat: what a v2 header cannot express is refused, a downgrade expands
zero clusters (guest bytes unchanged, with and without a backing file), an upgrade
restores a v3 header, and the lazy-refcounts bit is set only on v3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import UsageError
from diskimg.hostio import open_host_file
from diskimg.qcow2 import entries as E
from diskimg.qcow2.amend import read_header
from diskimg.qcow2.amend_compat import (
    check_downgradable,
    downgrade_to_v2,
    expand_zero_clusters,
    set_lazy_refcounts,
    upgrade_to_v3,
)
from diskimg.qcow2.cache import be_u64_array
from diskimg.qcow2.create import plan_header
from diskimg.qcow2.layout import (
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    V2_HEADER_LENGTH,
    Header,
)
from tests.unit.qcow2_amend_testlib import assert_clean, guest_sha256

MiB = 1 << 20


def _h(**opts: str) -> Header:
    return plan_header(MiB, dict(opts))[0]


@pytest.mark.parametrize("opts,message", [
    ({"refcount_bits": "8"}, "compat=0.10 requires refcount_bits=16"),
    ({"data_file": "d.raw"}, "Cannot downgrade an image with a data file"),
    ({"extended_l2": "on"}, "Cannot downgrade an image with incompatible features 0x10 set"),
    ({"compression_type": "zstd"},
     "Cannot downgrade an image with incompatible features 0x8 set"),
])
def test_check_downgradable_refusals(opts: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        check_downgradable(_h(**opts))
    assert str(exc.value) == message


def test_check_downgradable_accepts() -> None:
    check_downgradable(_h())
    check_downgradable(_h(lazy_refcounts="on"))  # a compatible bit: dropped by the downgrade



def _types(p: Path) -> list[E.ClusterType]:
    """Every active L2 entry's type, through the codecs."""
    host = open_host_file(p, False)
    try:
        h = read_header(host)
        l1 = be_u64_array(host.pread(h.l1_table_offset, h.l1_size * 8))
        out = []
        for ent in l1:
            l2 = ent & E.L1E_OFFSET_MASK
            if l2:
                out += [E.cluster_type(e, extended=False, has_data_file=False)
                        for e in be_u64_array(host.pread(l2, h.cluster_size))]
        return out
    finally:
        host.close()



def _amend_host(p: Path, fn: Callable[..., None], *args: object) -> Header:
    host = open_host_file(p, True)
    try:
        h = read_header(host)
        fn(host, h, *args)
        return read_header(host)
    finally:
        host.close()


def test_downgrade_then_upgrade(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 2 * MiB, options={"lazy_refcounts": "on"})
    with diskimg.open(p, "r+") as d:
        d.write(0, b"\x11" * 65536)
        d.write(MiB, b"\x22" * 65536)
        d.write_zeroes(MiB, 65536)  # zero-allocated: keeps its cluster
        d.write_zeroes(65536, 65536)  # zero flag without a cluster
    guest = guest_sha256(p)
    T = E.ClusterType
    assert _types(p)[:2] + _types(p)[16:17] == [T.NORMAL, T.ZERO_PLAIN, T.ZERO_ALLOC]
    h = _amend_host(p, downgrade_to_v2)
    assert (h.version, h.header_length, h.compatible_features) == (2, V2_HEADER_LENGTH, 0)
    assert h.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE) is None
    types = _types(p)
    assert T.ZERO_ALLOC not in types and T.ZERO_PLAIN not in types
    # no backing file: the plain zero cluster became unallocated, the allocated one kept
    # its cluster (now written with zeros)
    assert types[:2] + types[16:17] == [T.NORMAL, T.UNALLOCATED, T.NORMAL]
    assert guest_sha256(p) == guest
    assert_clean(p)
    h = _amend_host(p, upgrade_to_v3)
    assert (h.version, h.refcount_order) == (3, 4)
    assert h.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE) is not None
    assert guest_sha256(p) == guest
    assert_clean(p)


def test_expand_zero_clusters_over_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    diskimg.create(base, "qcow2", MiB)
    with diskimg.open(base, "r+") as d:
        d.write(0, b"\x55" * MiB)
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", MiB, backing_file=str(base), backing_fmt="qcow2")
    with diskimg.open(top, "r+") as d:
        d.write_zeroes(0, 131072)
    guest = guest_sha256(top)
    _amend_host(top, expand_zero_clusters)
    # the zero clusters became clusters of zeros: still reads zeros over the backing data
    assert _types(top)[:2] == [E.ClusterType.NORMAL] * 2
    with diskimg.open(top) as d:
        assert d.read(0, 131072) == bytes(131072)
        assert d.read(131072, 4096) == b"\x55" * 4096
    assert guest_sha256(top) == guest
    assert_clean(top)


def test_set_lazy_refcounts(tmp_path: Path) -> None:
    p = tmp_path / "l.qcow2"
    diskimg.create(p, "qcow2", MiB)
    h = _amend_host(p, set_lazy_refcounts, True)
    assert h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS
    h = _amend_host(p, set_lazy_refcounts, False)
    assert not h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS
    v2 = tmp_path / "v2.qcow2"
    diskimg.create(v2, "qcow2", MiB, options={"compat": "0.10"})
    raw = v2.read_bytes()
    _amend_host(v2, set_lazy_refcounts, False)  # nothing to clear in a v2 header
    with pytest.raises(UsageError, match="Lazy refcounts only supported"):
        _amend_host(v2, set_lazy_refcounts, True)
    assert v2.read_bytes() == raw
