#!/usr/bin/env python3
"""``convert -p`` against qemu-img (tests/cli/test_convert_progress_random.py) for longer
runs: the same case generator and checks, any number of seeds.  Needs qemu-img and qemu-io.

    python fuzz/convert_progress.py 500                  # seeds 0..499
    python fuzz/convert_progress.py 200 --start 10000    # seeds 10000..10199

Each failing seed is printed with what differed (a seed reproduces its case exactly:
``PROGRESS_RANDOM_SEED=N PROGRESS_RANDOM_CASES=1 pytest
tests/cli/test_convert_progress_random.py``).  Exit status: 0 when every seed matched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# the diskimg CLI the cases run (a child process) is this tree's too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import run_cmd  # noqa: E402  (tests/conftest.py: the suite's runner)
from tests.cli.test_convert_progress_random import run_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    a = ap.parse_args()
    failed: list[int] = []
    t0 = time.monotonic()
    for seed in range(a.start, a.start + a.count):
        with tempfile.TemporaryDirectory(prefix=f"convert-progress-{seed}-") as d:
            try:
                problems = run_case(seed, Path(d), run_cmd)
            except Exception as e:  # noqa: BLE001 - a broken case is a finding too
                failed.append(seed)
                print(f"seed {seed}: the case itself failed: {e!r}"[:2000], flush=True)
                continue
            if problems:
                failed.append(seed)
                print(f"seed {seed}:", *problems, sep="\n  ", flush=True)
    print(f"{a.count} cases in {time.monotonic() - t0:.0f} s: {len(failed)} failed "
          f"{failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
