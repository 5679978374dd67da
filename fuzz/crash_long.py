#!/usr/bin/env python3
"""Long crash-consistency run: COUNT seeded kills of a random writer (not CI).

    python fuzz/crash_long.py COUNT [--base N] [--out DIR] [--keep]

Each seed draws an image from the option space, runs a random sequence in a child and
kills it (tests/robustness/test_crash_consistency.py, :func:`run_random_kill`: the CI
test runs the seeds ``seeds(CRASH_RUNS)``; ``--base`` picks another series).  Every
failure is printed with its seed (``run_random_kill(seed, dir)`` reproduces it) and the
killed image is kept in ``--out``.  Exit status 1 when any seed failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "robustness"))
sys.path.append(str(ROOT / "src"))  # after PYTHONPATH: that can pick another tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("count", type=int)
    ap.add_argument("--base", type=int, default=1_000_000,
                    help="first seed of the series (CI uses 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "fuzz" / "findings" / "crash")
    ap.add_argument("--keep", action="store_true", help="keep the images of passing seeds")
    args = ap.parse_args()

    import test_crash_consistency as t

    failed = []
    t0 = time.perf_counter()
    for k, seed in enumerate(t.seeds(args.count, args.base)):
        d = Path(tempfile.mkdtemp(prefix=f"crash-{seed}-"))
        try:
            line = t.run_random_kill(seed, d)
        except Exception as e:  # an AssertionError, or a DiskImgError from a read
            keep = args.out / str(seed)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(d), keep)
            failed.append(seed)
            print(f"[{k + 1}/{args.count}] FAIL seed={seed} ({keep}): "
                  f"{type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        if not args.keep:
            shutil.rmtree(d)
        print(f"[{k + 1}/{args.count}] {line}", flush=True)
    took = time.perf_counter() - t0
    print(f"{args.count - len(failed)}/{args.count} seeds passed in {took:.0f} s; "
          f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
