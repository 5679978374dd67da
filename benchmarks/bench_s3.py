"""Peak RSS of ``diskimg convert -O FMT SRC s3://bucket/key`` (issue 18 items 2-3: memory
stays constant at any image size), against a moto S3 server started here (the tests'
tests/anywhere/s3_server.py), with the floor it stands on.

    python3 benchmarks/bench_s3.py [--sizes-mib 256 1024] [--data-every-mib 4]

The source is a raw file of each size with 1 MiB of random data every
``--data-every-mib`` MiB (the rest holes).  Each row runs the CLI as a subprocess of a
small measuring process and reports ``ru_maxrss`` of the child, its CPU time
(user+sys), the wall time and whether the object read back equals the source (sha256 of
the guest bytes: the object itself for raw, ``qemu-img convert -O raw`` of it for
qcow2).  The floor rows are the same measure of ``python -c`` doing what every upload
does before its first part: import diskimg (and s3fs), one signed request (through s3fs:
create the filesystem first).  Rows per client: ``native`` is the CLI, which takes
diskimg's own S3 client (the environment gives the endpoint and credentials);
``fsspec`` is the API forced through s3fs (``storage_options={"x-client": "fsspec"}``).
The load average is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "anywhere"))

MEASURE = ("import resource, subprocess, sys\n"
           "subprocess.run(sys.argv[1:], check=True, stdin=subprocess.DEVNULL)\n"
           "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(r.ru_maxrss, r.ru_utime + r.ru_stime)\n")

FLOOR = {
    "python": "pass",
    "python + import diskimg + one signed request (native)": (
        "import diskimg\n"
        "from diskimg.hostio.s3 import S3Client\n"
        "from diskimg.hostio.s3conf import native_config\n"
        "S3Client(native_config('s3://images/floor', None)).call('HEAD')\n"),
    "python + import diskimg, s3fs": "import diskimg, s3fs",
    "... + S3FileSystem + one request": (
        "import diskimg, s3fs\n"
        "fs = s3fs.S3FileSystem(skip_instance_cache=True)\n"
        "fs.ls('images')\n"),
}


#: a convert through fsspec (s3fs): the API with storage_options forcing it (the CLI
#: takes the native client when the environment gives credentials)
FSSPEC_CONVERT = ("import sys, diskimg\n"
                  "diskimg.convert(sys.argv[1], sys.argv[2], sys.argv[3],"
                  " storage_options={'x-client': 'fsspec'})\n")


def _env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"),
            "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing"}


def measure(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """(peak RSS bytes, CPU seconds, wall seconds) of ``cmd``."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) << 10, float(out[1]), time.perf_counter() - t


def _guest_sha(path: Path, fmt: str, tmp: Path) -> str:
    if fmt != "raw":
        raw = tmp / "guest.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path),
                        str(raw)], check=True)
        path = raw
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if fmt != "raw":
        path.unlink()
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--data-every-mib", type=int, default=4)
    ap.add_argument("--formats", nargs="+", default=["raw", "qcow2"])
    ap.add_argument("--clients", nargs="+", default=["native", "fsspec"],
                    help="native: the CLI (diskimg's own S3 client); fsspec: the API "
                         "with storage_options={'x-client': 'fsspec'} (s3fs)")
    a = ap.parse_args()
    from bench_stream import _source  # the same sources as the streaming rows
    from s3_server import s3_server

    print(f"load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        env = _env(s3.endpoint)
        print("\n| floor | peak RSS MiB | CPU s |\n|---|---|---|")
        for name, code in FLOOR.items():
            rss, cpu, _ = measure([sys.executable, "-c", code], env)
            print(f"| {name} | {rss / 2**20:.1f} | {cpu:.2f} |")
        print("\n| client | format | image MiB | data MiB | peak RSS MiB | CPU s | wall s | "
              "read back |\n|---|---|---|---|---|---|---|---|")
        for size_mib in a.sizes_mib:
            src = Path(tmp) / f"src-{size_mib}.raw"
            _source(src, size_mib << 20, a.data_every_mib << 20)
            want = _guest_sha(src, "raw", Path(tmp))
            for client, fmt in [(c, f) for c in a.clients for f in a.formats]:
                url = s3.url(f"bench/{size_mib}.{fmt}")
                cmd = ([sys.executable, "-m", "diskimg", "convert", "-O", fmt, str(src), url]
                       if client == "native" else
                       [sys.executable, "-c", FSSPEC_CONVERT, str(src), url, fmt])
                rss, cpu, wall = measure(cmd, env)
                got = Path(tmp) / f"got.{fmt}"
                s3.fs().get_file(url, str(got))
                ok = "equal" if _guest_sha(got, fmt, Path(tmp)) == want else "DIFFERS"
                got.unlink()
                s3.fs().rm(url)
                data = -(-size_mib // a.data_every_mib)
                print(f"| {client} | {fmt} | {size_mib} | {data} | {rss / 2**20:.1f} | {cpu:.2f} | "
                      f"{wall:.2f} | {ok} |")
            src.unlink()
    print(f"\nload average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
