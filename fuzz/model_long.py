#!/usr/bin/env python3
"""Long runs of the model tests in tests/property (qcow2, vmdk, raw against a bytearray
model, qemu-img compare/check at the end of every run).  Not run in CI, which runs each
machine derandomized with a bounded example count.

    python fuzz/model_long.py                          # all three, 500 examples each
    python fuzz/model_long.py qcow2 --examples 2000 --steps 40
    python fuzz/model_long.py qcow2 --where 'o["data_file"] is None and o["cs"] <= 4096'
    python fuzz/model_long.py vmdk --no-shrink

``--where`` narrows the qcow2 image options (a Python expression over ``o``, the dict
drawn by ``image_options``: cs, compat, size, refcount_bits, extended_l2, lazy_refcounts,
zstd, data_file, backing, backing_size, encrypt), e.g. to keep exploring while a known bug
blocks one corner.  Random seeds; prints the coverage counters at the end.  Exit status 1
when a run failed (the falsifying example is printed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "property"), str(ROOT / "tests"), str(ROOT / "src")]

MACHINES = {"qcow2": ("test_qcow2_model", "Qcow2Machine"),
            "vmdk": ("test_vmdk_model", "VmdkModel"),
            "raw": ("test_raw_model", "RawModel")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("formats", nargs="*", help=f"any of {', '.join(MACHINES)} (default: all)")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--where", default=None, help="qcow2 only: filter on the options o")
    ap.add_argument("--no-shrink", action="store_true")
    args = ap.parse_args()
    if any(f not in MACHINES for f in args.formats):
        ap.error(f"formats are {', '.join(MACHINES)}")

    import conftest  # noqa: F401  (PATH for qemu-img's LUKS retry wrapper, profiles)
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import initialize, run_state_machine_as_test

    phases = [Phase.explicit, Phase.generate] + ([] if args.no_shrink else [Phase.shrink])
    cfg = settings(max_examples=args.examples, stateful_step_count=args.steps,
                   deadline=None, derandomize=False, phases=phases, database=None,
                   report_multiple_bugs=True, suppress_health_check=list(HealthCheck))
    failed = False
    for fmt in args.formats or list(MACHINES):
        modname, cls = MACHINES[fmt]
        mod = importlib.import_module(modname)
        machine: Any = getattr(mod, cls)
        if args.where and fmt == "qcow2":
            where = eval(f"lambda o: {args.where}")  # noqa: S307 (a local command line)

            class Narrowed(machine):  # type: ignore[misc, valid-type]
                @initialize(o=mod.image_options().filter(where))
                def setup(self, o: dict[str, Any]) -> None:
                    super().setup(o)

            machine = Narrowed
        print(f"== {fmt}: {args.examples} examples, {args.steps} steps", flush=True)
        try:
            run_state_machine_as_test(machine, settings=cfg)
        except Exception as e:  # noqa: BLE001  (report and go on with the next format)
            failed = True
            print(f"!! {fmt}: {type(e).__name__}: {e}", flush=True)
        for what, n in sorted(mod.COVERAGE.items()):
            print(f"{n:8d}  {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
