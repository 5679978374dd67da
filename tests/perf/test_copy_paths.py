"""The convert copy loop's fast paths give qemu-img's result: the zero scan of each data
chunk runs on the read-ahead thread (overlapping the writes) with the target offset of
the chunk, so concatenated sources whose boundaries are not cluster aligned are split
into holes exactly where qemu-img splits them.  Clock-free: speed is benchmarks/' job."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.ops import copier

MiB = 1 << 20
SECTOR = 512


def _sources(tmp_path: Path) -> list[Path]:
    """Raw sources whose sizes are odd sector counts, with data, written zeros and holes
    at every alignment around their ends (so each target chunk starts at another
    alignment than its source chunk)."""
    rng = random.Random(20)
    paths = []
    for i, size in enumerate((MiB + 3 * SECTOR, 3 * MiB - 5 * SECTOR, 2 * MiB + SECTOR)):
        p = tmp_path / f"s{i}.raw"
        with open(p, "wb") as f:
            f.truncate(size)
            for _ in range(24):
                at = rng.randrange(0, size - 8192) // SECTOR * SECTOR
                ln = rng.choice([SECTOR, 3 * SECTOR, 4096, 9 * SECTOR, 65536 + SECTOR])
                f.seek(at)
                f.write(rng.randbytes(ln) if rng.random() < 0.7 else bytes(ln))
            f.seek(size - SECTOR)
            f.write(b"\x01" * SECTOR)  # a data sector right at the end
        paths.append(p)
    return paths


@pytest.mark.qemu
@pytest.mark.parametrize("ofmt", ["raw", "qcow2"])
def test_concatenated_sources_same_map_and_bytes_as_qemu(tmp_path: Path, qemu: Any,
                                                         ofmt: str) -> None:
    srcs = _sources(tmp_path)
    q_out, d_out = tmp_path / f"q.{ofmt}", tmp_path / f"d.{ofmt}"
    qemu.img("convert", "-f", "raw", "-O", ofmt, *srcs, q_out)
    diskimg.convert([str(s) for s in srcs], str(d_out), ofmt, format="raw")
    want = b"".join(s.read_bytes() for s in srcs)
    assert qemu.raw_bytes(d_out, ofmt) == want
    assert qemu.map(d_out, ofmt) == qemu.map(q_out, ofmt)
    if ofmt == "qcow2":
        qemu.check_clean(d_out)


def test_zero_scan_runs_on_the_readahead_thread(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every data chunk of a pipelined copy is scanned once, on the read-ahead thread,
    and the target is the source's bytes."""
    srcs = _sources(tmp_path)
    threads: list[str] = []
    real = copier.sparse_runs

    def spy(*a: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*a)

    monkeypatch.setattr(copier, "sparse_runs", spy)
    out = tmp_path / "o.qcow2"
    diskimg.convert([str(s) for s in srcs], str(out), "qcow2", format="raw")
    assert threads and set(threads) == {"diskimg-readahead"}
    with diskimg.open(out) as img:
        got = hashlib.sha256(img.read(0, img.size)).hexdigest()
    assert got == hashlib.sha256(b"".join(s.read_bytes() for s in srcs)).hexdigest()
