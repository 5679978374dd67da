"""diskimg.qcow2.mapper: the typed read plan of a qcow2 layer (``BlockDevice.plan``).

Images are made by qemu-img/qemu-io with every kind of L2 entry (data, zero without and
with a host cluster, unallocated over a backing file, compressed, extended-L2
subclusters, a raw external data file).  Each plan is checked with
:func:`diskimg.plan.check_plan`, then executed run by run *without* the image's reader
(DATA bytes read straight from the host file the run names, ZERO as zeros, UNALLOCATED
from the backing file, COMPRESSED through ``read_compressed``) and compared with
``qemu-img convert -O raw``'s bytes, from offset 0 and from unaligned offsets.  The block
status of each run is checked against the invariant device.py states.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.device import BlockDevice
from diskimg.plan import Run, RunKind, check_plan

pytestmark = pytest.mark.qemu

KiB = 1024
D, Z, U, C = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED
SIZE = 512 * KiB


def _plan(dev: BlockDevice, start: int, end: int) -> list[Run]:
    runs = []
    pos = start
    while pos < end:
        r = dev.plan(pos, end - pos)
        assert r.offset == pos and r.length > 0, r
        runs.append(r)
        pos = r.end
    check_plan(runs, start, end, dev.size)
    return runs


def _execute(dev: BlockDevice, runs: list[Run], own: Path, backing: bytes | None) -> bytes:
    """The bytes of ``runs``, each read by its kind from where the run says they are."""
    out = bytearray()
    for r in runs:
        if r.kind is D:
            assert r.host is not None
            path = r.filename or str(own)
            with open(path, "rb") as f:
                got = os.pread(f.fileno(), r.length, r.host)
            out += got + bytes(r.length - len(got))  # past the end of the file: zeros
        elif r.kind is Z:
            out += bytes(r.length)
        elif r.kind is U:
            src = backing or b""
            piece = src[r.offset : r.end]
            out += piece + bytes(r.length - len(piece))
        else:
            buf = bytearray(r.length)
            dev.read_compressed(r, memoryview(buf))
            out += buf
    return bytes(out)


def _raw(path: Path, qemu_img: str, run: Callable[..., Any]) -> bytes:
    out = path.with_suffix(".ref.raw")
    run([qemu_img, "convert", "-O", "raw", path, out])
    return out.read_bytes()


def _check_status(dev: BlockDevice, runs: list[Run]) -> None:
    """device.py's invariant: a layer's Status is derived from its Run."""
    for r in runs:
        st, depth = dev.block_status(r.offset, r.length, top_only=True)
        assert depth == 0 and 0 < st.length <= r.length
        assert st.allocated == r.allocated
        assert st.data == (r.kind in (D, C))
        if r.kind is Z:
            assert st.zero and st.offset == r.host
        if r.kind is C:
            assert st.offset is None
        if r.kind is D:
            assert st.offset == r.host


def _check(img: Path, qemu_img: str, run: Callable[..., Any], kinds: set[RunKind],
           backing: bytes | None = None) -> list[Run]:
    ref = _raw(img, qemu_img, run)
    with diskimg.open(img) as dev:
        runs = _plan(dev, 0, dev.size)
        assert {r.kind for r in runs} == kinds
        assert _execute(dev, runs, img, backing) == ref
        _check_status(dev, runs)
        # from unaligned offsets, short ranges: every run starts where it was asked to
        for off in range(0, dev.size - 1, 7 * KiB + 13):
            sub = _plan(dev, off, min(dev.size, off + 9 * KiB))
            assert _execute(dev, sub, img, backing) == ref[off : sub[-1].end]
        assert dev.read(0, dev.size) == ref  # and the image's own reader agrees
    return runs


def _io(run: Callable[..., Any], qemu_io: str, img: Path, *cmds: str,
        fmt: str = "qcow2") -> None:
    args: list[str | Path] = [qemu_io, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run([*args, img])


def test_every_standard_cluster_kind_over_a_backing_file(
        tmp_path: Path, qemu_img: str, qemu_io: str, run: Callable[..., Any]) -> None:
    base = tmp_path / "base.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, SIZE])
    _io(run, qemu_io, base, f"write -P 0x5a 0 {SIZE}")
    img = tmp_path / "top.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
         "-b", base, "-F", "qcow2", img])
    _io(run, qemu_io, img,
        "write -P 0x11 0 12k",            # three host-contiguous data clusters
        "write -P 0x12 20k 6000",         # a partial cluster (COW from the backing file)
        "write -P 0x13 64k 8k", "write -z 64k 8k",   # zero clusters keeping their offset
        "write -z -u 96k 8k",             # zero clusters without one
        "write -c -P 0x14 128k 4k", "write -c -P 0x15 132k 4k",  # compressed
        "write -P 0x16 200k 4k", "write -P 0x17 300k 4k", "write -P 0x18 204k 4k")
    backing = _raw(base, qemu_img, run)
    runs = _check(img, qemu_img, run, {D, Z, U, C}, backing)
    by_off = {r.offset: r for r in runs}
    assert by_off[0].kind is D and by_off[0].length == 12 * KiB  # merged, one progression
    assert by_off[64 * KiB].kind is Z and by_off[64 * KiB].host is not None
    assert by_off[96 * KiB].kind is Z and by_off[96 * KiB].host is None
    assert by_off[128 * KiB].kind is C and by_off[128 * KiB].length == 4 * KiB
    assert by_off[128 * KiB].entry and by_off[128 * KiB].host is None
    assert all(r.filename is None for r in runs)  # no data file: the image's own file


def test_extended_l2_subclusters(tmp_path: Path, qemu_img: str, qemu_io: str,
                                 run: Callable[..., Any]) -> None:
    img = tmp_path / "ext.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
         "extended_l2=on,cluster_size=64k", img, SIZE])
    _io(run, qemu_io, img,
        "write -P 0x21 0 2k",             # one subcluster: the rest unallocated-with-host
        "write -P 0x22 6k 4k",            # subclusters 3 and 4 of the same cluster
        "write -z 64k 4k",                # zero subclusters of an unallocated cluster
        "write -P 0x23 130k 2k", "write -z 130k 2k",  # zero subcluster with a host cluster
        "write -c -P 0x24 256k 64k")
    runs = _check(img, qemu_img, run, {D, Z, U, C})
    unalloc_with_host = [r for r in runs if r.kind is U and r.host is not None]
    assert unalloc_with_host and all(r.offset < 192 * KiB for r in unalloc_with_host)
    assert [(r.offset, r.length) for r in runs if r.kind is D][:2] == [(0, 2 * KiB),
                                                                       (6 * KiB, 4 * KiB)]


def test_raw_external_data_file(tmp_path: Path, qemu_img: str, qemu_io: str,
                                run: Callable[..., Any]) -> None:
    img = tmp_path / "df.qcow2"
    data = tmp_path / "df.data"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
         f"data_file={data},data_file_raw=on,cluster_size=4096", img, SIZE])
    _io(run, qemu_io, img, "write -P 0x31 4k 12k", "write -P 0x32 100k 4k",
        "write -z 100k 4k")
    runs = _check(img, qemu_img, run, {D, Z})  # data_file_raw: every cluster mapped
    dat = [r for r in runs if r.kind is D]
    assert dat and all(r.filename == str(data) and r.host == r.offset for r in dat)
