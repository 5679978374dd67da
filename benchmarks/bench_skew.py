"""The page skew of large reads (diskimg.hostio.file's ``_SLOW_SKEW``/``_FAST_SKEW``): how
fast the kernel copies file data into a buffer at each skew (destination address - file
offset, mod 4096), and what the ways of reading into a ``bytearray`` (16 bytes into its
page) cost, as ratios to a direct read into a page-aligned buffer on this machine.

    python3 benchmarks/bench_skew.py [--file F] [--mib 64] [--rounds 25]

The file (default: a new one of ``--mib`` random MiB in /dev/shm, so reads come from the
page cache) is read in 1 MiB requests at 64 KiB-aligned offsets, every variant once per
round, interleaved; the median per MiB is printed.  Rows:

- ``direct skew S``: ``preadv`` straight into a buffer S bytes into a page;
- ``bytearray -> S``: diskimg's way, the read made S - 16 bytes further on in the
  bytearray, then moved down in place (S = 0 is the page-aligned shift of 4080 bytes);
- ``bytearray, diskimg readinto``: :meth:`HostFile.preadinto` itself.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=None)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=25)
    ns = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from diskimg.hostio import open_host_file

    made = ns.file is None
    path = ns.file or Path(f"/dev/shm/bench_skew.{os.getpid()}")
    if made:
        path.write_bytes(os.urandom(ns.mib * MiB))
    try:
        fd = os.open(path, os.O_RDONLY)
        host = open_host_file(path)
        count = min(ns.mib, os.fstat(fd).st_size // MiB - 1)
        offsets = [64 << 10 | i * MiB for i in range(count)]
        area = mmap.mmap(-1, MiB + 8192)
        ba = bytearray(MiB)
        bmv = memoryview(ba)
        scratch = bytearray(4096)

        def direct(skew: int) -> Callable[[int], object]:
            view = memoryview(area)[skew:skew + MiB]
            return lambda off: os.preadv(fd, [view], off)

        def moved(target: int) -> Callable[[int], object]:
            shift = (target - 16) % 4096
            tail = memoryview(scratch)[:shift]

            def run(off: int) -> None:
                os.preadv(fd, [bmv[shift:], tail], off)
                bmv[:MiB - shift] = bmv[shift:]
                bmv[MiB - shift:] = tail
            return run

        variants: dict[str, Callable[[int], object]] = {
            f"direct skew {s}": direct(s) for s in (0, 8, 16, 24, 32, 48, 100, 2048)}
        variants.update({f"bytearray -> {t}": moved(t) for t in (0, 32, 48)})
        variants["bytearray, diskimg readinto"] = lambda off: host.preadinto(off, bmv)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(ns.rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                for off in offsets:
                    fn(off)
                times[name].append((time.perf_counter() - t) / len(offsets) * 1e6)
        base = statistics.median(times["direct skew 0"])
        print(f"# {path}: {len(offsets)} reads of 1 MiB, {ns.rounds} rounds, load "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'variant':32} {'us/MiB':>8} {'ratio':>6}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:32} {med:8.1f} {med / base:6.2f}")
        host.close()
        os.close(fd)
    finally:
        if made:
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
