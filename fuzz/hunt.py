#!/usr/bin/env python3
"""Long hypothesis mutation run that does not stop at the first finding.

Runs the same mutation strategies and sandboxed pipeline as tests/robustness/
test_fuzz_qcow2.py / test_fuzz_vmdk.py, but records every finding (grouped by a signature:
the failing step, the exception type and the innermost diskimg frame) and keeps going, so
one run lists every distinct bug.  Each distinct finding's first image is saved with its
mutation list.

    python fuzz/hunt.py --examples 2000 --kinds qemu-v3,qemu-luks --out fuzz/findings
    python fuzz/hunt.py --vmdk --examples 500
    python fuzz/hunt.py --no-workarounds   # also re-find the known, reported bugs

Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "robustness"))

import robustlib  # noqa: E402


def signature(bug: str) -> str:
    head = bug.splitlines()[0]
    step = head.split(":", 1)[0]
    frames = re.findall(r'File "([^"]*diskimg/[^"]+)", line (\d+), in (\w+)', bug)
    where = f"{Path(frames[-1][0]).name}:{frames[-1][2]}" if frames else ""
    kind = re.sub(r"0x[0-9a-f]+|\d+", "N", head.split(":", 2)[1].strip()[:60]) \
        if ":" in head else ""
    return f"{step} | {kind} | {where}"


def bind(fn, *args):  # type: ignore[no-untyped-def]
    def test(muts: list) -> None:
        fn(muts, *args)

    return test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500, help="inputs per base image")
    ap.add_argument("--kinds", default="", help="comma-separated base image kinds")
    ap.add_argument("--vmdk", action="store_true", help="fuzz the vmdk bases instead")
    ap.add_argument("--out", default="", help="directory for the images of findings")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--mem-mb", type=int, default=1024)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--no-workarounds", action="store_true",
                    help="do not skip steps that hit known, reported bugs")
    a = ap.parse_args()
    import os

    from hypothesis import HealthCheck, given, seed, settings

    if a.no_workarounds:
        os.environ["DISKIMG_FUZZ_NO_WORKAROUNDS"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="diskimg-hunt-"))
    kinds = [k for k in a.kinds.split(",") if k]
    bases = (robustlib.build_vmdk_bases(tmp / "bases") if a.vmdk
             else robustlib.build_qcow2_bases(tmp / "bases", kinds or None))
    out = Path(a.out) if a.out else tmp / "findings"
    out.mkdir(parents=True, exist_ok=True)
    worker = robustlib.Worker(mem_mb=a.mem_mb, time_limit=a.time_limit)
    found: dict[str, dict] = {}
    totals: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        for kind, base in bases.items():
            wd = tmp / f"wd-{kind}"
            wd.mkdir()
            for f in base.extra:
                (wd / f.name).write_bytes(f.read_bytes())
            img = wd / base.path.name

            def one(muts: list, base: robustlib.BaseImage, img: Path, wd: Path,
                    kind: str) -> None:
                data = robustlib.apply_mutations(base.data, muts)
                img.write_bytes(data)
                rep = worker.run(robustlib.make_job(base, img, wd))
                totals["inputs"] += 1
                bugs = robustlib.unexcused(rep["bugs"], base, data)
                if not bugs:
                    return
                totals["findings"] += 1
                for b in bugs:
                    sig = f"{kind}: {signature(b)}"
                    if sig in found:
                        found[sig]["count"] += 1
                        continue
                    h = hashlib.sha256(data).hexdigest()[:12]
                    p = out / f"{kind}-{h}{img.suffix}"
                    p.write_bytes(data)
                    found[sig] = {"count": 1, "image": str(p), "bug": b[:3000],
                                  "mutations": robustlib.describe(muts)}
                    print(f"NEW {sig}\n    {robustlib.describe(muts)}\n    saved {p}",
                          flush=True)

            run = settings(max_examples=a.examples, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))(
                given(muts=robustlib.mutation_strategy(base))(bind(one, base, img, wd, kind)))
            if a.seed is not None:
                run = seed(a.seed)(run)
            t1 = time.monotonic()
            run()
            print(f"{kind}: done in {time.monotonic() - t1:.0f}s", flush=True)
    finally:
        worker.close()
    summary = {"inputs": totals["inputs"], "inputs_with_findings": totals["findings"],
               "distinct": len(found), "seconds": round(time.monotonic() - t0),
               "worker_restarts": worker.restarts, "findings": found}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}))
    for sig, f in found.items():
        print(f"\n== {sig} (x{f['count']})\n   {f['mutations']}\n   {f['image']}\n"
              + "\n".join("   " + ln for ln in f["bug"].splitlines()[:25]))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
