#!/usr/bin/env python3
"""diskimg vs qemu-img on a seeded GiB-scale workload.

    python benchmarks/bench.py                    # 1 GiB, 3 rounds, writes benchmarks/results.md
    python benchmarks/bench.py --size 256M --repeat 5

The input is a sparse raw file mixing, by 1 MiB chunk (seeded): 16% random data, 24%
compressible text-like data, 12% written zeros, 48% holes.  Each job is run as a child
process for both tools, interleaved (qemu-img, diskimg, qemu-img, diskimg, ...), and the
medians of ``--repeat`` rounds are compared.  Peak RSS is the child's ``ru_maxrss``
(``os.wait4``), so both tools are measured the same way, interpreter start-up included.

Jobs:
- convert raw->qcow2, qcow2->raw, qcow2->qcow2: ``qemu-img convert`` vs
  ``python -m diskimg convert`` (same arguments) and, when the library exports a
  ``convert`` function, the Python API in a child interpreter;
- sequential read of the qcow2 in 1 MiB chunks: ``diskimg.open().readinto`` vs qemu-io
  issuing one ``read`` of 1 MiB per chunk (both read every byte into a buffer and discard
  it; ``qemu-img convert -O raw ... /dev/null`` is not used because qemu-img refuses a
  character device target, and it would skip zero clusters where readinto cannot).
  qemu-io is a test tool: it allocates and pattern-fills a bounce buffer per command, so
  treat the read ratio as indicative; the convert ratios are the headline numbers.

Every converted output is checked once with ``qemu-img compare`` (untimed); a job whose
diskimg output differs is reported as WRONG rather than timed.  A job that diskimg cannot
run yet (missing command or format) is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
PY = sys.executable


def parse_size(text: str) -> int:
    try:
        from diskimg.units import parse_size as ps

        return ps(text)
    except ImportError:  # pragma: no cover - diskimg not installed
        mul = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
        t = text.strip().lower()
        return int(float(t[:-1]) * mul[t[-1]]) if t[-1] in mul else int(t)


# --- workload --------------------------------------------------------------------------------

KINDS = (("random", 16), ("compressible", 24), ("zeros", 12), ("hole", 48))


def build_workload(path: Path, size: int, seed: int) -> dict[str, int]:
    """Write the seeded mixed workload to ``path``; returns bytes per kind."""
    rng = random.Random(seed)
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    counts = dict.fromkeys(names, 0)
    words = [b"disk", b"image", b"qcow2", b"cluster", b"refcount", b"backing", b"sector",
             b"guest", b"host", b"offset", b"zero", b"data", b"\n", b"    ", b"0x1f"]
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            kind = rng.choices(names, weights)[0]
            counts[kind] += n
            if kind == "hole":
                continue
            f.seek(off)
            if kind == "random":
                f.write(rng.randbytes(n))
            elif kind == "zeros":
                f.write(zeros[:n])
            else:
                line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
                chunk = (line * (n // len(line) + 1))[:n]
                f.write(chunk)
    return counts


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    rss_kib: int
    ok: bool
    err: str = ""


def run_measured(cmd: list[str], timeout: float) -> Sample:
    """Run ``cmd``; wall time and the child's peak RSS (KiB) from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            return Sample(time.perf_counter() - t0, ru.ru_maxrss, False, "timeout")
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    ok = p.returncode == 0
    return Sample(dt, ru.ru_maxrss, ok, "" if ok else (err.splitlines() or ["?"])[-1])


@dataclass
class Variant:
    label: str
    cmd: list[str]
    out: Path | None  # output image to verify and delete, if any
    out_fmt: str = "raw"
    samples: list[Sample] = field(default_factory=list)
    note: str = ""


@dataclass
class Job:
    name: str
    reference: Variant
    candidates: list[Variant]
    src: Path | None = None
    src_fmt: str = "raw"


def _has_api_convert() -> bool:
    r = subprocess.run([PY, "-c", "import diskimg, importlib;"
                        "f = getattr(diskimg, 'convert', None);"
                        "raise SystemExit(0 if callable(f) else 1)"],
                       capture_output=True)
    return r.returncode == 0


API_CONVERT = (
    "import sys, diskimg\n"
    "diskimg.convert(sys.argv[1], sys.argv[2], out_format=sys.argv[4], src_format=sys.argv[3])\n"
)

READINTO = (
    "import sys, diskimg\n"
    "buf = bytearray(1 << 20); mv = memoryview(buf)\n"
    "with diskimg.open(sys.argv[1], format=sys.argv[2]) as img:\n"
    "    off = 0\n"
    "    while off < img.size:\n"
    "        n = min(len(buf), img.size - off)\n"
    "        img.readinto(off, mv[:n]); off += n\n"
)


