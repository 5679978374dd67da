"""diskimg.pool.wipe: the passes, what each leaves on disk, and refusals before any write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from diskimg.errors import PoolError
from diskimg.hostio import open_host_file
from diskimg.pool import PoolRegistry, wipe
from diskimg.pool.create import CHUNK
from diskimg.pool.probe import probe_volume
from diskimg.pool.xml import Encryption, VolumeDef
from tests.conftest import RunFn


@pytest.mark.parametrize("pattern", [b"\x00", b"\xff", bytes.fromhex("924924"),
                                     bytes.fromhex("6db6db")])
def test_a_pattern_pass_repeats_from_offset_zero_across_chunks(tmp_path: Path,
                                                               pattern: bytes) -> None:
    """Every byte i of the file is pattern[i % len(pattern)], also across the 1 MiB
    chunk boundary (CHUNK is not a multiple of 3) and in a short last chunk.  A 3-byte
    pattern over more than 1 MiB used to loop forever (a write of CHUNK bytes from a
    shorter buffer: pwrite of nothing, forever)."""
    f = tmp_path / "v"
    size = CHUNK + 5
    f.write_bytes(os.urandom(size))
    fd = os.open(f, os.O_RDWR)
    try:
        wipe.overwrite(fd, size, pattern, verify=True)
    finally:
        os.close(fd)
    assert f.read_bytes() == (pattern * (size // len(pattern) + 1))[:size]


def test_random_pass_overwrites_every_byte(tmp_path: Path) -> None:
    f = tmp_path / "v"
    f.write_bytes(bytes(CHUNK + 3))
    fd = os.open(f, os.O_RDWR)
    try:
        wipe.overwrite(fd, CHUNK + 3, "random", verify=True)
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert len(data) == CHUNK + 3 and data.count(0) < len(data) // 64


@pytest.mark.parametrize("algorithm", ["zero", "trim", "dod", "bsi"])
def test_wipe_host_leaves_the_last_pass_everywhere(tmp_path: Path, algorithm: str) -> None:
    f = tmp_path / "v"
    f.write_bytes(b"secret" * 40_000)
    size = f.stat().st_size
    with open_host_file(f, True) as host:
        wipe.wipe_host(host, algorithm)
    last = {"zero": 0, "trim": 0, "dod": 0xFF, "bsi": 0x7F}[algorithm]
    assert f.read_bytes() == bytes([last]) * size


def test_zero_on_a_sparse_file_drops_the_blocks(tmp_path: Path) -> None:
    f = tmp_path / "v"
    with open(f, "wb") as w:
        w.truncate(8 << 20)
        w.seek(1 << 20)
        w.write(b"data" * 1024)
    with open_host_file(f, True) as host:
        wipe.wipe_host(host, "zero")
    assert f.stat().st_size == 8 << 20
    assert f.stat().st_blocks == 0
    assert f.read_bytes() == bytes(8 << 20)


def test_unknown_algorithm_and_unrecreatable_volumes_are_refused() -> None:
    with pytest.raises(PoolError, match="Unsupported wipe algorithm 'shred'; choose one of "
                                        "zero, nnsa"):
        wipe.check_algorithm("shred")
    assert wipe.check_recreatable(VolumeDef(name="v", format="raw"), "v") is False
    assert wipe.check_recreatable(VolumeDef(name="v", format="qcow2", capacity=1 << 20),
                                  "v") is True
    with pytest.raises(PoolError, match="its capacity is not known"):
        wipe.check_recreatable(VolumeDef(name="v", format="qcow2"), "v")
    with pytest.raises(PoolError, match="cannot re-create a 'vpc' volume"):
        wipe.check_recreatable(VolumeDef(name="v", format="vpc"), "v")
    with pytest.raises(PoolError, match="encrypted volume"):
        wipe.check_recreatable(VolumeDef(name="v", format="qcow2",
                                         encryption=Encryption("luks")), "v")


@pytest.mark.qemu
def test_recreate_keeps_format_options_and_capacity(make_image: Callable[..., Path],
                                                    qemu_img: str, run: RunFn) -> None:
    img = make_image("v.qcow2", "qcow2", "5M",
                     options={"compat": "1.1", "lazy_refcounts": "on", "cluster_size": "8192"})
    before = json.loads(run([qemu_img, "info", "--output=json", img]).stdout)
    p = probe_volume(str(img))
    assert p is not None
    d = VolumeDef(name="v", format=p.format, capacity=p.capacity, compat=p.compat,
                  cluster_size=p.cluster_size, features=p.features)
    os.truncate(img, 0)
    wipe.recreate(str(img), d, None)
    after = json.loads(run([qemu_img, "info", "--output=json", img]).stdout)
    for key in ("virtual-size", "cluster-size", "format"):
        assert after[key] == before[key]
    assert after["format-specific"]["data"]["compat"] == "1.1"
    assert after["format-specific"]["data"]["lazy-refcounts"] is True
    run([qemu_img, "check", img])


def test_gutmann_wipe_of_a_volume_over_one_mib_finishes(tmp_path: Path) -> None:
    """``virsh vol-wipe --algorithm gutmann`` on a 2 MiB volume: its 3-byte passes used to
    hang forever; now the 35 passes end, the size is kept and no byte of the old data is
    left in place."""
    pool = PoolRegistry().define("p", tmp_path / "p")
    pool.build()
    pool.start()
    vol = pool.create_volume("v.raw", 2 << 20)
    old = b"\xa5" * (2 << 20)
    Path(vol.path).write_bytes(old)
    res = subprocess.run([sys.executable, "-m", "diskimg", "virsh", "-q", "vol-wipe", "v.raw",
                          "p", "--algorithm", "gutmann"], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert (res.returncode, res.stderr) == (0, "")
    data = Path(vol.path).read_bytes()
    assert len(data) == 2 << 20
    assert sum(a == b for a, b in zip(data[::4096], old[::4096], strict=True)) < 64
