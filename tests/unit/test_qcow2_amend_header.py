"""qcow2.amend_header: whole-header rewrites (no stale bytes left in cluster 0), the
backing-name change and its refusals (which leave the file byte-identical)."""

from __future__ import annotations

from pathlib import Path

import pytest

import diskimg
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.hostio import open_host_file
from diskimg.qcow2.amend_header import (
    data_file_raw_flag,
    nb_bitmaps,
    read_header,
    set_backing,
    set_feature_bits,
    write_header,
)
from diskimg.qcow2.create import plan_header
from diskimg.qcow2.layout import Header

MiB = 1 << 20


def _image(tmp_path: Path, **opts: str) -> Path:
    p = tmp_path / "h.qcow2"
    diskimg.create(p, "qcow2", MiB, options=opts or None)
    return p


def test_read_and_write_header(tmp_path: Path) -> None:
    p = _image(tmp_path)
    raw = p.read_bytes()
    host = open_host_file(p, True)
    try:
        h = read_header(host)
        assert h.pack() == Header.parse(raw[:h.cluster_size]).pack()
        end = len(h.pack())
        host.pwrite(end + 100, b"stale")
        write_header(host, h)
    finally:
        host.close()
    assert p.read_bytes() == raw  # the rest of cluster 0 is zeroed again


def test_set_feature_bits_writes_only_the_feature_fields(tmp_path: Path) -> None:
    p = _image(tmp_path)
    raw = p.read_bytes()
    host = open_host_file(p, True)
    try:
        h = read_header(host)
        h.compatible_features, h.autoclear_features = 1, 2
        set_feature_bits(host, h)
    finally:
        host.close()
    new = p.read_bytes()
    assert new[:72] == raw[:72] and new[96:] == raw[96:]
    assert new[72:96] == raw[72:80] + (1).to_bytes(8, "big") + (2).to_bytes(8, "big")


def test_set_backing(tmp_path: Path) -> None:
    p = _image(tmp_path)
    host = open_host_file(p, True)
    try:
        set_backing(host, "base.raw", "raw")
        h = read_header(host)
        assert (h.backing_file, h.backing_format) == ("base.raw", "raw")
        set_backing(host, "other.qcow2", None)
        h = read_header(host)
        assert (h.backing_file, h.backing_format) == ("other.qcow2", None)
        set_backing(host, None, "raw")
        h = read_header(host)
        assert (h.backing_file, h.backing_format) == (None, None)
    finally:
        host.close()


@pytest.mark.parametrize("cluster_size,name,cls,message", [
    ("65536", "x" * 1024, UsageError, "Backing file name too long"),
    ("512", "y" * 1000, UnsupportedFeatureError,
     "Could not change the backing file: the header does not fit in one cluster"),
])
def test_set_backing_refusals_change_nothing(tmp_path: Path, cluster_size: str, name: str,
                                             cls: type[Exception], message: str) -> None:
    p = _image(tmp_path, cluster_size=cluster_size)
    raw = p.read_bytes()
    host = open_host_file(p, True)
    try:
        with pytest.raises(cls) as exc:
            set_backing(host, name, "raw")
    finally:
        host.close()
    assert str(exc.value) == message
    assert p.read_bytes() == raw


def test_header_queries() -> None:
    plain = plan_header(MiB, {})[0]
    assert (nb_bitmaps(plain), data_file_raw_flag(plain)) == (0, False)
    raw = plan_header(MiB, {"data_file": "d.raw", "data_file_raw": "on"})[0]
    assert data_file_raw_flag(raw)
