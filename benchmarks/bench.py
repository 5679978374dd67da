#!/usr/bin/env python3
"""diskimg vs qemu-img (and the libyal C readers) on a seeded GiB-scale workload.

    python benchmarks/bench.py                  # 1 GiB, 3 rounds, writes benchmarks/results.md
    python benchmarks/bench.py --quick          # 256 MiB
    python benchmarks/bench.py --only 'convert -c' --repeat 5
    python benchmarks/bench.py --baseline /tmp/base/src   # also time another diskimg tree

The input is a sparse raw file mixing, by 1 MiB chunk (seeded): 16% random data, 24%
compressible text-like data, 12% written zeros, 48% holes (issue 7's proportions).  Derived
inputs (qcow2, zlib- and zstd-compressed qcow2, monolithicSparse and streamOptimized vmdk) are
made once with qemu-img, untimed.

Every job is a set of child processes, run interleaved (ref, candidate, ref, candidate, ...
in each round) and compared by the medians of ``--repeat`` rounds, so a load spike hits
both sides alike.  Peak RSS is the child's, interpreter start-up included, measured the
same way for every tool: the child's VmHWM polled from /proc every 2 ms (``ru_maxrss`` from
``wait4`` would be floored at the benchmark's own peak, since Linux carries the forking
process's high-water mark across exec).  Inputs are synced and read once before the jobs
(warm page cache, as in issue 7's numbers), and ``sync`` runs (untimed) before every timed
run, so no run pays for the previous one's dirty pages.  Each job starts with ``--warmup``
untimed rounds (default 1): on the shared VMs this was written on, the first round of a
job was up to 4x slower for every tool alike.  The 1-minute load average is recorded before
and after each job and shown next to it: treat rows measured under a load above the core
count with suspicion.  Both diskimg trees are byte-compiled before the jobs.  The child's
CPU time (user + system) is reported as a second ratio.

Each job names its references and, per reference, issue 7's target ratio (diskimg time /
reference time); a ratio is "met" when it is at or below the target.  Peak RSS has its own
target (64 MiB).  Every converted output is checked once with ``qemu-img compare`` (untimed);
a variant whose output differs is reported as WRONG, not timed.  A tool that is missing
(libqcow-python, libvmdk-python: ``pip install libqcow-python libvmdk-python``; they are
benchmark-only, never diskimg dependencies) or a job diskimg cannot run is skipped with a
note.

LUKS (issue 20 item 3: at most 1.5x qemu-img): the same workload converted raw -> qcow2 with
``encrypt.format=luks`` and a LUKS qcow2 (made once by qemu-img) -> raw, both tools given the
secret with ``--object secret,...``; ``encrypt.iter-time=10`` keeps PBKDF2 (which both tools
time to the same budget) from dominating what is meant to be data throughput.

Reads: every reader reads every byte of the virtual disk in 1 MiB chunks into a buffer and
discards it.  diskimg is timed twice: into a ``bytearray`` (which the kernel would fill
slowly, so diskimg reads large runs a few KiB further into it and moves them down: one
more copy) and into ``diskimg.aligned_buffer`` (filled directly).  qemu-io is given one
``read`` command per MiB; it allocates and pattern-fills a bounce buffer per command, so it
is a slightly pessimistic reference.

Start-up floor (issue 20 item 1): ``python -c pass`` with the interpreter (venv) that runs
diskimg is the floor; ``python -I -S -c pass`` (no site-packages, no ``.pth`` hooks), ``python
-c 'import diskimg'``, ``diskimg --version`` and ``diskimg info/check/map`` of a 64 MiB qcow2
are timed beside it (and ``--version`` and ``info`` run by ``python -c`` calling
``diskimg.cli.main.main``: the CLI without any launcher script; the installed
``bin/diskimg`` is diskimg's plain script, scripts/diskimg, not pip's console-script
launcher, which imports ``re``),
each against the whole of ``qemu-img info`` on that image, and the
results file gives each row's excess over the floor in ms (target: at most 10 ms) and ``import
diskimg``'s ``-X importtime`` cumulative time (target: at most 5 ms).  These rows do not
depend on ``--size``: ``--only start-up --size 64M`` measures them alone, quickly.

Results files: ``benchmarks/results.md`` for the default 1 GiB workload, ``results-SIZE.md``
(``results-256M.md``, ``results-2G.md``) for another ``--size``/``--quick``, so the
small-image and the large-image tables sit side by side.  Each records the machine (CPU
model, CPUs usable, kernel), the load average before and after (and per job), the Python
interpreter (and whether it is a venv) and the qemu-img version.

Noise: on a VM whose disk is shared, the convert rows that write ~1 GiB swing 2-4x between
rounds (the host's write-back throttles whichever run follows a large write).  Pass
``--workdir /dev/shm/bench`` (tmpfs: the page cache without a disk behind it, ~5 GiB for the
2 GiB workload) to measure the tools rather than the disk.  Even on tmpfs, some rounds of
the large converts take 1.5x to 7x their variant's fastest, for every tool, in the system
time of their writes: the round-spread table at the end of the results shows how many
rounds of each variant were hit.

Scale (issue 7): the same 100 MiB in a 1 GiB-virtual and a 16 TiB-virtual qcow2; convert,
map and check of the big one are timed against the same diskimg command on the small one
(target 1.5: cost follows allocated data, not virtual size), qemu-img on the big one is
shown for information.

Floor per row (issue 20 item 2): every job with a Python candidate also runs ``python -c
pass`` in its rounds; the table gives its median and the row's ratio net of it, (candidate -
floor) / reference (the floor is taken off the Python readers libqcow- and
libvmdk-python too), so a miss at a small size shows how much of it is the interpreter's
start-up alone.

``--baseline SRC`` adds, for every diskimg variant, the same command run with
``PYTHONPATH=SRC`` (e.g. ``git archive HEAD src | tar -x -C /tmp/base``), interleaved in the
same rounds: before/after numbers measured under the same conditions.
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
REPO = HERE.parent
MiB = 1 << 20
PY = sys.executable
RSS_TARGET_MIB = 64


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
    cpu: float = 0.0  # user + system seconds of the child


def run_measured(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Sample:
    """Run ``cmd``; wall time and the child's peak RSS (KiB) from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env)
    deadline = t0 + timeout
    hwm = 0
    status_path = f"/proc/{p.pid}/status"
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        hwm = max(hwm, _vm_hwm(status_path))
        if time.perf_counter() > deadline:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            return Sample(time.perf_counter() - t0, hwm or ru.ru_maxrss, False, "timeout",
                          ru.ru_utime + ru.ru_stime)
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    ok = p.returncode == 0
    # ru_maxrss is floored at this process's own peak (Linux keeps the high-water mark of
    # the forking process's memory across exec), so the polled VmHWM of the child's own
    # address space is used when there is one; it can miss only the last 2 ms of a run
    rss = hwm if hwm else ru.ru_maxrss
    return Sample(dt, rss, ok, "" if ok else (err.splitlines() or ["?"])[-1],
                  ru.ru_utime + ru.ru_stime)


