"""Sequential-read throughput of ``diskimg nbd`` against ``qemu-nbd`` (issue 19 item 6).

    python3 benchmarks/bench_nbd.py [--size-mib 1024] [--rounds 3] [--out FILE]

The same qcow2 (random data in 15 of every 16 MiB, holes in the rest) is served read-only
by each server on a Unix socket with ``-e 4`` (multi-conn: nbdcopy then opens 4
connections) and copied with ``nbdcopy nbd+unix://... null:`` (every byte is read and
thrown away) and to a file (``nbdcopy ... OUT.raw``, the file compared with qemu-img's
conversion once, untimed).  Rounds alternate the servers so a load spike hits both; each
row is the best of ``--rounds``.  The ratio is qemu-nbd time / diskimg time (the share of
qemu-nbd's throughput diskimg reaches; target >= 0.5).  The 1-minute load average is
printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from qemukit import serving  # noqa: E402


def _make_qcow2(path: Path, size_mib: int) -> None:
    raw = path.with_suffix(".src")
    with open(raw, "wb") as f:
        for i in range(size_mib):
            if i % 16 == 7:
                f.seek(1 << 20, os.SEEK_CUR)
            else:
                f.write(os.urandom(1 << 20))
        f.truncate(size_mib << 20)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


#: the servers, each given ``-k SOCKET IMAGE`` after these arguments
SERVERS = {
    "qemu-nbd": ["qemu-nbd", "-t", "-r", "-e", "4", "-f", "qcow2"],
    "diskimg nbd": [sys.executable, "-m", "diskimg", "nbd", "-t", "-r", "-e", "4", "-f",
                    "qcow2"],
}


def _copy(sock: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", dst], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="append the result block to this file")
    a = ap.parse_args()
    os.environ["PYTHONPATH"] = str(REPO / "src")
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as d:
        tmp = Path(d)
        img = tmp / "src.qcow2"
        _make_qcow2(img, a.size_mib)
        want = tmp / "want.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(want)], check=True)
        load0 = os.getloadavg()
        best: dict[tuple[str, str], float] = {}
        for r in range(a.rounds):
            for name, argv in SERVERS.items():
                sock = str(tmp / f"s{r}-{len(name)}.sock")
                with serving([*argv, "-k", sock, str(img)], sock):
                    for dst_name, dst in (("null:", "null:"), ("file", str(tmp / "o.raw"))):
                        dt = _copy(sock, dst)
                        if dst_name == "file":
                            same = subprocess.run(["cmp", "-s", dst, str(want)]).returncode
                            if same:
                                raise SystemExit(f"{name}: the copy differs from the image")
                            os.unlink(dst)
                        key = (name, dst_name)
                        best[key] = min(best.get(key, dt), dt)
        load1 = os.getloadavg()
    mib = a.size_mib
    lines = [f"image: qcow2, {mib} MiB virtual (random data in 15/16); nbdcopy, -e 4; "
             f"best of {a.rounds}; load average {load0[0]:.2f} {load0[1]:.2f} "
             f"{load0[2]:.2f} before, {load1[0]:.2f} after; {os.cpu_count()} cpus"]
    for dst in ("null:", "file"):
        for name in ("qemu-nbd", "diskimg nbd"):
            dt = best[(name, dst)]
            lines.append(f"nbdcopy -> {dst:6} from {name:12} {dt:7.3f} s  {mib / dt:8.1f} MiB/s")
        ratio = best[("qemu-nbd", dst)] / best[("diskimg nbd", dst)]
        lines.append(f"ratio (diskimg throughput / qemu-nbd's), {dst} {ratio:.2f} "
                     f"(target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("```\n" + text + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
