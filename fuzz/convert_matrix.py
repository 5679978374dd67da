#!/usr/bin/env python3
"""The convert matrix (tests/interop/test_convert_matrix.py) for longer runs: the same
generator and checks, any number of seeds.  Needs qemu-img and qemu-io.

    python fuzz/convert_matrix.py 1000                  # seeds 0..999
    python fuzz/convert_matrix.py 500 --start 40000     # seeds 40000..40499
    python fuzz/convert_matrix.py 200 --keep fuzz/findings/convert   # keep failing cases

Each failing seed is printed with its problems (a seed reproduces its case exactly:
``CONVERT_MATRIX_SEED=N CONVERT_MATRIX_CASES=1 pytest tests/interop/test_convert_matrix.py``).
Exit status: 0 when nothing was found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# the diskimg CLI the cases run (a child process) is this tree's too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(ROOT / "tests" / "interop"))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import run_cmd  # noqa: E402  (tests/conftest.py: the suite's runner)
from test_convert_matrix import run_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--keep", type=Path, help="copy the files of failing cases here")
    a = ap.parse_args()
    failed: list[int] = []
    t0 = time.monotonic()
    for seed in range(a.start, a.start + a.count):
        with tempfile.TemporaryDirectory(prefix=f"convert-matrix-{seed}-") as d:
            try:
                _case, problems = run_case(seed, Path(d), run_cmd)
            except Exception as e:  # noqa: BLE001 - a broken case is a finding too
                failed.append(seed)
                print(f"seed {seed}: the case itself failed: {e!r}"[:2000], flush=True)
                continue
            if not problems:
                continue
            failed.append(seed)
            print(f"seed {seed}:", *problems, sep="\n  ", flush=True)
            if a.keep is not None:
                shutil.copytree(d, a.keep / str(seed), dirs_exist_ok=True)
    print(f"{a.count} cases in {time.monotonic() - t0:.0f} s: {len(failed)} failed "
          f"{failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