def _vm_hwm(status_path: str) -> int:
    """VmHWM (peak RSS, KiB) of a running process from /proc, 0 when unavailable."""
    try:
        with open(status_path, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Variant:
    label: str
    cmd: list[str]
    out: Path | None = None  # output image to verify and delete, if any
    out_fmt: str = "raw"
    env: dict[str, str] | None = None
    diskimg: bool = False    # a diskimg variant (gets a baseline twin with --baseline)
    samples: list[Sample] = field(default_factory=list)
    note: str = ""
    #: instructions one run executes (valgrind cachegrind; start-up rows), when measured
    instructions: int | None = None
    #: extra attempts after a failure; qemu-img's PBKDF2 calibration sometimes fails with
    #: "Unable to get accurate CPU usage" (coarse thread CPU clock), so LUKS creation is retried
    retries: int = 0


@dataclass
class Job:
    name: str
    refs: list[Variant]
    cands: list[Variant]
    targets: dict[str, float]           # reference label -> target ratio
    src: Path | None = None
    src_fmt: str = "raw"
    load: tuple[float, float] = (0.0, 0.0)
    encrypted: tuple[bool, bool] = (False, False)  # (source, output) need LUKS_SECRET
    #: ``python -c pass`` run in the same rounds (the start-up floor of the Python
    #: candidates, see :func:`add_floors`); not a row of its own
    floor: Variant | None = None


# child-process scripts (argv: see each).  convert's source-format keyword is format=
# (issue 16); a --baseline tree from before it only knows src_format=, so the scripts ask
# the parameters of the tree they run with (SRC_KW) rather than trigger its warning.  They
# import nothing diskimg does not: the parameters are read from the function's code
# object, not with inspect (which loads ast, dis, tokenize, enum and re: about 8 ms of
# CPU, most of what made the API rows slower than the CLI rows), and json only for the
# jobs that pass keywords (the plain converts pass none)
SRC_KW = """\
_code = diskimg.convert.__code__
SRC_KW = "format" if "format" in \\
    _code.co_varnames[: _code.co_argcount + _code.co_kwonlyargcount] else "src_format"
"""

API_CONVERT = """\
import sys, diskimg
""" + SRC_KW + """\
src, dst, sfmt, ofmt, extra = sys.argv[1:6]
kw = {}
if extra != "{}":
    import json
    kw = json.loads(extra)
diskimg.convert(src, dst, out_format=ofmt, **{SRC_KW: sfmt}, **kw)
"""

API_STREAM = """\
import sys, diskimg
from diskimg.vmdk import write_stream_optimized
with diskimg.open(sys.argv[1], format=sys.argv[2]) as src:
    write_stream_optimized(src, sys.argv[3])
"""

LUKS_SECRET = "benchmark-passphrase"
LUKS_TARGET = 1.5  # issue 20 item 3
LUKS_OBJECT = f"secret,id=sec0,data={LUKS_SECRET}"
LUKS_CREATE = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"

API_LUKS_WRITE = """\
import sys, diskimg
""" + SRC_KW + """\
diskimg.convert(sys.argv[1], sys.argv[2], out_format="qcow2", **{SRC_KW: "raw"},
                secrets={"sec0": sys.argv[3].encode()},
                options={"encrypt.format": "luks", "encrypt.key-secret": "sec0",
                         "encrypt.iter-time": "10"})
"""

API_LUKS_READ = """\
import sys, diskimg
with diskimg.open(sys.argv[1], format="qcow2", secrets={"sec0": sys.argv[3].encode()},
                  options={"encrypt.key-secret": "sec0"}) as src:
    diskimg.convert(src, sys.argv[2], out_format="raw")
"""


def image_opts(path: Path, fmt: str, encrypted: bool) -> str:
    """qemu's ``--image-opts`` spelling of an image (with the LUKS key when encrypted)."""
    return f"driver={fmt},file.filename={path}" + (",encrypt.key-secret=sec0"
                                                   if encrypted else "")


READINTO = """\
import sys, diskimg
buf = bytearray(1 << 20); mv = memoryview(buf)
with diskimg.open(sys.argv[1], format=sys.argv[2]) as img:
    off, size = 0, img.size
    while off < size:
        n = min(len(buf), size - off)
        img.readinto(off, mv[:n]); off += n
"""

# the same loop into diskimg.aligned_buffer: the kernel fills it directly (a bytearray
# of this size sits 16 bytes past a page boundary: large reads into it land a few KiB on
# and are moved down in place)
READINTO_ALIGNED = READINTO.replace("bytearray(1 << 20)", "diskimg.aligned_buffer(1 << 20)")

PYQCOW_READ = """\
import sys, pyqcow
f = pyqcow.file(); f.open(sys.argv[1])
size, off = f.get_media_size(), 0
while off < size:
    n = min(1 << 20, size - off); f.read_buffer_at_offset(n, off); off += n
f.close()
"""

PYVMDK_READ = """\
import sys, pyvmdk
h = pyvmdk.handle(); h.open(sys.argv[1]); h.open_extent_data_files()
size, off = h.get_media_size(), 0
while off < size:
    n = min(1 << 20, size - off); h.read_buffer_at_offset(n, off); off += n
h.close()
"""


def _importable(mod: str) -> bool:
    return subprocess.run([PY, "-c", f"import {mod}"], capture_output=True).returncode == 0


def make_jobs(work: Path, inputs: dict[str, Path], size: int, qemu_img: str,
              qemu_io: str) -> list[Job]:
    jobs: list[Job] = []
    # the CLI as a user runs it: the command installed beside the interpreter
    # (scripts/diskimg); ``python -m diskimg`` (runpy: ~4 ms more) where there is none
    script = Path(PY).with_name("diskimg")
    cli = [str(script)] if script.is_file() else [PY, "-m", "diskimg"]
    raw, qcow = inputs["raw"], inputs["qcow2"]

    def convert_job(name: str, src: Path, sfmt: str, ofmt: str, qargs: list[str],
                    dargs: list[str], api_kw: str | None, target: float,
                    with_w: bool = False, stream_api: bool = False) -> Job:
        ext = "vmdk" if ofmt == "vmdk" else ofmt
        q_out, d_out, a_out = (work / f"{p}.{ext}" for p in ("q", "d", "a"))
        base = ["convert", "-f", sfmt, "-O", ofmt]
        refs = [Variant("qemu-img", [qemu_img, *base, *qargs, str(src), str(q_out)],
                        q_out, ofmt)]
        targets = {"qemu-img": target}
        if with_w:  # informational: issue 7 sets targets against the default (no -W)
            w_out = work / f"w.{ext}"
            refs.append(Variant("qemu-img -W", [qemu_img, *base, "-W", *qargs, str(src),
                                                str(w_out)], w_out, ofmt))
        cands = [Variant("diskimg CLI", [*cli, *base, *dargs, str(src), str(d_out)], d_out,
                         ofmt, diskimg=True)]
        if api_kw is not None:
            cands.append(Variant("diskimg API", [PY, "-c", API_CONVERT, str(src), str(a_out),
                                                 sfmt, ofmt, api_kw], a_out, ofmt,
                                 diskimg=True))
        if stream_api:
            cands.append(Variant("diskimg API write_stream_optimized",
                                 [PY, "-c", API_STREAM, str(src), sfmt, str(a_out)], a_out,
                                 ofmt, diskimg=True))
        return Job(name, refs, cands, targets, src, sfmt)

    jobs.append(convert_job("convert raw->qcow2", raw, "raw", "qcow2", [], [], "{}", 1.0))
    jobs.append(convert_job("convert qcow2->raw", qcow, "qcow2", "raw", [], [], "{}", 1.0))
    jobs.append(convert_job("convert qcow2->qcow2", qcow, "qcow2", "qcow2", [], [], "{}",
                            1.0))
    jobs.append(convert_job("convert -c zlib raw->qcow2", raw, "raw", "qcow2", ["-c"], ["-c"],
                            '{"compress": true}', 0.7, with_w=True))
    jobs.append(convert_job("convert -c zstd raw->qcow2", raw, "raw", "qcow2",
                            ["-c", "-o", "compression_type=zstd"],
                            ["-c", "-o", "compression_type=zstd"],
                            '{"compress": true, "options": {"compression_type": "zstd"}}',
                            0.8, with_w=True))
    jobs.extend(convert_job(f"convert {codec}-compressed qcow2->raw", inputs[f"qcow2-{codec}"],
                            "qcow2", "raw", [], [], "{}", 1.0) for codec in ("zlib", "zstd"))
    luks = inputs["qcow2-luks"]
    q_out, d_out, a_out = (work / f"{p}.qcow2" for p in ("lq", "ld", "la"))
    enc = ["convert", "--object", LUKS_OBJECT, "-f", "raw", "-O", "qcow2", "-o", LUKS_CREATE]
    jobs.append(Job("convert raw->qcow2 LUKS (aes-256-xts)",
                    [Variant("qemu-img", [qemu_img, *enc, str(raw), str(q_out)], q_out,
                             "qcow2", retries=3)],
                    [Variant("diskimg CLI", [*cli, *enc, str(raw), str(d_out)], d_out, "qcow2",
                             diskimg=True),
                     Variant("diskimg API", [PY, "-c", API_LUKS_WRITE, str(raw), str(a_out),
                                             LUKS_SECRET], a_out, "qcow2", diskimg=True)],
                    {"qemu-img": LUKS_TARGET}, raw, "raw", encrypted=(False, True)))
    q_out, d_out, a_out = (work / f"{p}.raw" for p in ("lq", "ld", "la"))
    dec = ["convert", "--object", LUKS_OBJECT, "--image-opts", image_opts(luks, "qcow2", True),
           "-O", "raw"]
    jobs.append(Job("convert LUKS qcow2->raw (aes-256-xts)",
                    [Variant("qemu-img", [qemu_img, *dec, str(q_out)], q_out)],
                    [Variant("diskimg CLI", [*cli, *dec, str(d_out)], d_out, diskimg=True),
                     Variant("diskimg API", [PY, "-c", API_LUKS_READ, str(luks), str(a_out),
                                             LUKS_SECRET], a_out, diskimg=True)],
                    {"qemu-img": LUKS_TARGET}, luks, "qcow2",
                    encrypted=(True, False)))
    jobs.append(convert_job("convert raw->vmdk monolithicSparse", raw, "raw", "vmdk", [], [],
                            "{}", 1.0))
    jobs.append(convert_job("convert vmdk->raw", inputs["vmdk"], "vmdk", "raw", [], [], "{}",
                            1.0))
    jobs.append(convert_job("convert streamOptimized vmdk->raw", inputs["vmdk-stream"], "vmdk",
                            "raw", [], [], "{}", 1.0))
    jobs.append(convert_job("convert raw->vmdk streamOptimized", raw, "raw", "vmdk",
                            ["-o", "subformat=streamOptimized"],
                            ["-o", "subformat=streamOptimized"], None, 0.6, stream_api=True))

    def qemu_io_reads(path: Path, fmt: str) -> Variant:
        reads = [c for off in range(0, size, MiB)
                 for c in ("-c", f"read -q {off} {min(MiB, size - off)}")]
        return Variant("qemu-io", [qemu_io, "-r", "-f", fmt, *reads, str(path)])

    def readers(path: Path, fmt: str) -> list[Variant]:
        return [Variant("diskimg readinto", [PY, "-c", READINTO, str(path), fmt],
                        diskimg=True),
                Variant("diskimg readinto aligned_buffer",
                        [PY, "-c", READINTO_ALIGNED, str(path), fmt], diskimg=True)]

    have_qcow, have_vmdk = _importable("pyqcow"), _importable("pyvmdk")
    refs = [qemu_io_reads(qcow, "qcow2")]
    targets = {"qemu-io": 1.0}
    if have_qcow:
        refs.insert(0, Variant("libqcow-python", [PY, "-c", PYQCOW_READ, str(qcow)]))
        targets = {"libqcow-python": 1.0}
    jobs.append(Job("read qcow2 (1 MiB sequential)", refs, readers(qcow, "qcow2"), targets))
    for codec in ("zlib", "zstd"):
        p = inputs[f"qcow2-{codec}"]
        jobs.append(Job(f"read {codec}-compressed qcow2", [qemu_io_reads(p, "qcow2")],
                        readers(p, "qcow2"), {"qemu-io": 1.0}))
    vm = inputs["vmdk"]
    refs = [qemu_io_reads(vm, "vmdk")]
    targets = {"qemu-io": 1.0}
    if have_vmdk:
        refs.insert(0, Variant("libvmdk-python", [PY, "-c", PYVMDK_READ, str(vm)]))
        targets = {"libvmdk-python": 1.0}
    jobs.append(Job("read sparse vmdk (1 MiB sequential)", refs, readers(vm, "vmdk"),
                    targets))
    for name, args in (("info", ["info", "-f", "qcow2"]),
                       ("check", ["check", "-f", "qcow2"]),
                       ("map --output=json", ["map", "--output=json", "-f", "qcow2"])):
        jobs.append(Job(f"{name} (whole process)",
                        [Variant("qemu-img", [qemu_img, *args, str(qcow)])],
                        [Variant("diskimg CLI", [*cli, *args, str(qcow)], diskimg=True)],
                        {"qemu-img": 2.0}))
    jobs.append(floor_job(work, qemu_img, qemu_io, cli))
    jobs.extend(scale_jobs(work, qemu_img, qemu_io, cli))
    return jobs


#: the start-up rows' targets (issue 20 item 1): each whole diskimg command at most this many
#: ms above the ``python -c pass`` floor; ``import diskimg`` at most IMPORT_TARGET_MS of
#: ``-X importtime`` cumulative time
FLOOR_TARGET_MS = 10.0
IMPORT_TARGET_MS = 5.0
FLOOR_LABEL = "python -c pass"


def floor_job(work: Path, qemu_img: str, qemu_io: str, cli: list[str]) -> Job:
    """Start-up (issue 20 item 1): what a Python process costs before diskimg does any
    work, and the whole-process commands on a small image, each against the whole of
    ``qemu-img info`` on it.  ``python -c pass`` is the floor, run with the interpreter
    (venv) that runs diskimg; ``python -I -S -c pass`` (no site-packages, no ``.pth``
    start-up hooks, no environment) is shown beside it.  The report gives each row's excess
    over the floor in ms (:func:`floor_report`)."""
    small = work / "small.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(small), "64M"], check=True)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -q -P 0x5a 1M 64k", str(small)],
                   check=True)
    vmdk, raw = work / "small.vmdk", work / "small.raw"
    subprocess.run([qemu_img, "create", "-q", "-f", "vmdk", str(vmdk), "64M"], check=True)
    subprocess.run([qemu_io, "-f", "vmdk", "-c", "write -q -P 0x5a 1M 64k", str(vmdk)],
                   check=True)
    raw.write_bytes(b"\x5a" * (1 << 20))
    cmds = (("info", ["info", "-f", "qcow2"], small),
            ("check", ["check", "-f", "qcow2"], small),
            ("map", ["map", "-f", "qcow2"], small), ("info of a vmdk", ["info"], vmdk),
            ("map of a vmdk", ["map"], vmdk), ("check of a vmdk", ["check"], vmdk),
            ("convert 1 MiB raw to qcow2", ["convert", "-O", "qcow2", str(raw),
                                            str(work / "small-out.qcow2")], None))
    # how a user runs it: the script installed beside the interpreter (scripts/diskimg,
    # which imports nothing but the CLI); ``python -m diskimg`` (runpy: contextlib,
    # collections, functools) otherwise
    script = Path(PY).with_name("diskimg")
    how, also = "python -m diskimg", []
    # the CLI without a launcher: what bin/diskimg should cost (runpy, for -m, loads
    # importlib.util and contextlib)
    bare = [PY, "-c", "from diskimg.cli.main import run; run()"]
    also = [Variant("diskimg --version (no launcher)", [*bare, "--version"], diskimg=True),
            Variant("diskimg info (no launcher)", [*bare, "info", "-f", "qcow2", str(small)],
                    diskimg=True)]
    if script.is_file():
        also.append(Variant(f"diskimg --version ({how})", [*cli, "--version"], diskimg=True))
        cli, how = [str(script)], "bin/diskimg"
    return Job("start-up floor",
               [Variant("qemu-img info", [qemu_img, "info", "-f", "qcow2", str(small)])],
               [Variant("python -I -S -c pass", [PY, "-I", "-S", "-c", "pass"]),
                Variant(FLOOR_LABEL, [PY, "-c", "pass"]),
                Variant("python -c 'import diskimg'", [PY, "-c", "import diskimg"],
                        diskimg=True),
                Variant(f"diskimg --version ({how})", [*cli, "--version"], diskimg=True),
                *also,
                *(Variant(f"diskimg {name} ({how})",
                          [*cli, *args, *([str(path)] if path else [])], diskimg=True)
                  for name, args, path in cmds),
                # pip's console-script launcher alone, for comparison: it imports re and
                # runs one re.sub before it imports the CLI (distlib's template, which a
                # [project.scripts] entry point got; diskimg now ships a plain script)
                Variant("pip launcher alone (import re, re.sub)",
                        [PY, "-c", "import re, sys; "
                         "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])"])],
               {})


