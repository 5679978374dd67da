"""Long run of the NBD server's mutated-session test (tests/nbd/test_server_hostile.py
``test_mutated_sessions``, which runs 40 streams in CI).

    python fuzz/nbd_server.py                       # 2000 streams, seed 1
    python fuzz/nbd_server.py --count 20000 --seed 7 --fmt raw

An in-process server exports a qcow2 (or raw) image read-only, with base:allocation and
qemu:allocation-depth; each stream is a mutated copy of a whole valid session (client
flags, options, requests, DISC).  Every 50 streams, and at the end, a well-behaved client
reads the whole export and the bytes must be the image's; at the end the image file must be
unchanged.  Prints the outcome counts; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import diskimg  # noqa: E402
from diskimg.nbd import protocol as p  # noqa: E402
from diskimg.nbd.export import Export  # noqa: E402
from diskimg.nbd.server import Server, listen_unix  # noqa: E402
from tests.nbd.nbdtestlib import RawClient, fuzz_one, mutate, valid_transcript  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fmt", default="qcow2", choices=("qcow2", "raw"))
    a = ap.parse_args()
    size = 2 << 20
    with tempfile.TemporaryDirectory(prefix="fuzz-nbd-") as d:
        path = Path(d) / f"img.{a.fmt}"
        diskimg.create(str(path), a.fmt, size)
        model = random.Random(a.seed).randbytes(size // 2) + bytes(size // 2)
        with diskimg.open(str(path), "r+", a.fmt) as dev:
            dev.write(0, model[:size // 2])
        before = path.read_bytes()
        dev = diskimg.open(str(path), "r", a.fmt)
        srv = Server(Export(dev, allocation_depth=True), listen_unix(f"{d}/s.sock"),
                     shared=4, persistent=True, handshake_timeout=1.0)
        t = threading.Thread(target=srv.serve, daemon=True)
        t.start()
        rng = random.Random(a.seed)
        outcomes: dict[str, int] = {}
        t0 = time.monotonic()
        failed = 0
        for i in range(a.count):
            o = fuzz_one(f"{d}/s.sock", mutate(rng, valid_transcript(rng, size)), wait=0.05)
            outcomes[o] = outcomes.get(o, 0) + 1
            if i % 50 == 49 or i == a.count - 1:
                c = RawClient(f"{d}/s.sock")
                err, got, _ = c.request(p.NBD_CMD_READ, 0, size)
                c.close()
                if err or got != model:
                    print(f"stream {i}: the export no longer reads as the image (err {err})")
                    failed += 1
        srv.shutdown()
        t.join(30)
        dev.close()
        if path.read_bytes() != before:
            print("the image file changed")
            failed += 1
    print(f"{a.count} streams in {time.monotonic() - t0:.1f} s: {outcomes}; "
          f"requests served {srv.requests}, error replies {srv.error_replies}, "
          f"connections {srv.connections}; failures {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