def make_jobs(work: Path, raw: Path, qcow: Path, size: int, qemu_img: str, qemu_io: str,
              api: bool) -> list[Job]:
    jobs: list[Job] = []
    diskimg_cli = [PY, "-m", "diskimg"]
    for name, src, sfmt, ofmt in (("convert raw->qcow2", raw, "raw", "qcow2"),
                                  ("convert qcow2->raw", qcow, "qcow2", "raw"),
                                  ("convert qcow2->qcow2", qcow, "qcow2", "qcow2")):
        args = ["convert", "-f", sfmt, "-O", ofmt, str(src)]
        ref = Variant("qemu-img", [qemu_img, *args, str(work / f"q.{ofmt}")],
                      work / f"q.{ofmt}", ofmt)
        cands = [Variant("diskimg CLI", [*diskimg_cli, *args, str(work / f"d.{ofmt}")],
                         work / f"d.{ofmt}", ofmt)]
        if api:
            cands.append(Variant("diskimg API", [PY, "-c", API_CONVERT, str(src),
                                                 str(work / f"a.{ofmt}"), sfmt, ofmt],
                                 work / f"a.{ofmt}", ofmt))
        jobs.append(Job(name, ref, cands, src, sfmt))
    reads = [c for off in range(0, size, MiB)
             for c in ("-c", f"read -q {off} {min(MiB, size - off)}")]
    jobs.append(Job(
        "sequential read qcow2 (1 MiB chunks)",
        Variant("qemu-io", [qemu_io, "-r", "-f", "qcow2", *reads, str(qcow)], None),
        [Variant("diskimg readinto", [PY, "-c", READINTO, str(qcow), "qcow2"], None)],
    ))
    return jobs


def verify(job: Job, v: Variant, qemu_img: str) -> str:
    """'' if the output of ``v`` has the same guest contents as the job's source."""
    if v.out is None or job.src is None:
        return ""
    r = subprocess.run([qemu_img, "compare", "-f", job.src_fmt, "-F", v.out_fmt,
                        str(job.src), str(v.out)], capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    return (r.stdout + r.stderr).strip().splitlines()[-1]


def run_jobs(jobs: list[Job], repeat: int, timeout: float, qemu_img: str) -> None:
    for job in jobs:
        print(f"== {job.name}", flush=True)
        variants = [job.reference, *job.candidates]
        for rnd in range(repeat):
            for v in variants:  # interleaved: A B A B ...
                if v.note:
                    continue
                if v.out is not None:
                    v.out.unlink(missing_ok=True)
                s = run_measured(v.cmd, timeout)
                if not s.ok:
                    v.note = f"skipped: {s.err}"
                    print(f"   {v.label}: {v.note}", flush=True)
                    continue
                if rnd == 0:
                    bad = verify(job, v, qemu_img)
                    if bad:
                        v.note = f"WRONG OUTPUT: {bad}"
                        print(f"   {v.label}: {v.note}", flush=True)
                        continue
                v.samples.append(s)
                print(f"   {v.label}: {s.seconds:.2f}s  {s.rss_kib / 1024:.0f} MiB", flush=True)
                if v.out is not None and rnd == repeat - 1:
                    v.out.unlink(missing_ok=True)


# --- report ----------------------------------------------------------------------------------


def _median(v: Variant) -> float | None:
    return statistics.median(s.seconds for s in v.samples) if v.samples else None


def _rss(v: Variant) -> str:
    return f"{max(s.rss_kib for s in v.samples) / 1024:.0f}" if v.samples else "-"


def report(jobs: list[Job], meta: dict[str, str]) -> str:
    lines = ["| job | reference | candidate | ref median s | cand median s | ratio (cand/ref) "
             "| ref peak RSS MiB | cand peak RSS MiB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        ref = job.reference
        rm = _median(ref)
        for c in job.candidates:
            cm = _median(c)
            ratio = f"**{cm / rm:.2f}**" if (cm is not None and rm) else "-"
            lines.append(
                f"| {job.name} | {ref.label} | {c.label} | "
                f"{'-' if rm is None else f'{rm:.2f}'} | {'-' if cm is None else f'{cm:.2f}'} "
                f"| {ratio} | {_rss(ref)} | {_rss(c)} | {c.note or ref.note} |")
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return textwrap.dedent("""\
        # Benchmark results

        Generated by `python benchmarks/bench.py` (see its docstring for the method). Ratios
        below 1 mean diskimg is faster. Times are wall-clock medians of interleaved runs on
        one machine; compare ratios, not absolute times, across machines.

        """) + head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="virtual size of the workload (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per job (median taken)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per single run")
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ns = ap.parse_args(argv)

    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("bench: qemu-img and qemu-io are needed (apt-get install qemu-utils)",
              file=sys.stderr)
        return 1
    size = parse_size(ns.size)
    work: Path = ns.workdir
    work.mkdir(parents=True, exist_ok=True)
    raw, qcow = work / "workload.raw", work / "workload.qcow2"
    try:
        t = time.perf_counter()
        counts = build_workload(raw, size, ns.seed)
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                       check=True)
        print(f"workload built in {time.perf_counter() - t:.1f}s: "
              + ", ".join(f"{k} {v // MiB} MiB" for k, v in counts.items()), flush=True)
        api = _has_api_convert()
        jobs = make_jobs(work, raw, qcow, size, qemu_img, qemu_io, api)
        run_jobs(jobs, ns.repeat, ns.timeout, qemu_img)
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)

    qv = subprocess.run([qemu_img, "--version"], capture_output=True, text=True).stdout
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "qemu-img": qv.splitlines()[0] if qv else "?",
        "workload": f"{size} bytes, seed {ns.seed}: "
                    + ", ".join(f"{k} {v // MiB} MiB" for k, v in counts.items()),
        "rounds": str(ns.repeat),
        "diskimg API convert": "measured" if api else "not exported by diskimg yet: skipped",
    }
    text = report(jobs, meta)
    print()
    print(text)
    ns.out.write_text(text)
    print(f"written to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
