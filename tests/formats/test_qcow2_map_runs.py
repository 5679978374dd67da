"""The whole-table run finder (:func:`diskimg.qcow2.mapper.runs`, what ``map`` asks for a
table at a time) against the per-run :func:`~diskimg.qcow2.mapper.lookup` it replaces on
that path and against ``qemu-img map --output=json``, byte for byte.

Images are made by qemu-img/qemu-io with many extents of every kind (data runs that are
and are not host contiguous, zero clusters with and without a host cluster, unallocated
ranges over a backing file, compressed clusters) over several L2 tables, a last partial
cluster, then patched the ways an L2 table may be odd but readable (COPIED cleared in the
middle of a host-contiguous run: the raw entries differ, the run goes on; a reserved bit
set: the table is left to :func:`lookup`).
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import DiskImgError
from diskimg.plan import Run
from diskimg.qcow2 import mapper
from diskimg.qcow2.image import Qcow2Image
from tests.qemukit import Qemu

pytestmark = pytest.mark.qemu

KiB = 1024
CS = 4 * KiB                      # 512 entries per L2 table: 2 MiB of guest per table
SIZE = 5 * (1 << 20) + 1536       # five L2 tables' worth, a last partial cluster

#: (qemu-io command) a deterministic mix: every kind, runs crossing L2 tables
_WRITES = [
    "write -P 0x11 0 40k",
    "write -z 40k 8k",             # zero, no host cluster (never allocated)
    "write -P 0x22 64k 12k",
    "write -c -P 0x33 96k 8k",     # two compressed clusters
    "write -P 0x44 1920k 256k",    # across the first L2 table boundary
    "write -P 0x55 3m 4k",
    "write -P 0x56 3076k 4k",
    "write -P 0x57 3088k 4k",
    "write -P 0x66 4m 1m",         # up to the partial last cluster
    "write -P 0x77 5m 1536",
]
#: later changes: zero with a host cluster, discarded, rewritten out of host order
_AFTER = [
    "write -z 4100k 8k",           # (keeps its host clusters: ZERO_ALLOC)
    "discard 4200k 16k",
    "write -P 0x88 1932k 4k",
]


def _image(tmp: Path, qemu: Qemu, backing: bool) -> Path:
    img = tmp / ("top.qcow2" if backing else "img.qcow2")
    opts = ["-o", f"cluster_size={CS}"]
    if backing:
        base = tmp / "base.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", *opts, base, SIZE)
        qemu.io(base, "write -P 0x5a 0 2m", "write -P 0x5b 4m 64k")
        qemu.img("create", "-q", "-f", "qcow2", *opts, "-b", base, "-F", "qcow2", img)
    else:
        qemu.img("create", "-q", "-f", "qcow2", *opts, img, SIZE)
    qemu.io(img, *_WRITES)
    qemu.io(img, *_AFTER)
    return img


def _lookups(dev: Qcow2Image, start: int, end: int) -> list[Run]:
    """Successive lookups from ``start`` to the end of its L2 table (or ``end``)."""
    span = dev.l2_entries * dev.cs
    stop = min(end, (start // span + 1) * span)
    out = []
    pos = start
    while pos < stop:
        r = mapper.lookup(dev, pos, end - pos)
        out.append(r)
        pos = r.end
    return out


def _all_runs(dev: Qcow2Image, start: int, end: int) -> list[Run]:
    out: list[Run] = []
    pos = start
    while pos < end:
        batch = mapper.runs(dev, pos, end - pos)
        assert batch and batch[0].offset == pos
        out += batch
        pos = batch[-1].end
    return out


def _assert_runs_as_lookups(path: Path, whole: bool = True) -> int:
    """runs() from many offsets equals successive lookups: all of them up to the end of
    the L2 table (``whole``), or (a table left to lookup) a first part of them."""
    with diskimg.open(path) as dev:
        assert isinstance(dev, Qcow2Image)
        n = 0
        # from 0, from unaligned offsets, and short ranges ending inside a run
        for start, end in [(0, dev.size), (1000, dev.size), (CS + 7, 3 * (1 << 20) + 5),
                           (1920 * KiB + 100, 1940 * KiB - 3), (dev.size - 700, dev.size)]:
            pos = start
            while pos < end:
                got = mapper.runs(dev, pos, end - pos)
                want = _lookups(dev, pos, end)
                assert got == (want if whole else want[: len(got)]), (start, end, pos)
                n += len(got)
                pos = got[-1].end
        return n


def _map_json(path: Path, *extra: str) -> str:
    return subprocess.run([sys.executable, "-m", "diskimg", "map", "--output=json",
                           "-f", "qcow2", *extra, str(path)], check=True,
                          capture_output=True, text=True).stdout


def _qemu_map_json(qemu: Qemu, path: Path, *extra: str) -> str:
    return str(qemu.img("map", "--output=json", "-f", "qcow2", *extra, path).stdout)


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
def test_map_json_and_runs_match_qemu_and_lookup(tmp_path: Path, qemu: Qemu,
                                                 backing: bool) -> None:
    img = _image(tmp_path, qemu, backing)
    assert _assert_runs_as_lookups(img) > 40
    kinds = {(e["present"], e["zero"], e["data"], "offset" in e) for e in qemu.map(img)}
    assert (True, False, True, True) in kinds and (True, True, False, True) in kinds
    assert (True, False, True, False) in kinds  # compressed
    assert (False, not backing, False, False) in kinds or backing
    for extra in [(), ("--start-offset=4097", "--max-length=3000001"),
                  (f"--start-offset={SIZE - 700}",)]:
        assert _map_json(img, *extra) == _qemu_map_json(qemu, img, *extra), extra
    with diskimg.open(img) as dev:  # the API's map (merged entries) agrees too
        got = [e.to_json() for e in dev.map()]
    assert got == qemu.map(img)


def _patch_entry(path: Path, guest: int, change: int, mode: str) -> None:
    """Set (``mode`` "or") or clear ("andnot") bits of the L2 entry of ``guest``."""
    with diskimg.open(path) as dev:
        assert isinstance(dev, Qcow2Image)
        _, l2_off = mapper.l2_location(dev, guest // dev.cs)
        where = l2_off + 8 * ((guest // dev.cs) % dev.l2_entries)
    with open(path, "r+b") as f:
        f.seek(where)
        (ent,) = struct.unpack(">Q", f.read(8))
        ent = ent | change if mode == "or" else ent & ~change
        f.seek(where)
        f.write(struct.pack(">Q", ent))


def test_copied_cleared_mid_run_goes_on(tmp_path: Path, qemu: Qemu) -> None:
    """COPIED differing between neighbours (cleared in a host-contiguous data run, set on
    one of two zero clusters) breaks the raw entries, not the run (lookup's rule): the
    run and qemu-img's extent go on over it."""
    img = _image(tmp_path, qemu, False)
    _patch_entry(img, 4 * (1 << 20) + 20 * CS, 1 << 63, "andnot")
    _patch_entry(img, 8 * KiB, 1 << 63, "andnot")
    _patch_entry(img, 44 * KiB, 1 << 63, "or")  # a zero cluster's entry: 1 then COPIED | 1
    assert _assert_runs_as_lookups(img) > 40
    assert _map_json(img) == _qemu_map_json(qemu, img)


def test_reserved_bit_leaves_the_table_to_lookup(tmp_path: Path, qemu: Qemu) -> None:
    """An entry with a bit of 56-61 set (hostile): that table's host-contiguous runs
    come from lookup, one at a time, and are the same."""
    img = _image(tmp_path, qemu, False)
    _patch_entry(img, 4 * (1 << 20) + 3 * CS, 1 << 57, "or")
    with diskimg.open(img) as dev:
        assert isinstance(dev, Qcow2Image)
        ents = dev.l2_cache.get(mapper.l2_location(dev, (4 << 20) // CS)[1]).entries
        assert mapper.TableBreaks(ents, CS).stepped() is None
    _assert_runs_as_lookups(img)


def _mutate(path: Path, rng: random.Random, cs: int) -> None:
    """A few L2 entries changed the ways a hostile or damaged table may differ: COPIED
    flipped, zero flags, a reserved or flag bit, a low (reserved/unaligned) bit, an
    entry continuing its predecessor, random words."""
    with diskimg.open(path) as dev:
        assert isinstance(dev, Qcow2Image)
        tables = [dev.l1[i] & 0x00FFFFFFFFFFFE00 for i in range(len(dev.l1)) if dev.l1[i]]
        n = dev.l2_entries
    with open(path, "r+b") as f:
        for _ in range(rng.randint(1, 12)):
            slot = rng.choice(tables) + 8 * rng.randrange(n)
            f.seek(slot)
            (e,) = struct.unpack(">Q", f.read(8))
            op = rng.randrange(8)
            if op == 0:
                e ^= 1 << 63
            elif op == 1:
                e = 1 | rng.choice([0, 1]) << 63
            elif op == 2:
                e = 0
            elif op == 3:
                e ^= 1 << rng.randrange(56, 63)
            elif op == 4:
                e = 1 << 63 | rng.randrange(1, 400) * cs
            elif op == 5:
                e ^= 1 << rng.randrange(0, 9)
            elif op == 6 and slot % (8 * n):
                f.seek(slot - 8)
                e = (struct.unpack(">Q", f.read(8))[0] + cs) & ((1 << 64) - 1)
            else:
                e = rng.getrandbits(64)
            f.seek(slot)
            f.write(struct.pack(">Q", e))


def test_runs_are_lookups_on_damaged_tables(tmp_path: Path, qemu: Qemu) -> None:
    """Randomly damaged L2 tables (a fixed seed, 60 images): from every offset tried,
    runs() gives the runs successive lookups give, and raises where one of them raises
    (the same error class), never past it."""
    base = _image(tmp_path, qemu, False)
    rng = random.Random(20261207)
    img = tmp_path / "m.qcow2"
    for _ in range(60):
        shutil.copy(base, img)
        _mutate(img, rng, CS)
        with diskimg.open(img) as dev:
            assert isinstance(dev, Qcow2Image)
            span = dev.l2_entries * dev.cs
            for start in (0, 1000, span - 5000, span + 3, (4 << 20) + 17, dev.size - 700):
                pos = start
                while pos < dev.size:
                    want: list[Run] = []
                    werr = None
                    try:
                        want = _lookups(dev, pos, dev.size)
                    except DiskImgError as e:
                        werr = type(e)
                    if werr is not None:
                        with pytest.raises(werr):
                            mapper.runs(dev, pos, dev.size - pos)
                        break
                    got = mapper.runs(dev, pos, dev.size - pos)
                    assert got == want, (pos, start)
                    pos = got[-1].end
