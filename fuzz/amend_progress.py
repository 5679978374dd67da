#!/usr/bin/env python3
"""``amend -p`` against qemu-img over random images: for each seed, a qcow2 image of a
random cluster size, refcount width, size and set of writes (data, zeros, compressed,
discards; sometimes a snapshot) is amended to another refcount width by qemu-img and, on a
copy, by diskimg; the progress bytes, exit codes and messages must be equal and the two
results must compare equal.  Needs qemu-img and qemu-io.  (tests/cli/test_amend_progress.py
holds fixed cases for CI.)

    python fuzz/amend_progress.py 200                 # seeds 0..199
    python fuzz/amend_progress.py 100 --start 5000    # seeds 5000..5099

Exit status: 0 when every seed matched.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
WIDTHS = [1, 2, 4, 8, 16, 32, 64]


def case(seed: int) -> tuple[str, list[str], bool, str, str]:
    """(create options, qemu-io commands, snapshot?, size, amend options) of ``seed``."""
    rng = random.Random(seed)
    cs = rng.choice([512, 1024, 4096, 65536])
    old = rng.choice(WIDTHS)
    new = rng.choice([w for w in WIDTHS if w != old])
    size = rng.choice([4, 16, 64]) << 20
    cmds = []
    for _ in range(rng.randint(0, 5)):
        off = rng.randrange(0, size // cs) * cs
        n = min(rng.choice([cs, 64 * cs, 1 << 20, 3 << 20]), size - off)
        op = rng.choice(["write -P 5", "write -z", "write -c -P 3", "discard"])
        cmds.append(f"{op} {off} {n}")
    return (f"cluster_size={cs},refcount_bits={old}", cmds, rng.random() < 0.3, str(size),
            f"refcount_bits={new}")


def run(seed: int, d: Path) -> list[str]:
    """The differences for ``seed`` (empty: none)."""
    create, cmds, snap, size, amend = case(seed)

    def img(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["qemu-img", *args], cwd=d, capture_output=True, check=False)

    img("create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", size)
    for c in cmds:  # a refused write (compressed over data) just leaves the image as is
        subprocess.run(["qemu-io", "-c", c, "q.qcow2"], cwd=d, capture_output=True,
                       check=False)
    if snap:
        img("snapshot", "-c", "s1", "q.qcow2")
    shutil.copyfile(d / "q.qcow2", d / "d.qcow2")
    want = img("amend", "-p", "-o", amend, "q.qcow2")
    got = subprocess.run([sys.executable, "-m", "diskimg", "amend", "-p", "-o", amend,
                          "d.qcow2"], cwd=d, capture_output=True, env=ENV, check=False)
    problems = []
    if got.stdout != want.stdout:
        problems.append("progress lines differ")
    if (got.returncode, got.stderr.replace(b"diskimg:", b"qemu-img:")) != (
            want.returncode, want.stderr):
        problems.append(f"exit/messages differ: {want.returncode} {want.stderr!r} / "
                        f"{got.returncode} {got.stderr!r}")
    if img("compare", "q.qcow2", "d.qcow2").returncode:
        problems.append("contents differ")
    if problems:
        problems.insert(0, f"seed {seed}: create -o {create} {size}, io {cmds}, "
                        f"snapshot={snap}, amend -o {amend}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("count", type=int)
    ap.add_argument("--start", type=int, default=0)
    a = ap.parse_args()
    bad = 0
    for seed in range(a.start, a.start + a.count):
        with tempfile.TemporaryDirectory() as tmp:
            problems = run(seed, Path(tmp))
        if problems:
            bad += 1
            print("\n  ".join(problems), flush=True)
    print(f"{a.count} seeds, {bad} with differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