def count_instructions(job: Job) -> None:
    """Each start-up row's instructions, from one run under valgrind's cachegrind (without
    its cache simulation): unlike a clock, the count is the same from run to run (within
    about 0.2%) whatever else the machine does, so it shows what a change did when the
    machine's speed moves the clocks by more than the change.  Skipped without valgrind."""
    if shutil.which("valgrind") is None:
        return
    for v in [*job.refs, *job.cands]:
        r = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                            "--cachegrind-out-file=/dev/null", *v.cmd],
                           capture_output=True, text=True, env=v.env, check=False)
        refs = [line for line in r.stderr.splitlines() if "I   refs:" in line
                or "I refs:" in line]
        if r.returncode == 0 and refs:
            v.instructions = int(refs[-1].split(":")[1].replace(",", ""))


def import_time_ms(env: dict[str, str] | None = None, rounds: int = 9) -> float:
    """Median over ``rounds`` fresh interpreters of ``import diskimg``'s cumulative time
    as ``python -X importtime`` reports it, in ms."""
    out = []
    for _ in range(rounds):
        r = subprocess.run([PY, "-X", "importtime", "-c", "import diskimg"],
                           capture_output=True, text=True, env=env, check=True)
        line = [x for x in r.stderr.splitlines() if x.rstrip().endswith("| diskimg")][-1]
        out.append(int(line.split("|")[1]) / 1000)
    return statistics.median(out)


