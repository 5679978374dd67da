"""Streaming convert (issue 18 item 2): ``diskimg convert -O FMT SRC -`` into a pipe, with
the peak RSS of the converting process (target: at most 64 MiB at any image size).

    python3 benchmarks/bench_stream.py [--size-mib 2048] [--data-every-mib 4]

The source is a raw file of ``--size-mib`` with 1 MiB of incompressible data every
``--data-every-mib`` MiB (the rest holes; ``--data-every-mib 1``: all data).  Each row runs
``diskimg convert -O FMT src -`` as a subprocess whose stdout is a pipe drained by
``sha256sum`` (so the output is never stored), then reads the converted stream back with
qemu-img when ``--verify`` is given (that stores it in a temporary file).  Rows: raw,
streamOptimized vmdk, qcow2 -- seconds, MiB/s of virtual size, peak RSS (ru_maxrss of the
child), and stream size.  The load average is printed: the machine is shared.
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
FORMATS = {"raw": [], "vmdk": ["-o", "subformat=streamOptimized"], "qcow2": []}


def _source(path: Path, size: int, every: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, every):
            f.seek(off)
            f.write(os.urandom(min(1 << 20, size - off)))


def _row(src: Path, fmt: str, verify: bool, tmp: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = tmp / f"out.{fmt}"
    sink = out.open("wb") if verify else None
    t0 = time.perf_counter()
    conv = subprocess.Popen([sys.executable, "-m", "diskimg", "convert", "-O", fmt,
                             *FORMATS[fmt], str(src), "-"], stdout=subprocess.PIPE, env=env)
    assert conv.stdout is not None
    n = 0
    while chunk := conv.stdout.read(1 << 20):
        n += len(chunk)
        if sink is not None:
            sink.write(chunk)
    rc = conv.wait()
    dt = time.perf_counter() - t0
    if sink is not None:
        sink.close()
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(src),
                              str(out)], capture_output=True, text=True)
        ok = "identical" if cmp.returncode == 0 else f"DIFFERS ({cmp.stdout.strip()})"
        out.unlink()
    else:
        ok = "-"
    return f"| {fmt} | {rc} | {dt:.2f} | {src.stat().st_size / dt / 2**20:.0f} | {n >> 20} | {ok} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--data-every-mib", type=int, default=4)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--formats", default="raw,vmdk,qcow2")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "src.raw"
        _source(src, a.size_mib << 20, a.data_every_mib << 20)
        print(f"source: {a.size_mib} MiB raw, 1 MiB of data every {a.data_every_mib} MiB; "
              f"load {os.getloadavg()[0]:.2f}")
        print("| format | exit | seconds | MiB/s (virtual) | stream MiB | qemu-img compare "
              "| peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for fmt in a.formats.split(","):
            # each row in a fresh child of its own so ru_maxrss is that row's peak
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                line = _row(src, fmt, a.verify, tmp)
                os.write(w, line.encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                line = f.read()
            _, _, ru = os.wait4(pid, 0)
            print(f"{line} {ru.ru_maxrss / 1024:.1f} |")


if __name__ == "__main__":
    main()
