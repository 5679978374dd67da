"""``convert -p`` against qemu-img over seeded random cases: diskimg must print the same
``    (NN.NN/100%)\\r`` bytes (stdout compared whole), exit with the same code and write a
target ``qemu-img compare`` finds equal to qemu-img's.

The sources come from the convert matrix's image builders (tests/interop/
test_convert_matrix.py): qcow2 of cluster sizes 512 B .. 2 MiB (extended L2, zstd) over
qcow2 or raw backing files shorter or longer than the image, with data, zero, discarded and
compressed clusters and partial tails; raw; vmdk of every subformat.  Each seed picks one
of the shapes qemu-img's progress bookkeeping treats differently:

- several sources of mixed formats and cluster sizes (a source's cluster size aligns the
  block-status runs, one source's end cuts them);
- ``-B`` onto the source's own backing file, a shorter or a longer image, or an unrelated
  one when the source has none (requests split at the backing file's end, zeros past it
  not counted);
- compression: ``-c`` to qcow2 (of another cluster size) or vmdk, or a streamOptimized
  target, which compresses every grain (whole clusters counted);
- the target: ``-n`` onto an existing image (with ``--target-is-zero`` when it is blank),
  ``-o preallocation=...``, ``-S`` of several sizes, 0 included.

``PROGRESS_RANDOM_CASES`` / ``PROGRESS_RANDOM_SEED`` choose the seeds;
fuzz/convert_progress.py runs any number of them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

from tests.interop.test_convert_matrix import Img, _create, _garbage, _qcow2, _raw, _vmdk

from .conftest import needs_qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

K = 1024
M = 1024 * 1024
Run = Callable[..., "subprocess.CompletedProcess[str]"]
SHAPES = ["sources", "backing", "compress", "target"]


@dataclass
class ProgressCase:
    seed: int
    sources: list[Img]
    args: list[str]  # convert options after ``-p`` (the sources and target follow)
    out_fmt: str
    existing: Img | None = None  # -n: copied to each tool's target first
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        srcs = ", ".join(f"{s.fmt}:{s.path.name}" for s in self.sources)
        return f"seed={self.seed} [{srcs}] {' '.join(self.args)}; {'; '.join(self.notes)}"


def _source(rng: random.Random, run: Run, d: Path, name: str, notes: list[str], *,
            kinds: tuple[str, ...] = ("qcow2", "qcow2", "raw", "vmdk")) -> Img:
    size = rng.choice([256 * K, 1 * M, 2 * M, 3 * M]) + rng.choice([0, 512, 64 * K + 3584])
    kind = rng.choice(kinds)
    if kind == "raw":
        notes.append(f"{name}:raw {size}")
        return _raw(rng, run, d / f"{name}.raw", size)
    if kind == "vmdk":
        return _vmdk(rng, run, d, name, size // 512 * 512, notes)
    return _qcow2(rng, run, d, name, size, luks_ok=False, notes=notes,
                  focus="backing" if rng.random() < 0.5 else "")


def build_case(seed: int, d: Path, run: Run) -> ProgressCase:
    """The images and options of case ``seed``, built in ``d``."""
    rng = random.Random(seed)
    shape = SHAPES[seed % len(SHAPES)]
    notes = [f"shape={shape}"]
    if shape == "sources":
        sources = [_source(rng, run, d, f"s{i}", notes) for i in range(rng.randrange(2, 4))]
    elif shape == "backing":
        sources = [_source(rng, run, d, "s0", notes, kinds=("qcow2",))]
    else:
        sources = [_source(rng, run, d, f"s{i}", notes)
                   for i in range(1 if rng.random() < 0.7 else 2)]
    src = sources[0]
    total = sum(-(-s.size // 512) * 512 for s in sources)
    out_fmt = "qcow2"
    args: list[str] = []
    opts: dict[str, str] = {}
    existing: Img | None = None
    if shape == "sources":
        out_fmt = rng.choice(["qcow2", "raw", "vmdk"])
    if out_fmt == "qcow2" and shape in ("sources", "backing"):
        opts["cluster_size"] = str(rng.choice([512, 4 * K, 64 * K, 64 * K, 2 * M]))
    if shape == "backing":
        pick = rng.choice(["own", "short", "long", "own"] if src.backing else
                          ["short", "long", "unrelated"])
        if pick == "own" and src.backing is not None:
            tb = src.backing
        else:
            size = {"short": max(512, src.size // rng.choice([2, 3, 8]) // 512 * 512 - 512),
                    "long": src.size + 256 * K, "unrelated": src.size}[pick]
            fmt = rng.choice(["qcow2", "raw"])
            tb = Img(d / f"tb.{fmt}", fmt, size=size)
            _create(run, tb.path, fmt, size, {})
            if rng.random() < 0.5:
                # other data, though not past the end of the source's own backing file:
                # qemu-img leaves a range the source leaves to it across its end to the
                # target's backing file, which would show this data where the source
                # reads zeros (diskimg writes the zeros: docs/compatibility.md)
                _garbage(rng, run, tb, min(size, src.backing.size if src.backing else size))
        notes.append(f"-B {pick} {tb.fmt}:{tb.size}")
        args += ["-B", str(tb.path), "-F", tb.fmt]
        if rng.random() < 0.3:
            args.append("-c")
    elif shape == "compress":
        out_fmt = rng.choice(["qcow2", "qcow2", "vmdk", "vmdk"])
        if out_fmt == "vmdk":
            opts["subformat"] = rng.choice(["monolithicSparse", "streamOptimized"])
            if opts["subformat"] == "monolithicSparse" or rng.random() < 0.5:
                args.append("-c")
        else:
            opts["cluster_size"] = str(rng.choice([512, 4 * K, 64 * K, 2 * M]))
            args.append("-c")
    elif shape == "target":
        out_fmt = rng.choice(["qcow2", "qcow2", "raw", "vmdk"])
        if out_fmt == "qcow2":
            opts["cluster_size"] = str(rng.choice([512, 4 * K, 64 * K, 64 * K, 2 * M]))
            if rng.random() < 0.5:
                opts["preallocation"] = rng.choice(["metadata", "falloc"])
        if rng.random() < 0.5:
            existing = Img(d / f"existing.{out_fmt}", out_fmt, size=total)
            _create(run, existing.path, out_fmt, total,
                    {k: v for k, v in opts.items() if k != "preallocation"})
            if rng.random() < 0.5:
                _garbage(rng, run, existing, total)
            else:
                args.append("--target-is-zero")
            args.append("-n")
            opts = {}
    sparse = rng.choice([None, None, "0", "0", "512", "64k"])
    if sparse is not None and not (shape == "compress" and sparse == "0"):
        args += ["-S", sparse]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    return ProgressCase(seed, sources, ["-O", out_fmt, *args], out_fmt, existing, notes)


def run_case(seed: int, d: Path, run: Run) -> list[str]:
    """Build and run case ``seed`` in ``d``: the differences found (empty: it passed)."""
    case = build_case(seed, d, run)
    # ext4 reports an unwritten extent (qemu's zero-range writes make them) as a hole until
    # its pages are in the page cache, and qemu's block status of a metadata-preallocated
    # qcow2 follows the holes: read every file once so that both tools see the same
    for p in d.iterdir():
        if p.is_file():
            p.read_bytes()
    outs = []
    for tool, prog in (("q", [QEMU.qemu_img]), ("d", [sys.executable, "-m", "diskimg"])):
        target = d / f"{tool}-target.{case.out_fmt}"
        if case.existing is not None:
            shutil.copyfile(case.existing.path, target)
        cmd = [*prog, "convert", "-p", *case.args, *(str(s.path) for s in case.sources),
               str(target)]
        outs.append(subprocess.run(cmd, capture_output=True, timeout=120))
    q, m = outs
    what = case.describe()
    if (m.returncode, m.stdout) != (q.returncode, q.stdout):
        return [f"qemu-img: {q.returncode} {q.stdout!r} {q.stderr[-300:]!r}\n"
                f"diskimg:  {m.returncode} {m.stdout!r} {m.stderr[-300:]!r}\n  {what}"]
    if q.returncode:
        return []
    c = run([QEMU.qemu_img, "compare", "-f", case.out_fmt, "-F", case.out_fmt,
             str(d / f"q-target.{case.out_fmt}"), str(d / f"d-target.{case.out_fmt}")],
            check=False)
    if c.returncode != 0:
        return [f"targets differ: {c.stdout.strip()} {c.stderr.strip()}\n  {what}"]
    return []


CASES = int(os.environ.get("PROGRESS_RANDOM_CASES", "6"))
SEED = int(os.environ.get("PROGRESS_RANDOM_SEED", "0"))


@pytest.mark.parametrize("seed", range(SEED, SEED + CASES))
def test_convert_progress_random(seed: int, tmp_path: Path, run: Any) -> None:
    problems = run_case(seed, tmp_path, run)
    assert not problems, "\n".join(problems)
