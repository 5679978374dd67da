#!/usr/bin/env python3
"""``convert -p`` against qemu-img for longer runs: tests/cli/test_convert_progress_random.py
(the same case generator and checks) over any number of seeds, run by pytest.  Needs
qemu-img and qemu-io.

    python fuzz/convert_progress.py 500                  # seeds 0..499
    python fuzz/convert_progress.py 200 --start 10000    # seeds 10000..10199

pytest lists each failing seed with what differed (a seed reproduces its case exactly:
``PROGRESS_RANDOM_SEED=N PROGRESS_RANDOM_CASES=1 pytest
tests/cli/test_convert_progress_random.py``).  Exit status: pytest's (0: every seed
matched).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    a = ap.parse_args()
    env = dict(os.environ, PROGRESS_RANDOM_CASES=str(a.count),
               PROGRESS_RANDOM_SEED=str(a.start),
               # the diskimg CLI the cases run (a child process) is this tree's too
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-rf", str(ROOT / "tests" / "cli" / "test_convert_progress_random.py")],
                           cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
