"""How much a convert's time depends on which free memory the kernel hands its writes, for
qemu-img and diskimg alike: the noise behind the slow rounds of bench.py's 2 GiB converts.

    python3 benchmarks/bench_pagereport.py [--mib 2048] [--rounds 7] [--wait 3]

On a VM with virtio-balloon free page reporting (``/sys/module/page_reporting``), memory
that stays free for about 2 s is handed back to the host, which discards it; a later write
into a tmpfs page backed by such memory pays a host page fault.  bench.py unlinks a
variant's output just before running it, so a round normally reuses the memory it freed;
a round that is handed reported memory instead is slower, whichever tool it runs.

Every round runs each tool twice, interleaved: ``fresh`` (the output unlinked, the tool
started at once, as bench.py does) and ``waited`` (the output unlinked, then ``--wait``
seconds before the tool starts, so the memory it freed has been reported).  The input is
bench.py's seeded workload as a qcow2 (made by qemu-img, untimed) in ``--workdir``; the job
is ``convert -f qcow2 -O qcow2`` to the same directory.  Printed: each tool's median,
fastest and slowest time per regime, how much waiting costs each tool (waited / fresh), and
diskimg / qemu-img within each regime, and the MiB the kernel reported during the waits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def _reported_mib() -> float | None:
    try:
        return int(REPORTED.read_text()) / 1024
    except (OSError, ValueError):
        return None


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=2048, help="virtual size of the workload")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--wait", type=float, default=3.0, help="seconds between unlink and run")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm/bench-pagereport"))
    ns = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import bench  # the seeded workload, shared with bench.py

    qemu_img = shutil.which("qemu-img") or "qemu-img"
    script = Path(sys.executable).with_name("diskimg")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "diskimg"]
    work: Path = ns.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw, src = work / "workload.raw", work / "workload.qcow2"
        bench.build_workload(raw, ns.mib << 20, 20240601)
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src)],
                       check=True)
        raw.unlink()
        tools = {"qemu-img": [qemu_img], "diskimg": cli}
        times: dict[tuple[str, str], list[float]] = {}
        reported = 0.0
        for _ in range(ns.rounds + 1):  # the first round is an untimed warm-up
            for name, tool in tools.items():
                for regime in ("fresh", "waited"):
                    out = work / f"out-{name}-{regime}.qcow2"
                    out.unlink(missing_ok=True)
                    if regime == "waited":
                        r0 = _reported_mib()
                        time.sleep(ns.wait)
                        r1 = _reported_mib()
                        reported += (r1 - r0) if (r0 is not None and r1 is not None) else 0
                    os.sync()
                    times.setdefault((name, regime), []).append(_timed(
                        [*tool, "convert", "-f", "qcow2", "-O", "qcow2", str(src), str(out)]))
        for k in times:
            del times[k][0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    state = "not available" if _reported_mib() is None else \
        f"on, {reported:.0f} MiB reported during the {ns.rounds * 2} timed waits"
    print(f"free page reporting: {state}; {ns.mib} MiB workload, {ns.rounds} rounds, "
          f"wait {ns.wait:g} s")
    print(f"{'tool':10} {'regime':7} {'median':>8} {'fastest':>8} {'slowest':>8}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for (name, regime), v in times.items():
        print(f"{name:10} {regime:7} {med[name, regime]:8.3f} {min(v):8.3f} {max(v):8.3f}")
    for name in tools:
        print(f"{name}: waited / fresh = {med[name, 'waited'] / med[name, 'fresh']:.2f}")
    for regime in ("fresh", "waited"):
        print(f"{regime}: diskimg / qemu-img = "
              f"{med['diskimg', regime] / med['qemu-img', regime]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