def floor_report(jobs: list[Job], imports: dict[str, float]) -> str:
    """The start-up table: each row's median, its ratio to ``qemu-img info`` and its
    excess over the ``python -c pass`` floor (the target: at most FLOOR_TARGET_MS)."""
    job = next((j for j in jobs if j.name == "start-up floor"), None)
    if job is None:
        return ""
    ref = job.refs[0]
    rm = _median(ref)
    floor = next((c for c in job.cands if c.label == FLOOR_LABEL), None)
    fl = _median(floor) if floor is not None else None
    fcpu = _cpu(floor) if floor is not None else None
    lines = ["| row | median ms | ratio to qemu-img info | above `python -c pass` ms "
             "| target | met | CPU ms | CPU above floor ms | peak RSS MiB "
             "| instructions M | above floor M | ≈ ms at the floor's rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| qemu-img info (64 MiB qcow2) | {_ms(rm)} | 1.00 | - | - | | {_ms(_cpu(ref))} "
             f"| - | {_rss_s(ref)} | {_mi(ref.instructions)} | - | - |"]
    fins = floor.instructions if floor is not None else None
    #: instructions per CPU second of ``python -c pass``: turns a count into a time
    rate = fins / fcpu if fins and fcpu else None
    for c in job.cands:
        cm, ccpu = _median(c), _cpu(c)
        above = cm - fl if cm is not None and fl is not None else None
        cabove = ccpu - fcpu if ccpu is not None and fcpu is not None else None
        target = FLOOR_TARGET_MS if c.diskimg and "import" not in c.label else None
        met = "" if target is None or above is None else \
            "yes" if above * 1000 <= target else "no"
        is_floor = c.label == FLOOR_LABEL
        lines.append(f"| {c.label} | {_ms(cm)} | "
                     f"{'-' if cm is None or not rm else f'{cm / rm:.2f}'} | "
                     f"{'-' if above is None or is_floor else f'{above * 1000:+.1f}'}"
                     f" | {'-' if target is None else f'≤ {target:.0f}'} | {met} | "
                     f"{_ms(ccpu)} | "
                     f"{'-' if cabove is None or is_floor else f'{cabove * 1000:+.1f}'} | "
                     f"{_rss_s(c)} | {_mi(c.instructions)} | {_mi_above(c, fins, is_floor)} "
                     f"| {_ms_at(c, fins, rate, is_floor)} |")
    for label, ms in imports.items():
        lines.append(f"| {label} | {ms:.1f} | - | - | ≤ {IMPORT_TARGET_MS:.0f} | "
                     f"{'yes' if ms <= IMPORT_TARGET_MS else 'no'} | - | - | - | - | - | - |")
    return ("\n## Start-up floor\n\nWhole processes on a 64 MiB qcow2 (one 64 KiB cluster "
            "written), interleaved; `python -c pass` is the same "
            f"interpreter that runs diskimg ({PY}). Target (issue 20): each diskimg command at "
            f"most {FLOOR_TARGET_MS:.0f} ms above that floor, `import diskimg` at most "
            f"{IMPORT_TARGET_MS:.0f} ms of `python -X importtime` cumulative time (median of "
            "9 interpreters). The CPU columns (user + system time of the child, medians) "
            "are less disturbed by other load than the wall-clock ones; the instruction "
            "counts (one run each under valgrind's cachegrind) are not disturbed at all, "
            "and the last column turns a row's count above the floor into CPU time at the "
            "floor's own instructions per CPU ms. Load: "
            f"{job.load[0]:.2f} before, {job.load[1]:.2f} after."
            "\n\n" + "\n".join(lines) + "\n")


