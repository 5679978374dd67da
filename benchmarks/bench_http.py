"""Reading images over HTTP from a local nginx against reading them from local disk.

    python3 benchmarks/bench_http.py [--size-mib 256] [--rounds 3]

Rows (best of ``--rounds``; ratios are http / local, the target is at most 1.5x):

- ``read``: every guest byte of a qcow2 (random data in every cluster but a few holes)
  through ``diskimg.open(...).readinto`` in 4 MiB chunks, in this process;
- ``convert``: ``diskimg convert -O raw SOURCE OUT`` as a subprocess, with its peak RSS
  (target: at most 64 MiB);
- ``qemu-img convert -O raw URL``: only when qemu-img has its curl driver (Debian
  ``qemu-block-extra``); otherwise the row says it could not run.

nginx is started from tests/anywhere/conftest.py's ``nginx_server`` (Debian
``nginx-light``).  The load average is printed with the results: the machine is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import diskimg  # noqa: E402

CHUNK = 4 << 20


def _conftest() -> object:
    spec = importlib.util.spec_from_file_location("anywhere_conftest",
                                                  REPO / "tests/anywhere/conftest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _make_qcow2(path: Path, size_mib: int) -> None:
    raw = path.with_suffix(".src")
    with open(raw, "wb") as f:
        for i in range(size_mib):
            f.write(os.urandom(1 << 20) if i % 16 != 7 else bytes(1 << 20))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def _read_all(source: str) -> float:
    t0 = time.perf_counter()
    with diskimg.open(source) as dev:
        buf = memoryview(bytearray(CHUNK))
        for off in range(0, dev.size, CHUNK):
            n = min(CHUNK, dev.size - off)
            dev.readinto(off, buf[:n])
    return time.perf_counter() - t0


def _child(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one subprocess, the RSS from GNU time: a child
    forked from this process would report this process's RSS as its own peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        if res.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr}")
        return dt, int(rss.read().split()[-1]) / 1024


def _one_get(url: str, size: int) -> float:
    """The floor: one plain http.client GET of the whole object into a buffer."""
    import http.client
    from urllib.parse import urlsplit

    p = urlsplit(url)
    buf = memoryview(bytearray(CHUNK))
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(p.hostname or "", p.port)
    conn.request("GET", p.path)
    resp = conn.getresponse()
    got = 0
    while got < size:
        k = resp.readinto(buf)
        if not k:
            break
        got += k
    conn.close()
    return time.perf_counter() - t0


def _best(rounds: int, fn: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    runs = [fn() for _ in range(rounds)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    conf = _conftest()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as d:
        with conf.nginx_server(Path(d)) as server:  # type: ignore[attr-defined]
            img = server.root / "disk.qcow2"
            _make_qcow2(img, a.size_mib)
            url = server.url(img.name)
            out = Path(d) / "out.raw"
            load = os.getloadavg()
            print(f"image: qcow2, {a.size_mib} MiB virtual, "
                  f"{img.stat().st_size >> 20} MiB file; load average "
                  f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cpus")
            rows: list[tuple[str, float, float, float | None]] = []
            for label, src in (("local", str(img)), ("http", url)):
                t, _ = _best(a.rounds, lambda s=src: (_read_all(s), 0.0))  # type: ignore[misc]
                rows.append((f"read {label}", t, a.size_mib / t, None))
            t, _ = _best(a.rounds, lambda: (_one_get(url, img.stat().st_size), 0.0))
            rows.append(("(floor: one http.client GET of the file)", t,
                         img.stat().st_size / 2**20 / t, None))
            for label, src in (("local", str(img)), ("http", url)):
                t, rss = _best(a.rounds, lambda s=src: _child(  # type: ignore[misc]
                    [sys.executable, "-m", "diskimg", "convert", "-O", "raw", s, str(out)]))
                rows.append((f"diskimg convert -O raw ({label})", t, a.size_mib / t, rss))
            qemu_curl = shutil.which("qemu-img") and subprocess.run(
                ["qemu-img", "info", url], capture_output=True).returncode == 0
            if qemu_curl:
                t, rss = _best(a.rounds, lambda: _child(
                    ["qemu-img", "convert", "-O", "raw", url, str(out)]))
                rows.append(("qemu-img convert -O raw (http)", t, a.size_mib / t, rss))
            for name, t, speed, rss in rows:
                mem = f"{rss:6.1f} MiB" if rss is not None else "     -"
                print(f"{name:38s} {t:7.3f} s {speed:8.1f} MiB/s  peak RSS {mem}")
            print(f"ratio read http/local:    {rows[1][1] / rows[0][1]:.2f}x (target <= 1.5)")
            print(f"ratio convert http/local: {rows[4][1] / rows[3][1]:.2f}x")
            if qemu_curl:
                print(f"ratio convert diskimg/qemu-img (http): {rows[4][1] / rows[5][1]:.2f}x "
                      "(target <= 1.0)")
            else:
                print("qemu-img convert from the URL: not run (qemu-img has no curl driver "
                      "here: Debian qemu-block-extra is not installed)")
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}"
          " MiB")


if __name__ == "__main__":
    main()
