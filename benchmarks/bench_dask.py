"""The Dask fleet run of issue 18 item 4, timed: N images in a moto S3 server (started
here, as the tests start it), examples/dask_fleet.py on a LocalCluster of W worker
processes (check, info, convert to qcow2 and upload each image), and one table.

    python benchmarks/bench_dask.py --images 24 --workers 2 --size-mib 64

Prints the images, workers, bytes and the wall time of the fleet run (cluster start-up
apart), and asserts every row is free of errors.  Needs diskimg[remote], moto[server],
dask[distributed] and qemu-img (to make the images).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "anywhere"), str(ROOT / "examples")]


def _make(root: Path, i: int, size: int, rng: random.Random) -> Path:
    """Image ``i``: a seeded raw disk (1 MiB chunks: 25% random, 25% text, the rest
    holes) converted by qemu-img to qcow2, compressed qcow2, streamOptimized vmdk or
    kept raw."""
    raw = root / f"src{i}.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 1 << 20):
            r = rng.random()
            if r < 0.25:
                f.seek(off)
                f.write(rng.randbytes(1 << 20))
            elif r < 0.5:
                f.seek(off)
                f.write((b"diskimg fleet %d " % i) * (65536 // 16))
    kind = i % 4
    if kind == 3:
        return raw
    out = root / f"img{i}.{'vmdk' if kind == 2 else 'qcow2'}"
    args = {0: ["-O", "qcow2"], 1: ["-c", "-O", "qcow2"],
            2: ["-O", "vmdk", "-o", "subformat=streamOptimized"]}[kind]
    subprocess.run(["qemu-img", "convert", *args, str(raw), str(out)], check=True)
    raw.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--seed", type=int, default=20261206)
    a = ap.parse_args()
    import dask_fleet
    from dask.distributed import Client, LocalCluster
    from s3_server import s3_server

    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        root = Path(tmp)
        fs = s3.fs()
        total = 0
        for i in range(a.images):
            p = _make(root, i, a.size_mib << 20, rng)
            total += p.stat().st_size
            fs.put_file(str(p), s3.url(f"fleet/in/{p.name}"))
            p.unlink()
        with LocalCluster(n_workers=a.workers, processes=True, threads_per_worker=1,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            rows = dask_fleet.fleet(client, s3.url("fleet/in/"), s3.storage_options,
                                    s3.url("fleet/out/"))
            wall = time.perf_counter() - t0
        bad = [r for r in rows if r["error"] is not None]
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"images {len(rows)} ({a.size_mib} MiB virtual each; {total / 2**20:.0f} MiB "
              f"stored), workers {a.workers} processes, fleet run {wall:.1f} s "
              f"({wall / max(1, len(rows)):.2f} s per image), errors {len(bad)}, "
              f"load {load}, cpus {os.cpu_count()}")
        assert len(rows) == a.images and not bad, bad
    return 0


if __name__ == "__main__":
    sys.exit(main())