def _mi(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _mi_above(c: Variant, floor: int | None, is_floor: bool) -> str:
    if c.instructions is None or floor is None or is_floor:
        return "-"
    return f"{(c.instructions - floor) / 1e6:+.1f}"


def _ms_at(c: Variant, floor: int | None, rate: float | None, is_floor: bool) -> str:
    if c.instructions is None or floor is None or rate is None or is_floor:
        return "-"
    return f"{(c.instructions - floor) / rate * 1000:+.1f}"


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1000:.1f}"


def _rss_s(v: Variant) -> str:
    r = _rss(v)
    return "-" if r is None else f"{r:.0f}"


SCALE_DATA_PIECES = 10  # 10 x 10 MiB = issue 7's 100 MiB


def scale_jobs(work: Path, qemu_img: str, qemu_io: str, cli: list[str]) -> list[Job]:
    """Issue 7's scale rows: the same 100 MiB (ten 10 MiB pieces of distinct patterns)
    spread over a 1 GiB-virtual and a 16 TiB-virtual qcow2 (both made by qemu-io, untimed);
    diskimg on the 16 TiB image against diskimg on the 1 GiB one (target 1.5), with
    qemu-img on the 16 TiB image for information."""
    imgs = {}
    for label, virt in (("1g", 1 << 30), ("16t", 16 << 40)):
        p = work / f"scale-{label}.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(p), str(virt)], check=True)
        step = virt // SCALE_DATA_PIECES
        cmds = [c for k in range(SCALE_DATA_PIECES)
                for c in ("-c", f"write -q -P {0x11 * (k + 1)} {k * step} 10M")]
        subprocess.run([qemu_io, "-f", "qcow2", *cmds, str(p)], check=True)
        imgs[label] = p
    jobs = []
    for name, args, out in (("convert -O qcow2", ["convert", "-f", "qcow2", "-O", "qcow2"],
                             True),
                            ("map --output=json", ["map", "--output=json", "-f", "qcow2"],
                             False),
                            ("check", ["check", "-f", "qcow2"], False)):
        def cmd(tool: list[str], label: str) -> tuple[list[str], Path | None]:
            o = work / f"scale-out-{tool[-1].rsplit('/', 1)[-1]}-{label}.qcow2" if out else None
            return [*tool, *args, str(imgs[label]), *([str(o)] if o else [])], o

        small, small_out = cmd(cli, "1g")
        big, big_out = cmd(cli, "16t")
        qbig, qbig_out = cmd([qemu_img], "16t")
        jobs.append(Job(f"scale: {name}, 100 MiB in 16 TiB vs 1 GiB virtual",
                        [Variant("diskimg CLI on 1 GiB virtual", small, small_out, "qcow2"),
                         Variant("qemu-img on 16 TiB virtual", qbig, qbig_out, "qcow2")],
                        [Variant("diskimg CLI on 16 TiB virtual", big, big_out, "qcow2",
                                 diskimg=True)],
                        {"diskimg CLI on 1 GiB virtual": 1.5}))
    return jobs


