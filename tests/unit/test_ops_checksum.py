"""``diskimg.checksum`` (ops/checksum.py) in-process, images made by diskimg: ranges that
read as zeros are never read (a 1 TiB qcow2, alone and under an overlay), the value is
the naive blkhash over the guest bytes, worker counts and progress do not change it, and
bad arguments are refused before anything is opened.  The comparison with ovirt-imageio
itself is tests/interop/test_checksum.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.cli.main import main

K, M = 1024, 1024 * 1024
TIB = 1 << 40


def naive(dev: diskimg.BlockDevice, block_size: int, data_blocks: set[int]) -> str:
    """blkhash written out block by block; blocks outside ``data_blocks`` are zeros (their
    digest repeated, not recomputed: a TiB of zeros is not hashed here)."""
    def digest(block: bytes) -> bytes:
        return hashlib.blake2b(block, digest_size=32).digest()

    h = hashlib.blake2b(digest_size=32)
    n = -(-dev.size // block_size)
    last = dev.size - (n - 1) * block_size
    zero = digest(bytes(block_size))
    i = 0
    for d in [*sorted(data_blocks), n]:
        h.update(zero * (min(d, n - 1) - i))  # the zero blocks before d
        if d == n:  # the last block, when it holds no data
            if i < n:
                h.update(digest(bytes(last)))
            break
        h.update(digest(dev.read(d * block_size, last if d == n - 1 else block_size)))
        i = d + 1
    return h.hexdigest()


def _count_reads(dev: diskimg.BlockDevice, mp: pytest.MonkeyPatch, limit: int) -> list[int]:
    """Wrap ``dev.readinto``: the lengths read, one item per call; reading more than
    ``limit`` bytes fails at once (rather than after reading a TiB of zeros)."""
    sizes: list[int] = []
    real = dev.readinto

    def counting(offset: int, buf: Any) -> int:
        sizes.append(len(memoryview(buf)))
        assert sum(sizes) <= limit, f"read {sum(sizes)} bytes, up to offset {offset}"
        return real(offset, buf)

    mp.setattr(dev, "readinto", counting)
    return sizes


def _data_bytes(dev: diskimg.BlockDevice) -> int:
    return sum(e.length for e in dev.map() if e.data and not e.zero)


def test_zero_ranges_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 TiB qcow2 with three written clusters (the last block short): only those
    clusters are read, and the value is the naive construction's."""
    p = tmp_path / "big.qcow2"
    size = TIB + 3 * 512
    diskimg.create(p, "qcow2", size)
    writes = [(0, 0xE1, 4096), (700 * 4 * M + 5, 0xE2, 100), (size - 1000, 0xE3, 1000)]
    with diskimg.open(p, "r+") as dev:
        for off, pat, n in writes:
            dev.write(off, bytes([pat]) * n)
    with diskimg.open(p) as dev:
        data = _data_bytes(dev)
        assert data <= 3 * 64 * K
        sizes = _count_reads(dev, monkeypatch, data)
        ours = diskimg.checksum(dev, workers=2)
        assert sum(sizes) == data  # the data clusters, nothing else
        monkeypatch.undo()
        want = naive(dev, 4 * M, {off // (4 * M) for off, _, _ in writes})
    assert ours == {"algorithm": "blake2b", "block_size": 4 * M, "checksum": want}


def test_overlay_reads_only_data_through_the_chain(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlay over a 1 TiB base: the base's data the overlay zeroes is not read, nor
    anything unallocated in both; the value is the naive construction's."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    diskimg.create(base, "qcow2", TIB)
    with diskimg.open(base, "r+") as dev:
        dev.write(0, b"\x11" * (256 * K))
        dev.write(TIB - 8 * M, b"\x22" * M)
    diskimg.create(top, "qcow2", TIB, backing_file=str(base), backing_fmt="qcow2")
    with diskimg.open(top, "r+") as dev:
        dev.write(64 * K, b"\x33" * (64 * K))
        dev.write_zeroes(128 * K, 128 * K)  # over the base's data
        dev.write(TIB - 4 * M, b"\x44" * 512)
    with diskimg.open(top) as dev:
        data = _data_bytes(dev)
        assert data == 128 * K + 64 * K + M  # base 0-64K, top 64K-128K, the base MiB, top's
        sizes = _count_reads(dev, monkeypatch, data)
        ours = diskimg.checksum(dev, block_size=M)
        assert sum(sizes) == data
        monkeypatch.undo()
        want = naive(dev, M, {0, (TIB - 8 * M) // M, (TIB - 4 * M) // M})
    assert ours["checksum"] == want


def test_workers_and_progress_give_the_same_value(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    diskimg.create(p, "qcow2", 40 * M + 512)
    with diskimg.open(p, "r+") as dev:
        dev.write(0, bytes(range(256)) * 4096)
        dev.write(17 * M + 3, b"x" * (5 * M))
        dev.write(40 * M, b"\0" * 511 + b"y")
    seen: list[float] = []
    one = diskimg.checksum(p, block_size=64 * K, workers=0)
    many = diskimg.checksum(p, block_size=64 * K, workers=3, progress=seen.append)
    assert one == many
    assert seen[0] == 0.0 and seen[-1] == 100.0 and seen == sorted(seen)
    assert diskimg.checksum(p, block_size=64 * K + 512)["checksum"] != one["checksum"]


@pytest.mark.parametrize("kw, field", [
    ({"algorithm": "shake_256"}, "algorithm"), ({"algorithm": "nope"}, "algorithm"),
    ({"algorithm": 5}, "algorithm"), ({"block_size": 0}, None),
    ({"block_size": (64 << 20) + 1}, "block_size"), ({"block_size": "4M"}, None),
    ({"workers": -1}, None)])
def test_argument_refusals(kw: dict[str, Any], field: str | None) -> None:
    with pytest.raises(diskimg.UsageError) as ei:
        diskimg.checksum("/nonexistent/never-opened", **kw)
    assert field is None or ei.value.field == field


def test_empty_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "empty.raw"
    p.write_bytes(b"")
    assert main(["checksum", "-f", "raw", str(p)]) == 0
    # no blocks: H of nothing (ovirt-imageio's client fails on an empty image)
    assert capsys.readouterr().out == f"{hashlib.blake2b(digest_size=32).hexdigest()}  {p}\n"
