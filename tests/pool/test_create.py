"""diskimg.pool.create: raw allocation, the qcow2 options of a ``<volume>``, its refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diskimg.errors import PoolError
from diskimg.pool.create import create_raw, def_args, qcow2_options
from diskimg.pool.xml import BackingStore, Encryption, Permissions, VolumeDef


@pytest.mark.parametrize(("capacity", "allocation"), [(0, 0), (3 << 20, 0),
                                                      (3 << 20, 1 << 20), (3 << 20, 9 << 20)])
def test_create_raw_sizes_and_allocates(tmp_path: Path, capacity: int, allocation: int) -> None:
    f = tmp_path / "v.raw"
    f.touch()
    create_raw(str(f), capacity, allocation)
    st = f.stat()
    assert st.st_size == capacity
    assert f.read_bytes() == bytes(capacity)
    assert st.st_blocks * 512 >= min(allocation, capacity)
    if allocation == 0:
        assert st.st_blocks == 0


@pytest.mark.parametrize(("compat", "features", "cluster", "want"), [
    (None, None, None, {"compat": "0.10"}),
    (None, [], None, {"compat": "1.1"}),  # <features/> present: libvirt's 1.1
    (None, ["lazy_refcounts"], 8192, {"compat": "1.1", "lazy_refcounts": "on",
                                      "cluster_size": 8192}),
    ("0.10", None, 65536, {"compat": "0.10", "cluster_size": 65536}),
    ("1.1", None, None, {"compat": "1.1"}),
])
def test_qcow2_options_follow_libvirt(compat: str | None, features: list[str] | None,
                                      cluster: int | None, want: dict[str, object]) -> None:
    vd = VolumeDef(name="v", format="qcow2", capacity=1, compat=compat, features=features,
                   cluster_size=cluster)
    assert qcow2_options(vd) == want
    fmt, kw = def_args(vd, None)
    assert (fmt, kw["options"]) == ("qcow2", want)


def test_def_args_carries_the_definition() -> None:
    perms = Permissions(0o640)
    vd = VolumeDef(name="v", format="qcow2", capacity=5, allocation=2, permissions=perms,
                   encryption=Encryption("luks", "0b5a6c6f-0000-4000-8000-000000000001"),
                   backing=BackingStore("/p/base.raw", "raw"))
    fmt, kw = def_args(vd, {"0b5a6c6f-0000-4000-8000-000000000001": b"pw"})
    assert fmt == "qcow2"
    assert kw == {"allocation": 2, "permissions": perms, "options": {"compat": "0.10"},
                  "encryption": "luks", "secret": b"pw", "backing": "/p/base.raw",
                  "backing_format": "raw"}
    assert def_args(VolumeDef(name="v", capacity=1), None) == (
        "raw", {"allocation": None, "permissions": None, "options": {}})


@pytest.mark.parametrize(("vd", "match"), [
    (VolumeDef(name="v", format="qcow2"), "missing capacity element"),
    (VolumeDef(name="v", format="raw", capacity=1, compat="1.1"), "need format qcow2"),
    (VolumeDef(name="v", format="vmdk", capacity=1, features=[]), "need format qcow2"),
    (VolumeDef(name="v", format="qcow2", capacity=1, encryption=Encryption("luks")),
     "missing encryption secret uuid"),
    (VolumeDef(name="v", format="qcow2", capacity=1,
               encryption=Encryption("luks", "0b5a6c6f-0000-4000-8000-000000000002")),
     "Secret not found.*0b5a6c6f-0000-4000-8000-000000000002"),
])
def test_def_args_refusals(vd: VolumeDef, match: str) -> None:
    with pytest.raises(PoolError, match=match):
        def_args(vd, {})


def test_a_refused_definition_creates_nothing(tmp_path: Path) -> None:
    """Through the pool: the refusal comes before the name is reserved."""
    from diskimg.pool import Pool

    pool = Pool.open_dir(tmp_path)
    with pytest.raises(PoolError, match="Secret not found"):
        pool.create_volume_xml("<volume><name>v.qcow2</name><capacity>1048576</capacity>"
                               "<target><format type='qcow2'/><encryption format='luks'>"
                               "<secret type='passphrase' "
                               "uuid='0b5a6c6f-0000-4000-8000-000000000003'/></encryption>"
                               "</target></volume>")
    assert os.listdir(tmp_path) == []