def _is_python(v: Variant) -> bool:
    """Whether ``v`` runs in this Python (``python ...`` or the installed ``diskimg``
    script, whose interpreter is PY): its start-up floor is ``python -c pass``."""
    return v.cmd[0] in (PY, str(Path(PY).with_name("diskimg")))


def add_floors(jobs: list[Job]) -> None:
    """Give every job with a Python candidate the floor variant (``python -c pass``), timed
    interleaved with it: the report shows each such row's ratio net of the floor, i.e. how
    much of a miss the interpreter's start-up alone accounts for (issue 20 item 2)."""
    for job in jobs:
        if job.name != "start-up floor" and any(_is_python(c) for c in job.cands):
            job.floor = Variant(FLOOR_LABEL, [PY, "-c", "pass"])


def add_baseline(jobs: list[Job], src: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(src))
    for job in jobs:
        job.cands.extend([_twin(c, env, src.parent / "scripts" / "diskimg")
                          for c in job.cands if c.diskimg])


def _twin(c: Variant, env: dict[str, str], script: Path) -> Variant:
    """``c`` run with another diskimg tree (its own output file); the installed
    ``diskimg`` command becomes that tree's own script (``scripts/diskimg``, run by the
    same interpreter), whose entry point matches the tree's CLI."""
    out = c.out.with_name("b" + c.out.name) if c.out is not None else None
    cmd = [str(out) if c.out is not None and a == str(c.out) else a for a in c.cmd]
    if cmd and cmd[0] == str(Path(PY).with_name("diskimg")) and script.is_file():
        cmd = [PY, str(script), *cmd[1:]]
    return Variant(c.label + " @baseline", cmd, out, c.out_fmt, env)


