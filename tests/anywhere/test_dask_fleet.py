"""examples/dask_fleet.py on a LocalCluster of two worker processes against the moto S3
server: one task per image (URL and storage options in, a dict out), and every row of
the table equals ``qemu-img info``/``check`` of the local copy; every conversion the
workers streamed into the bucket (no temporary file) passes ``qemu-img check``, holds the
same guest bytes as the local image (``qemu-img compare``) and hashes as the row says."""

from __future__ import annotations

import csv
import hashlib
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytest.importorskip("dask.distributed")

from anywhere.s3_server import S3, s3_server  # noqa: E402

pytestmark = pytest.mark.qemu
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def dask_fleet() -> Iterator[Any]:
    """The example as a module the worker processes import too (spawned workers get
    this process's sys.path)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import dask_fleet

        yield dask_fleet
    finally:
        sys.path.remove(str(EXAMPLES))


def _leak_one_cluster(path: Path) -> None:
    """A refcount of 1 on a cluster past the end that no table references (one leak)."""
    with open(path, "r+b") as f:
        f.seek(48)
        (reftable,) = struct.unpack(">Q", f.read(8))   # header: refcount_table_offset
        f.seek(reftable)
        (refblock,) = struct.unpack(">Q", f.read(8))
        leaked = -(-f.seek(0, os.SEEK_END) // 65536)
        f.seek(leaked * 65536)
        f.write(bytes(65536))
        f.seek(refblock + 2 * leaked)                    # 16-bit refcounts
        f.write(struct.pack(">H", 1))


def _images(root: Path) -> dict[str, Path]:
    clean = root / "clean.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", clean, "3M")
    QEMU.io(clean, "write -P 0x11 0 64k", "write -P 0x22 1M 100k",
            "write -P 0x33 3071k 1k")
    # leaky.qcow2: compressed clusters and one leaked cluster
    out = {"clean.qcow2": clean}
    for name, args in (("stream.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
                       ("disk.raw", ["-O", "raw"]),
                       ("leaky.qcow2", ["-c", "-O", "qcow2"])):
        QEMU.img("convert", *args, clean, root / name)
        out[name] = root / name
    _leak_one_cluster(out["leaky.qcow2"])
    return out


def test_fleet_table_equals_qemu(s3: S3, dask_fleet: Any, tmp_path: Path) -> None:
    from dask.distributed import Client, LocalCluster

    local = _images(tmp_path)
    fs = s3.fs()
    for name, p in local.items():
        fs.put_file(str(p), s3.url(f"fleet/in/{name}"))
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        rows = dask_fleet.fleet(client, s3.url("fleet/in/"), s3.storage_options,
                                s3.url("fleet/out/"))
        assert len({w["host"] + str(w["id"]) for w in
                    client.scheduler_info()["workers"].values()}) == 2
    by_name = {r["url"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == sorted(local)
    for name, path in local.items():
        row = by_name[name]
        assert row["error"] is None, row
        info = QEMU.info(path)
        assert (row["format"], row["virtual_size"], row["cluster_size"]) == \
            (info["format"], info["virtual-size"], info.get("cluster-size")), name
        if info["format"] == "raw":
            assert row["corruptions"] is None and row["leaks"] is None
        else:
            chk = QEMU.check(path)
            assert (row["check_errors"], row["corruptions"], row["leaks"],
                    row["image_end_offset"]) == \
                (chk.get("check-errors", 0), chk.get("corruptions", 0),
                 chk.get("leaks", 0), chk.get("image-end-offset")), name
        got = tmp_path / f"out-{name}.qcow2"
        fs.get_file(row["converted"], str(got))
        # the hash the worker took of the stream it uploaded is the stored object's
        assert hashlib.sha256(got.read_bytes()).hexdigest() == row["converted_sha256"]
        QEMU.check_clean(got)
        assert QEMU.compare(got, path) == 0            # every guest byte, by qemu
    assert by_name["leaky.qcow2"]["leaks"] == 1
    table = tmp_path / "fleet.csv"
    dask_fleet.write_csv(rows, str(table))
    with open(table, newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [r["url"] for r in back] == [r["url"] for r in rows]
    assert [r["converted_sha256"] for r in back] == [r["converted_sha256"] for r in rows]
