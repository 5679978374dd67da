"""A refused qcow2 compressed write changes no byte, even with lazy refcounts: the dirty
bit (incompatible feature bit 0, header offset 72) is only set once something is written.
(Refused snapshot operations: tests/formats/test_qcow2_metadata_safety.py.)"""

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