def verify(job: Job, v: Variant, qemu_img: str) -> str:
    """'' if the output of ``v`` has the same guest contents as the job's source."""
    if v.out is None or job.src is None:
        return ""
    if any(job.encrypted):
        cmd = [qemu_img, "compare", "--object", LUKS_OBJECT, "--image-opts",
               image_opts(job.src, job.src_fmt, job.encrypted[0]),
               image_opts(v.out, v.out_fmt, job.encrypted[1])]
    else:
        cmd = [qemu_img, "compare", "-f", job.src_fmt, "-F", v.out_fmt, str(job.src),
               str(v.out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    return (r.stdout + r.stderr).strip().splitlines()[-1]


def run_jobs(jobs: list[Job], repeat: int, timeout: float, qemu_img: str,
             warmup: int = 1) -> None:
    for job in jobs:
        print(f"== {job.name}  (load {os.getloadavg()[0]:.2f})", flush=True)
        l0 = os.getloadavg()[0]
        variants = [*job.refs, *job.cands, *([job.floor] if job.floor else [])]
        for _ in range(warmup):  # untimed: the first round of a job is slow for every tool
            for v in variants:
                if v.out is not None:
                    v.out.unlink(missing_ok=True)
                run_measured(v.cmd, timeout, v.env)
        for rnd in range(repeat):
            for v in variants:  # interleaved: A B A B ...
                if v.note:
                    continue
                for _attempt in range(1 + v.retries):
                    if v.out is not None:
                        v.out.unlink(missing_ok=True)
                    os.sync()  # every run starts with no dirty pages left by the last one
                    s = run_measured(v.cmd, timeout, v.env)
                    if s.ok:
                        break
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
                print(f"   {v.label}: {s.seconds:.3f}s (cpu {s.cpu:.2f}s)  "
                      f"{s.rss_kib / 1024:.0f} MiB", flush=True)
                if v.out is not None and rnd == repeat - 1:
                    v.out.unlink(missing_ok=True)
        job.load = (l0, os.getloadavg()[0])


# --- report ----------------------------------------------------------------------------------


def _median(v: Variant) -> float | None:
    return statistics.median(s.seconds for s in v.samples) if v.samples else None


def _cpu(v: Variant) -> float | None:
    return statistics.median(s.cpu for s in v.samples) if v.samples else None


def _rss(v: Variant) -> float | None:
    return max(s.rss_kib for s in v.samples) / 1024 if v.samples else None


def _secs(t: float | None) -> str:
    """A median in seconds: milliseconds shown for the sub-second start-up rows."""
    return "-" if t is None else f"{t:.2f}" if t >= 0.1 else f"{t:.4f}"


def report(jobs: list[Job], meta: dict[str, str]) -> str:
    lines = ["| job | candidate | reference | cand median s | ref median s | ratio | target "
             "| met | CPU-time ratio | cand peak RSS MiB | ref peak RSS MiB | load before/after "
             "| floor s | ratio net of floor | CPU-time ratio net of floor | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    met = missed = 0
    for job in jobs:
        fm = _median(job.floor) if job.floor is not None else None
        fcpu = _cpu(job.floor) if job.floor is not None else None
        for c in job.cands:
            cm, crss, ccpu = _median(c), _rss(c), _cpu(c)
            for ref in job.refs:
                rm, rrss, rcpu = _median(ref), _rss(ref), _cpu(ref)
                cpu_ratio = f"{ccpu / rcpu:.2f}" if (ccpu is not None and rcpu) else "-"
                target = job.targets.get(ref.label)
                ratio = cm / rm if (cm is not None and rm) else None
                # the ratio without the interpreter's start-up: (candidate - floor) / ref,
                # the floor taken off a Python reference (libqcow/libvmdk-python) too
                net = None
                if ratio is not None and rm is not None and fm is not None \
                        and _is_python(c):
                    rnet = rm - fm if _is_python(ref) else rm
                    net = (cm - fm) / rnet if (cm is not None and rnet > 0) else None
                # the same with CPU times (user + system): less sensitive to other load
                cnet = None
                if net is not None and ccpu is not None and rcpu and fcpu is not None:
                    rcnet = rcpu - fcpu if _is_python(ref) else rcpu
                    cnet = (ccpu - fcpu) / rcnet if rcnet > 0 else None
                ok = ""
                if ratio is not None and target is not None:
                    good = ratio <= target and crss is not None and crss <= RSS_TARGET_MIB
                    ok = "yes" if good else "no"
                    if "@baseline" not in c.label:
                        met, missed = met + good, missed + (not good)
                lines.append(
                    f"| {job.name} | {c.label} | {ref.label} | "
                    f"{_secs(cm)} | {_secs(rm)} | "
                    f"{'-' if ratio is None else f'**{ratio:.2f}**'} | "
                    f"{'-' if target is None else f'≤ {target:.2f}'} | {ok} | {cpu_ratio} | "
                    f"{'-' if crss is None else f'{crss:.0f}'} | "
                    f"{'-' if rrss is None else f'{rrss:.0f}'} | "
                    f"{job.load[0]:.1f}/{job.load[1]:.1f} | "
                    f"{_secs(fm) if net is not None else '-'} | "
                    f"{'-' if net is None else f'{net:.2f}'} | "
                    f"{'-' if cnet is None else f'{cnet:.2f}'} | {c.note or ref.note} |")
    meta = dict(meta, **{"targets met": f"{met} of {met + missed} rated rows "
                         f"(a row is met when ratio ≤ target and peak RSS ≤ "
                         f"{RSS_TARGET_MIB} MiB)"})
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return textwrap.dedent("""\
        # Benchmark results

        Generated by `python benchmarks/bench.py` (see its docstring for the method). Ratio =
        diskimg median time / reference median time, below 1 means diskimg is faster. Times are
        wall-clock medians of interleaved runs on one machine; compare ratios, not absolute
        times, across machines. The CPU-time ratio (user + system time of the child
        processes) is less sensitive to other load on the machine, but it is not the target:
        a tool using two cores well has a higher CPU time and a lower wall time. Rows against
        `qemu-img -W` (out-of-order writes, both cores) are informational: issue 7's `-c`
        targets are set against qemu-img's default. "floor s" is the median of `python -c
        pass` timed in the same rounds as the row (the interpreter's start-up, which no
        change to diskimg removes); "ratio net of floor" is (candidate - floor) / reference
        (reference - floor for the Python readers libqcow/libvmdk-python): how much of a
        miss the start-up floor accounts for; the last ratio is the same with CPU times.

        """) + head + "\n\n" + "\n".join(lines) + "\n"


def spread_report(jobs: list[Job]) -> str:
    """Every timed variant's rounds: fastest, quartiles, slowest, and how many rounds took
    over 1.5x its own fastest.  Informational: rows are rated by their medians above."""
    lines = ["", "## Round spread", "",
             "Each variant's rounds of the jobs above (seconds).  \"slow rounds\" counts the "
             "rounds over 1.5x the variant's own fastest (on the VMs this was written on, "
             "such rounds hit every tool that writes a large output, in the system time of "
             "its writes).  \"fastest ratio\" is the candidate's fastest round over the "
             "first reference's fastest.", "",
             "| job | variant | rounds | fastest | 25% | median | 75% | slowest "
             "| slow rounds | fastest ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        ref0 = min((s.seconds for s in job.refs[0].samples), default=None) \
            if job.refs else None
        for v in [*job.refs, *job.cands]:
            t = sorted(s.seconds for s in v.samples)
            if len(t) < 2:
                continue
            q1, q2, q3 = statistics.quantiles(t, n=4, method="inclusive")
            slow = sum(x > 1.5 * t[0] for x in t)
            fr = f"{t[0] / ref0:.2f}" if (ref0 and v in job.cands) else "-"
            lines.append(f"| {job.name} | {v.label} | {len(t)} | {t[0]:.3f} | {q1:.3f} | "
                         f"{q2:.3f} | {q3:.3f} | {t[-1]:.3f} | {slow} | {fr} |")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _commit() -> str:
    try:
        h = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src",
                                "benchmarks"], capture_output=True, text=True).stdout.strip()
        return h + (" + uncommitted changes in src/ or benchmarks/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default=None, help="virtual size of the workload (default 1G)")
    ap.add_argument("--quick", action="store_true", help="256 MiB workload")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per job (median taken)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds per job before the timed ones (default 1)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--only", action="append", default=[],
                    help="run only jobs whose name contains this (repeatable)")
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out jobs whose name contains this (repeatable)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also time every diskimg variant with PYTHONPATH=BASELINE")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per single run")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default benchmarks/results.md; none with --only)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ns = ap.parse_args(argv)

    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("bench: qemu-img and qemu-io are needed (apt-get install qemu-utils)",
              file=sys.stderr)
        return 1
    size = parse_size(ns.size or ("256M" if ns.quick else "1G"))
    size_label = (ns.size or ("256M" if ns.quick else "1G")).strip()
    default_out = HERE / ("results.md" if size == 1 << 30 else f"results-{size_label}.md")
    out = ns.out if ns.out is not None else (None if ns.only or ns.skip else default_out)
    work: Path = ns.workdir
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "workload.raw"
    inputs = {"raw": raw, "qcow2": work / "workload.qcow2",
              "qcow2-zlib": work / "workload-zlib.qcow2",
              "qcow2-zstd": work / "workload-zstd.qcow2", "vmdk": work / "workload.vmdk",
              "vmdk-stream": work / "workload-stream.vmdk",
              "qcow2-luks": work / "workload-luks.qcow2"}
    load0 = os.getloadavg()
    try:
        t = time.perf_counter()
        counts = build_workload(raw, size, ns.seed)
        for key, args in (("qcow2", ["-O", "qcow2"]), ("qcow2-zlib", ["-c", "-O", "qcow2"]),
                          ("qcow2-zstd", ["-c", "-O", "qcow2", "-o",
                                          "compression_type=zstd"]),
                          ("vmdk", ["-O", "vmdk"]),
                          ("vmdk-stream", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
                          ("qcow2-luks", ["-O", "qcow2", "-o", LUKS_CREATE])):
            obj = ["--object", LUKS_OBJECT] if key == "qcow2-luks" else []
            for attempt in range(4 if obj else 1):  # see Variant.retries
                r = subprocess.run([qemu_img, "convert", *obj, "-f", "raw", *args, str(raw),
                                    str(inputs[key])], check=attempt == (3 if obj else 0))
                if r.returncode == 0:
                    break
        os.sync()
        for p in inputs.values():  # warm page cache, as in issue 7's measurements
            with open(p, "rb") as f:
                while f.read(8 * MiB):
                    pass
        print(f"workload built in {time.perf_counter() - t:.1f}s: "
              + ", ".join(f"{k} {v // MiB} MiB" for k, v in counts.items()), flush=True)
        # PYTHONDONTWRITEBYTECODE (or a read-only tree) would make every diskimg run
        # compile its modules again: compile both trees once, up front
        trees = [Path(__import__("diskimg").__file__).parent]
        if ns.baseline is not None:
            trees.append(ns.baseline.resolve() / "diskimg")
        for tree in trees:
            subprocess.run([PY, "-m", "compileall", "-q", str(tree)], check=False)
        jobs = make_jobs(work, inputs, size, qemu_img, qemu_io)
        if ns.only:
            jobs = [j for j in jobs if any(o in j.name for o in ns.only)]
        jobs = [j for j in jobs if not any(o in j.name for o in ns.skip)]
        add_floors(jobs)
        if ns.baseline is not None:
            add_baseline(jobs, ns.baseline.resolve())
        run_jobs(jobs, ns.repeat, ns.timeout, qemu_img, ns.warmup)
        imports: dict[str, float] = {}
        for job in jobs:
            if job.name == "start-up floor":
                count_instructions(job)
        if any(j.name == "start-up floor" for j in jobs):
            imports["`import diskimg`, -X importtime cumulative ms"] = import_time_ms()
            if ns.baseline is not None:
                imports["`import diskimg` @baseline, -X importtime cumulative ms"] = \
                    import_time_ms(dict(os.environ, PYTHONPATH=str(ns.baseline.resolve())))
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()

    qv = subprocess.run([qemu_img, "--version"], capture_output=True, text=True).stdout
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": _commit(),
        "machine": f"{_cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs "
                   f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}",
        "load average (1/5/15 min)": f"start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
                                     f"end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}",
        "python": f"{platform.python_version()} ({PY}; "
                  + (f"venv {sys.prefix}" if sys.prefix != sys.base_prefix else "not a venv")
                  + ")",
        "qemu-img": qv.splitlines()[0] if qv else "?",
        "workload": f"{size} bytes, seed {ns.seed}: "
                    + ", ".join(f"{k} {v // MiB} MiB" for k, v in counts.items()),
        "rounds": f"{ns.repeat} timed, after {ns.warmup} untimed warm-up round(s) per job",
        "command": "python benchmarks/bench.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
    }
    if ns.baseline is not None:
        meta["baseline"] = f"'@baseline' rows run diskimg from {ns.baseline}"
    text = report(jobs, meta) + floor_report(jobs, imports) + spread_report(jobs)
    print()
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
