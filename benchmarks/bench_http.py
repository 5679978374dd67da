"""Reading images over HTTP from a local nginx against reading them from local disk.

    python3 benchmarks/bench_http.py [--size-mib 256] [--rounds 3]

Rows (best of ``--rounds`` rounds, each round runs every row once; ratios are http /
local, the target is at most 1.5x):

- ``read``: every guest byte of a qcow2 (random data in every cluster but a few holes)
  through ``diskimg.open(...).readinto`` in 4 MiB chunks, in this process; ``cold
  cache``: the image file's pages are dropped first (``POSIX_FADV_DONTNEED`` on that file
  only), so the local read and nginx both read the disk;
- the floors (sizes are the file's, not the guest's): a plain ``readinto`` of the image
  file (page cache and cold), and nginx sending the file to a client that does nothing
  but ``recv_into`` a 4 MiB buffer, over 1, 2 and 4 connections at once (ranged GETs of
  equal parts, a thread each) and over 1 from a cold cache: how much of ``read http``'s
  miss the loopback transport itself accounts for;
- ``convert``: ``diskimg convert -O raw SOURCE OUT`` as a subprocess, with its peak RSS
  (target: at most 64 MiB);
- ``qemu-img convert -O raw URL``: only when qemu-img has its curl driver (Debian
  ``qemu-block-extra``); with ``-m 1`` (one coroutine) and with its default (8), which
  hangs in many runs of qemu 7.2 here: a run still going after ``--qemu-timeout``
  seconds is killed and counted as hung.

nginx is started from tests/anywhere/conftest.py's ``nginx_server`` (Debian
``nginx-light``).  The load average is printed with the results: the machine is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


def _child(argv: list[str], timeout: float | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one subprocess, the RSS from GNU time: a child
    forked from this process would report this process's RSS as its own peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        # a session of its own: a timeout kills GNU time and the command under it
        proc = subprocess.Popen(["/usr/bin/time", "-o", rss.name, "-f", "%M", *argv],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        dt = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
        return dt, int(rss.read().split()[-1]) / 1024


def _raw_get(host: str, port: int, path: str, lo: int, hi: int) -> None:
    """One ranged GET of ``[lo, hi)`` on a new socket, its body received with
    ``recv_into`` into a 4 MiB buffer (reused: the floor does nothing with the bytes)."""
    buf = memoryview(bytearray(CHUNK))
    with socket.create_connection((host, port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Range: bytes={lo}-{hi - 1}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            k = s.recv_into(buf)
            if not k:
                raise RuntimeError("the server closed the connection before the head")
            head += bytes(buf[:k])
        got = len(head.partition(b"\r\n\r\n")[2])
        if not head.startswith(b"HTTP/1.1 206"):
            raise RuntimeError(f"not a 206: {head[:40]!r}")
        while got < hi - lo:
            k = s.recv_into(buf)
            if not k:
                raise RuntimeError(f"the body ended after {got} of {hi - lo} bytes")
            got += k


def _recv_floor(url: str, size: int, conns: int) -> float:
    """The transport floor: the whole file as ``conns`` ranged GETs at once, one thread
    each, received with ``recv_into`` and nothing else."""
    from urllib.parse import urlsplit

    p = urlsplit(url)
    per = -(-size // conns)
    threads = [threading.Thread(target=_raw_get, args=(p.hostname, p.port, p.path, lo,
                                                       min(lo + per, size)))
               for lo in range(0, size, per)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _file_floor(path: Path) -> float:
    """A plain local read of the file into a 4 MiB buffer (``readinto``, no image)."""
    buf = memoryview(bytearray(CHUNK))
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def _drop_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (this file only: POSIX_FADV_DONTNEED),
    so the next read of it, local or by nginx, comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class _Hung(Exception):
    pass


def _child_or_hang(argv: list[str], timeout: float) -> tuple[float, float]:
    try:
        return _child(argv, timeout)
    except subprocess.TimeoutExpired:
        raise _Hung from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qemu-timeout", type=float, default=30.0,
                    help="seconds before a qemu-img convert from the URL counts as hung")
    a = ap.parse_args()
    # PYTHONDONTWRITEBYTECODE (set in some shells here) or a fresh tree would make every
    # `diskimg convert` row compile its modules again (~0.17 s a run): compile them once
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "diskimg")],
                   check=False, stdout=subprocess.DEVNULL)
    conf = _conftest()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as d:
        with conf.nginx_server(Path(d)) as server:  # type: ignore[attr-defined]
            img = server.root / "disk.qcow2"
            _make_qcow2(img, a.size_mib)
            url = server.url(img.name)
            out = Path(d) / "out.raw"
            fsize = img.stat().st_size
            load = os.getloadavg()
            print(f"image: qcow2, {a.size_mib} MiB virtual, {fsize >> 20} MiB file; "
                  f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
                  f"{os.cpu_count()} cpus; best of {a.rounds} interleaved rounds")
            qemu_curl = shutil.which("qemu-img") is not None and subprocess.run(
                ["qemu-img", "info", url], capture_output=True, timeout=60).returncode == 0

            def cold(fn: Callable[[], float]) -> Callable[[], tuple[float, float]]:
                def run() -> tuple[float, float]:
                    _drop_cache(img)
                    return fn(), 0.0
                return run

            def convert(src: str) -> Callable[[], tuple[float, float]]:
                return lambda: _child([sys.executable, "-m", "diskimg", "convert", "-O",
                                       "raw", src, str(out)])

            # (name, MiB moved, run -> (seconds, peak RSS MiB or 0))
            rows: list[tuple[str, float, Callable[[], tuple[float, float]]]] = [
                ("read local", a.size_mib, lambda: (_read_all(str(img)), 0.0)),
                ("read http", a.size_mib, lambda: (_read_all(url), 0.0)),
                ("read local (cold cache)", a.size_mib, cold(lambda: _read_all(str(img)))),
                ("read http (cold cache)", a.size_mib, cold(lambda: _read_all(url))),
                ("(floor: file read, page cache)", fsize / 2**20,
                 lambda: (_file_floor(img), 0.0)),
                ("(floor: file read, cold cache)", fsize / 2**20,
                 cold(lambda: _file_floor(img))),
                ("(floor: nginx -> recv_into, 1 conn)", fsize / 2**20,
                 lambda: (_recv_floor(url, fsize, 1), 0.0)),
                ("(floor: nginx -> recv_into, 2 conns)", fsize / 2**20,
                 lambda: (_recv_floor(url, fsize, 2), 0.0)),
                ("(floor: nginx -> recv_into, 4 conns)", fsize / 2**20,
                 lambda: (_recv_floor(url, fsize, 4), 0.0)),
                ("(floor: nginx -> recv_into, 1 conn, cold)", fsize / 2**20,
                 cold(lambda: _recv_floor(url, fsize, 1))),
                ("diskimg convert -O raw (local)", a.size_mib, convert(str(img))),
                ("diskimg convert -O raw (http)", a.size_mib, convert(url)),
            ]
            if qemu_curl:
                rows.append(("qemu-img convert -m 1 -O raw (http)", a.size_mib,
                             lambda: _child(["qemu-img", "convert", "-m", "1", "-O", "raw",
                                             url, str(out)])))
                rows.append(("qemu-img convert -O raw (http)", a.size_mib,
                             lambda: _child_or_hang(["qemu-img", "convert", "-O", "raw",
                                                     url, str(out)], a.qemu_timeout)))
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in rows}
            hangs: dict[str, int] = {name: 0 for name, _, _ in rows}
            for _ in range(a.rounds):                     # interleaved: the load drifts
                for name, _, fn in rows:
                    try:
                        runs[name].append(fn())
                    except _Hung:
                        hangs[name] += 1
            best: dict[str, float] = {}
            for name, mib, _ in rows:
                if not runs[name]:
                    print(f"{name:42s}    hung in every round (killed after "
                          f"{a.qemu_timeout:g} s)")
                    continue
                t = best[name] = min(r[0] for r in runs[name])
                rss = max(r[1] for r in runs[name])
                mem = f"{rss:6.1f} MiB" if rss else "     -"
                hung = f"  (hung {hangs[name]} of {a.rounds})" if hangs[name] else ""
                print(f"{name:42s} {t:7.3f} s {mib / t:8.1f} MiB/s  peak RSS {mem}{hung}")

            def ratio(label: str, x: str, y: str, target: str = "") -> None:
                if x in best and y in best:
                    print(f"ratio {label}: {best[x] / best[y]:.2f}x{target}")

            ratio("read http/local", "read http", "read local", " (target <= 1.5)")
            ratio("read http/local, cold cache", "read http (cold cache)",
                  "read local (cold cache)", " (target <= 1.5)")
            ratio("floor: transport/file read (page cache)",
                  "(floor: nginx -> recv_into, 1 conn)", "(floor: file read, page cache)")
            ratio("floor: transport/file read (cold cache)",
                  "(floor: nginx -> recv_into, 1 conn, cold)",
                  "(floor: file read, cold cache)")
            ratio("read http/transport floor (1 conn)", "read http",
                  "(floor: nginx -> recv_into, 1 conn)")
            ratio("convert http/local", "diskimg convert -O raw (http)",
                  "diskimg convert -O raw (local)")
            ratio("convert diskimg/qemu-img -m 1 (http)", "diskimg convert -O raw (http)",
                  "qemu-img convert -m 1 -O raw (http)", " (target <= 1.0)")
            ratio("convert diskimg/qemu-img (http)", "diskimg convert -O raw (http)",
                  "qemu-img convert -O raw (http)", " (target <= 1.0)")
            if not qemu_curl:
                print("qemu-img convert from the URL: not run (qemu-img has no curl driver "
                      "here: Debian qemu-block-extra is not installed)")
            load = os.getloadavg()
            print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}"
          " MiB")


if __name__ == "__main__":
    main()
