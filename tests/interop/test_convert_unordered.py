"""``convert -W`` (out-of-order writes), measured against qemu-img 7.2
(docs/compatibility.md, "Differences chosen on purpose").

qemu-img's coroutines finish their writes in any order, so with ``-W`` the host clusters
the data lands in vary from run to run: ``map`` reports other host offsets (and so splits
its extents elsewhere) and ``check`` another fragmentation.  Everything else a user sees
is the same as without ``-W``: the guest content, ``check``'s counts, ``map``'s
present/zero/data flags for every byte.  diskimg writes in guest order either way, so its
``-W`` output is its (deterministic) output without ``-W``."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

from diskimg.cli.main import main

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def flags(path: Path) -> list[tuple[int, int, bool, bool, bool]]:
    """``map --output=json`` without host offsets: runs of equal flags, merged."""
    out: list[tuple[int, int, bool, bool, bool]] = []
    for e in QEMU.map(path):
        k = (e["present"], e["zero"], e["data"])
        if out and out[-1][2:] == k and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *k)
        else:
            out.append((e["start"], e["length"], *k))
    return out


def counts(path: Path) -> dict[str, Any]:
    rep = QEMU.check(path)
    return {k: v for k, v in rep.items() if k not in ("filename", "fragmented-clusters")}


def test_unordered_writes_change_only_host_placement(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(12 * MiB)
        for i in range(12):
            k = rnd.random()
            f.seek(i * MiB)
            if k < 0.5:
                f.write(rnd.randbytes(MiB))
            elif k < 0.7:
                f.write(bytes(MiB))
            elif k < 0.8:
                f.write(b"\x01" * (300 << 10))
    q, d, dw = tmp_path / "q.qcow2", tmp_path / "d.qcow2", tmp_path / "dw.qcow2"
    QEMU.img("convert", "-W", "-m", "8", "-O", "qcow2", src, q)
    assert main(["convert", "-O", "qcow2", str(src), str(d)]) == 0
    assert main(["convert", "-W", "-m", "8", "-O", "qcow2", str(src), str(dw)]) == 0
    assert hashlib.sha256(dw.read_bytes()).digest() == hashlib.sha256(d.read_bytes()).digest()
    assert QEMU.compare(src, dw, "-f", "raw", "-F", "qcow2") == 0
    assert QEMU.compare(src, q, "-f", "raw", "-F", "qcow2") == 0
    assert counts(dw) == counts(q)
    assert flags(dw) == flags(q)
    assert QEMU.check(dw).get("fragmented-clusters", 0) == 0  # diskimg: in guest order
