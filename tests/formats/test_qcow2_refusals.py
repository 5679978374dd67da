"""A refused qcow2 operation changes no byte, even with lazy refcounts: the dirty bit
(incompatible feature bit 0, header offset 72) is only set once something is written."""

from __future__ import annotations

from pathlib import Path

import pytest

import diskimg

SECRETS = {"sec0": b"refusal"}


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _refused(tmp_path: Path, img: diskimg.BlockDevice, fn: object) -> None:
    before = _bytes(tmp_path)
    with pytest.raises(diskimg.DiskImgError):
        fn()  # type: ignore[operator]
    img.flush()
    assert _bytes(tmp_path) == before
    img.close()
    assert _bytes(tmp_path) == before


@pytest.mark.parametrize("kind", ["luks", "data_file"])
def test_refused_compressed_write_leaves_lazy_image_clean(tmp_path: Path, kind: str) -> None:
    opts: dict[str, object] = {"cluster_size": 512, "lazy_refcounts": True}
    kw: dict[str, object] = {}
    if kind == "luks":
        opts.update({"encrypt.format": "luks", "encrypt.key-secret": "sec0",
                     "encrypt.iter-time": 1})
        kw = {"secrets": SECRETS, "options": {"encrypt.key-secret": "sec0"}}
    else:
        opts["data_file"] = "d.raw"
    diskimg.create(tmp_path / "a.qcow2", "qcow2", 4096, options=opts, secrets=SECRETS)
    img = diskimg.open(tmp_path / "a.qcow2", "r+", **kw)  # type: ignore[arg-type]
    _refused(tmp_path, img, lambda: img.write_compressed(0, b"x" * 512))  # type: ignore[attr-defined]


def test_refused_snapshot_with_data_file_leaves_lazy_image_clean(tmp_path: Path) -> None:
    diskimg.create(tmp_path / "a.qcow2", "qcow2", 4096,
                   options={"lazy_refcounts": True, "data_file": "d.raw"})
    img = diskimg.open(tmp_path / "a.qcow2", "r+")
    _refused(tmp_path, img, lambda: img.snapshots.create("s"))  # type: ignore[attr-defined]


def test_refused_snapshot_at_refcount_maximum_leaves_lazy_image_clean(tmp_path: Path) -> None:
    """refcount_bits=1: a written cluster's refcount is already at the maximum (1), so a
    snapshot, which would make it 2, is refused before anything is written."""
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 4096, options={"lazy_refcounts": True,
                                                   "refcount_bits": 1})
    with diskimg.open(path, "r+") as img:
        img.write(0, b"\x5a" * 4096)
    data = path.read_bytes()
    img = diskimg.open(path, "r+")
    _refused(tmp_path, img, lambda: img.snapshots.create("s"))  # type: ignore[attr-defined]
    assert path.read_bytes() == data
    with diskimg.open(path) as img:
        assert img.read(0, 4096) == b"\x5a" * 4096
