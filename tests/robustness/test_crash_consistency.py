"""Crash consistency: SIGKILL a diskimg writer at random points and check what is left.

A child process (crash_child.py) opens a qcow2 ``"r+"`` and runs a seeded random sequence
of writes, write_zeroes, discards, compressed writes, snapshot create/delete, resizes and
flushes, logging each operation before it starts and each completed flush.  The parent
kills it with SIGKILL after a random number of operations plus a random sub-millisecond
to few-millisecond delay, then requires:

* ``qemu-img check``: no corruptions — exit 0 or 3 (leaks only); for lazy_refcounts=on
  the image may be dirty, so instead ``diskimg.open(p, "r+")`` (which repairs a dirty
  image) must leave an image ``qemu-img check`` finds clean;
* diskimg's ``check()`` reports the same corruption/leak/check-error counts and exit code
  as ``qemu-img check`` on the killed image;
* ``qemu-img check -r leaks`` on a copy then exits 0, and so does diskimg's
  ``check(repair="leaks")`` on another copy (verified by qemu-img);
* data: the model of the disk at the last completed flush must read back — through diskimg
  and through ``qemu-img convert`` — everywhere except the byte ranges of the operations
  started after that flush (they may be lost or half-done); the virtual size is the
  flushed one or that of a pending resize.

Discards make their range "unknown" in the model (the contents of a discarded range are
not specified).  CI: ``KILLS`` kills per variant; ``DISKIMG_CRASH_KILLS=N`` for more.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import crash_child
import pytest
import robustlib

import diskimg
from diskimg.errors import DiskImgError

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent
KILLS = int(os.environ.get("DISKIMG_CRASH_KILLS", "3"))
NOPS = 60
SIZE = 4 << 20

# (name, qemu-img -o options, with a backing file)
VARIANTS = [
    ("v3-4k", "cluster_size=4096", False),
    ("v2-4k", "compat=0.10,cluster_size=4096", False),
    ("v3-512-backing", "cluster_size=512", True),
    ("v2-64k-backing", "compat=0.10", True),
    ("v3-4k-lazy", "cluster_size=4096,lazy_refcounts=on", False),
    ("v3-4k-lazy-backing", "cluster_size=4096,lazy_refcounts=on", True),
]


def qemu(*args: Any, check: tuple[int, ...] | None = (0,),
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert robustlib.QEMU_IMG
    res = subprocess.run([robustlib.QEMU_IMG, *map(str, args)], capture_output=True,
                         text=True, timeout=120, cwd=cwd)
    if check is not None:
        assert res.returncode in check, (args, res.returncode, res.stdout, res.stderr)
    return res


def qemu_check(p: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    res = qemu("check", "--output=json", *extra, p, check=None)
    try:
        doc = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError:
        doc = {}
    doc["stderr"] = res.stderr
    return res.returncode, doc


def parse_log(out: str) -> tuple[list[dict[str, Any]], int, bool, str | None]:
    """(operations logged, index of the last completed flush or -1, finished, the child's
    model digest at that flush)."""
    ops: list[dict[str, Any]] = []
    last_flush = -1
    digest = None
    done = False
    for line in out.splitlines():
        if line.startswith("OP "):
            try:
                ops.append(json.loads(line[3:]))
            except ValueError:
                break  # the line was cut by the kill
        elif line.startswith("FLUSHED "):
            parts = line.split()
            if len(parts) == 3:  # else cut by the kill: that flush does not count
                last_flush, digest = int(parts[1]), parts[2]
        elif line == "DONE":
            done = True
    return ops, last_flush, done, digest


def compare(got: bytes, model: crash_child.Model, exclude: list[tuple[int, int]],
            what: str) -> None:
    """Every byte the model knows, outside ``exclude``, equals ``got``."""
    n = min(len(got), model.size)
    mask = bytearray(model.known[:n])
    for lo, hi in exclude:
        lo, hi = max(0, lo), min(n, hi)
        if hi > lo:
            mask[lo:hi] = bytes(hi - lo)
    step = 4096
    for pos in range(0, n, step):
        m = mask[pos : pos + step]
        a, b = got[pos : pos + step], model.data[pos : pos + step]
        if a == b or not any(m):
            continue
        for j in range(len(m)):
            if m[j] and a[j] != b[j]:
                raise AssertionError(
                    f"{what}: byte {pos + j} reads {a[j]:#04x}, flushed model says "
                    f"{b[j]:#04x} (not touched after the last completed flush)")


# --- fixtures -----------------------------------------------------------------------------
def make_variant(d: Path, opts: str, backing: bool, seed: int) -> tuple[Path, crash_child.Model]:
    p = d / "disk.qcow2"
    bdata = b""
    if backing:
        r = random.Random(seed ^ 0xBA5E)
        bdata = r.randbytes(SIZE)
        (d / "base.raw").write_bytes(bdata)
        qemu("convert", "-q", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2", cwd=d)
        (d / "base.raw").unlink()
        opts += ",backing_file=base.qcow2,backing_fmt=qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", opts, p.name, str(SIZE), cwd=d)
    assert robustlib.QEMU_IO
    subprocess.run([robustlib.QEMU_IO, "-c", "write -P 0x5a 256k 512k", p.name], cwd=d,
                   check=True, capture_output=True)
    cs = 1 << int.from_bytes(p.read_bytes()[20:24], "big")
    data = bytearray(bdata.ljust(SIZE, b"\0"))
    data[256 << 10 : 768 << 10] = b"\x5a" * (512 << 10)
    return p, crash_child.Model(data, bytearray(b"\1" * SIZE), cs, seed)


def run_and_kill(p: Path, seed: int, kill_after: int, delay: float) -> str:
    """Start the writer, SIGKILL it ``delay`` s after it logged operation ``kill_after``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-u", str(HERE / "crash_child.py"), str(p),
                             str(seed), str(NOPS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    lines = []
    seen = 0
    killed = False
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("OP "):
                seen += 1
                if seen == kill_after:
                    if delay:
                        busy_until = time.perf_counter() + delay
                        while time.perf_counter() < busy_until:
                            pass
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
        lines.append(proc.stdout.read())
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(30)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if not killed or proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, f"writer failed (exit {proc.returncode}):\n{err}"
    return "".join(lines)


def cases() -> list[Any]:
    return [pytest.param(opts, backing, 1000 * k + sum(map(ord, name)), id=f"{name}-{k}")
            for name, opts, backing in VARIANTS for k in range(KILLS)]


# --- the test -----------------------------------------------------------------------------
@pytest.mark.parametrize(("opts", "backing", "seed"), cases())
def test_sigkill_leaves_consistent_image(opts: str, backing: bool, seed: int,
                                         tmp_path: Path) -> None:
    lazy = "lazy_refcounts=on" in opts
    p, model = make_variant(tmp_path, opts, backing, seed)
    r = random.Random(seed)
    kill_after = r.randint(4, NOPS - 4)
    delay = r.choice([0.0, r.uniform(0, 0.0005), r.uniform(0, 0.004)])
    out = run_and_kill(p, seed, kill_after, delay)
    ops, last_flush, _done, digest = parse_log(out)
    note = (f"seed={seed} kill after op {kill_after} +{delay * 1000:.2f} ms; "
            f"last completed flush: op {last_flush}; ops logged: {len(ops)}; "
            f"pending: {[o['op'] for o in ops if o['i'] > last_flush]}")
    # the model at the last completed flush, and what later operations may have touched
    for op in ops:
        if op["i"] > last_flush:
            break
        model.apply(op)
    if digest is not None:  # the parent's replay agrees with the child's own model
        assert model.digest() == digest, f"{note}: model replay differs from the writer's"
    exclude: list[tuple[int, int]] = []
    sizes = {model.size}
    pending = [op for op in ops if op["i"] > last_flush]
    for op in pending:
        t = crash_child.Model.touched(op, max(sizes))
        if t:
            exclude.append(t)
        if op["op"] == "resize":
            sizes.add(op["size"])

    # 1. qemu-img check on the killed image; diskimg's check agrees with it
    qrc, qdoc = qemu_check(p)
    with diskimg.open(p, "r") as img:
        assert img.size in sizes, note
        res = img.check()
        got = img.read(0, img.size)
    mine = {"corruptions": res.corruptions, "leaks": res.leaks,
            "check-errors": res.check_errors}
    theirs = {k: qdoc.get(k, 0) for k in mine}
    assert (mine, res.exit_code) == (theirs, qrc), f"{note}\ndiskimg {mine} exit " \
        f"{res.exit_code}, qemu-img {theirs} exit {qrc}"
    if not lazy:
        assert qrc in (0, 3), f"{note}\nqemu-img check exit {qrc}: {qdoc}"

    # 2. the flushed data reads back, through diskimg and through qemu-img
    compare(got, model, exclude, f"diskimg read ({note})")
    raw = tmp_path / "out.raw"
    qemu("convert", "-U", "-O", "raw", p, raw)
    compare(raw.read_bytes(), model, exclude, f"qemu-img convert ({note})")

    # 3. repairs
    if lazy:
        c = tmp_path / "repaired.qcow2"
        shutil.copyfile(p, c)
        diskimg.open(c, "r+").close()  # repairs a dirty lazy-refcount image
        qrc2, qdoc2 = qemu_check(c)
        assert qrc2 == 0, f"{note}\nafter diskimg.open r+: qemu-img check {qrc2} {qdoc2}"
        with diskimg.open(c) as img:
            compare(img.read(0, img.size), model, exclude, f"after repair ({note})")
    else:
        c1 = tmp_path / "qrepair.qcow2"
        shutil.copyfile(p, c1)
        qemu("check", "-q", "-r", "leaks", c1, check=(0,))
        c2 = tmp_path / "drepair.qcow2"
        shutil.copyfile(p, c2)
        with diskimg.open(c2, "r+") as img:
            rep = img.check(repair="leaks")
        assert rep.exit_code == 0, (note, rep)
        qrc3, qdoc3 = qemu_check(c2)
        assert qrc3 == 0, f"{note}\nafter diskimg check -r leaks: qemu-img {qrc3} {qdoc3}"


@pytest.mark.parametrize("backing", [False, True])
def test_lazy_refcounts_dirty_image_is_repaired_on_rw_open(backing: bool,
                                                           tmp_path: Path) -> None:
    """Kill a lazy-refcount writer right after a burst of allocating writes (so the dirty
    bit is set and refcounts are stale): read-only open does not touch it, ``open("r+")``
    repairs it, qemu-img check is clean afterwards and the data is intact."""
    opts = "cluster_size=4096,lazy_refcounts=on"
    p, model = make_variant(tmp_path, opts, backing, 77)
    src = HERE / "crash_child.py"
    code = (
        "import sys, os, diskimg, crash_child\n"
        f"img = diskimg.open({str(p)!r}, 'r+')\n"
        "for i in range(40):\n"
        "    img.write(i * 65536 + 1000, crash_child.payload(5, i, 3000))\n"
        "img.flush()\n"
        "print('FLUSHED', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), str(src.parent), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == -signal.SIGKILL and "FLUSHED" in res.stdout, res.stderr
    model.seed = 5
    for i in range(40):
        model.apply({"op": "write", "off": i * 65536 + 1000, "len": 3000, "i": i})
    raw = p.read_bytes()
    assert int.from_bytes(raw[72:80], "big") & 1, "dirty bit not set by the writer"
    before = raw
    qrc, qdoc = qemu_check(p)
    assert qrc in (0, 2, 3)
    with diskimg.open(p) as img:  # read-only: no repair, no write
        res2 = img.check()
        assert res2.corruptions == qdoc.get("corruptions", 0)
        assert res2.leaks == qdoc.get("leaks", 0)
        compare(img.read(0, img.size), model, [], "dirty image, read-only")
    assert p.read_bytes() == before, "read-only open/check of a dirty image wrote to it"
    diskimg.open(p, "r+").close()
    assert not int.from_bytes(p.read_bytes()[72:80], "big") & 1, "dirty bit still set"
    qrc, qdoc = qemu_check(p)
    assert qrc == 0, qdoc
    with diskimg.open(p) as img:
        compare(img.read(0, img.size), model, [], "after the repairing open")


def test_harness_detects_lost_flushed_data(tmp_path: Path) -> None:
    """Self-test: a writer that claims flushes without flushing (its cached L2 tables die
    with it) must make the data check fail."""
    p, model = make_variant(tmp_path, "cluster_size=4096", False, 5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-u", str(HERE / "crash_child.py"), str(p), "5",
                          "21", "--lie"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    ops, last_flush, _, _ = parse_log(res.stdout)
    assert last_flush == 20
    for op in ops:
        model.apply(op)
    with diskimg.open(p) as img, pytest.raises(AssertionError, match="flushed model"):
        compare(img.read(0, img.size), model, [], "lying writer")


# --- whole operations: amend and convert, killed at every write-like host call -------------
# A forked child (crash_child.py --sweep) runs the operation and ends just before its nth
# write-like host call (every point where the file can change: the deterministic kill
# points), or is SIGKILLed after a random delay (which may also cut a long pwrite short).
SWEEP_POINTS = int(os.environ.get("DISKIMG_CRASH_POINTS", "14"))
SWEEP_TIMED = int(os.environ.get("DISKIMG_CRASH_TIMED_KILLS", "3"))
SWEEP_SIZE = 2 << 20

# B11 (fixed): amend's rebuild_refcounts switched the header to the new refcount table
# and to the new refcount_order with two pwrites; a crash between them left the new blocks
# read with the old width. It now writes header bytes 48..100 at once; these cases are the
# regression test.

# (id, qemu-img create -o, backing file, qemu-io commands, amend options[, mark])
AMEND_CASES = [
    ("downgrade-zero-clusters-snapshot", "cluster_size=4096", True,
     ["write -P 0x11 0 256k", "write -z -u 64k 64k", "snapshot", "write -P 0x22 512k 128k",
      "write -z 512k 32k", "write -c -P 0x33 1M 64k", "write -z -u 1536k 16k"],
     {"compat": "0.10"}),
    ("upgrade", "compat=0.10,cluster_size=4096", False,
     ["write -P 0x11 0 256k", "snapshot", "write -P 0x22 128k 256k"], {"compat": "1.1"}),
    ("refcount_bits-64", "cluster_size=4096", False,
     ["write -P 0x11 0 512k", "snapshot", "write -P 0x22 256k 256k"], {"refcount_bits": "64"}),
    ("refcount_bits-2", "cluster_size=4096", False,
     ["write -P 0x11 0 512k", "snapshot", "write -P 0x22 256k 256k"], {"refcount_bits": "2"}),
    ("lazy_refcounts-on-grow", "cluster_size=4096", True, ["write -P 0x11 0 512k"],
     {"lazy_refcounts": "on", "size": str(3 << 20)}),
    ("lazy_refcounts-off-shrink", "cluster_size=4096,lazy_refcounts=on", False,
     ["write -P 0x11 0 512k", "write -P 0x22 1536k 256k"],
     {"lazy_refcounts": "off", "size": str(1 << 20)}),
]
CONVERT_CASES = [("plain", False), ("compressed", True)]


def sweep(tmp: Path, pristine: Path, copy: list[str], op: dict[str, Any],
          jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``jobs`` (each gets ``dir``) through ``crash_child.py --sweep``."""
    spec = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    spec.write_text(json.dumps({"pristine": str(pristine), "copy": copy, "op": op,
                                "jobs": jobs}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(HERE / "crash_child.py"), "--sweep", str(spec)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return [json.loads(ln) for ln in res.stdout.splitlines()]


def kill_plan(tmp: Path, pristine: Path, copy: list[str], op: dict[str, Any],
              seed: int) -> tuple[list[dict[str, Any]], int]:
    """Count the operation's write-like calls in a full run (which must succeed), then
    plan the kill points: the first and last few calls, the rest spread at random, and
    SWEEP_TIMED SIGKILLs at random times within the run's duration."""
    (full,) = sweep(tmp, pristine, copy, op, [{"dir": str(tmp / "full")}])
    err = tmp / "full" / "error"
    assert full.get("exit") == 0, err.read_text() if err.exists() else full
    n = int((tmp / "full" / "calls").read_text())
    r = random.Random(seed)
    edge = max(1, SWEEP_POINTS // 4)
    points = set(range(1, min(n, edge) + 1)) | set(range(max(1, n - edge + 1), n + 1))
    rest = sorted(set(range(1, n + 1)) - points)
    points |= set(r.sample(rest, min(len(rest), max(0, SWEEP_POINTS - len(points)))))
    jobs: list[dict[str, Any]] = [{"dir": str(tmp / f"p{k}"), "nth": k} for k in sorted(points)]
    jobs += [{"dir": str(tmp / f"t{k}"), "kill_after": r.uniform(0, full["seconds"])}
             for k in range(SWEEP_TIMED)]
    return jobs, n


def check_killed_image(p: Path, note: str) -> None:
    """qemu-img check finds at most leaks (a dirty lazy-refcount image: after the
    repairing ``open("r+")`` of a copy, none at all)."""
    qrc, qdoc = qemu_check(p)
    dirty = p.stat().st_size >= 80 and int.from_bytes(p.read_bytes()[72:80], "big") & 1
    if dirty and p.read_bytes()[4:8] == b"\0\0\0\3":
        assert qrc in (0, 2, 3), f"{note}: qemu-img check exit {qrc}: {qdoc}"
        c = p.with_name("repaired.qcow2")
        shutil.copyfile(p, c)
        diskimg.open(c, "r+").close()
        qrc, qdoc = qemu_check(c)
        assert qrc == 0, f"{note}: after the repairing open: {qrc} {qdoc}"
    else:
        assert qrc in (0, 3), f"{note}: qemu-img check exit {qrc}: {qdoc}"


def guest_view(p: Path) -> tuple[bytes, dict[str, bytes]]:
    with diskimg.open(p) as img:
        snaps = {}
        for s in img.snapshots.list():
            with img.snapshot_view(name=s.name) as v:
                snaps[s.name] = v.read(0, v.size)
        return img.read(0, img.size), snaps


@pytest.mark.parametrize(("opts", "backing", "cmds", "options"),
                         [pytest.param(*c[1:5], id=c[0], marks=c[5:])
                          for c in AMEND_CASES])
def test_sigkill_during_amend(opts: str, backing: bool, cmds: list[str],
                              options: dict[str, str], tmp_path: Path) -> None:
    """Kill ``amend`` at every planned point: qemu-img check finds at most leaks, the
    guest data and every snapshot read back unchanged (a resize: the old or new size, the
    common prefix unchanged)."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    copy = ["disk.qcow2"]
    if backing:
        (pristine / "b.raw").write_bytes(random.Random(3).randbytes(SWEEP_SIZE))
        qemu("convert", "-q", "-f", "raw", "-O", "qcow2", "b.raw", "base.qcow2", cwd=pristine)
        opts += ",backing_file=base.qcow2,backing_fmt=qcow2"
        copy.append("base.qcow2")
    qemu("create", "-q", "-f", "qcow2", "-o", opts, "disk.qcow2", str(SWEEP_SIZE),
         cwd=pristine)
    assert robustlib.QEMU_IO
    for k, cmd in enumerate(cmds):
        if cmd == "snapshot":
            qemu("snapshot", "-c", f"s{k}", "disk.qcow2", cwd=pristine)
        else:
            subprocess.run([robustlib.QEMU_IO, "-c", cmd, "disk.qcow2"], cwd=pristine,
                           check=True, capture_output=True)
    want, want_snaps = guest_view(pristine / "disk.qcow2")
    op = {"op": "amend", "image": "disk.qcow2", "options": options}
    jobs, n = kill_plan(tmp_path, pristine, copy, op, sum(map(ord, str(options))))
    sizes = {len(want), int(options.get("size", len(want)))}
    survived = 0
    failed: list[str] = []
    for job in sweep(tmp_path, pristine, copy, op, jobs):
        p = Path(job["dir"]) / "disk.qcow2"
        note = f"amend {options} killed at {job} of {n} write-like calls"
        try:
            assert job.get("exit") in (0, 9) or job.get("signal") == signal.SIGKILL, note
            check_killed_image(p, note)
            got, got_snaps = guest_view(p)
            assert len(got) in sizes, note
            common = min(sizes)
            assert got[:common] == want[:common], f"{note}: guest data changed"
            assert got_snaps == want_snaps, f"{note}: snapshot data changed"
            survived += 1
        except (AssertionError, DiskImgError) as e:
            failed.append(str(e)[:600])
    assert not failed, f"{len(failed)} of {len(jobs)} kill points failed:\n" + \
        "\n".join(failed)
    print(f"amend {options}: {survived}/{len(jobs)} kill points survived "
          f"({n} write-like calls)")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_sigkill_during_convert(compress: bool, tmp_path: Path) -> None:
    """Kill ``convert -O qcow2 [-c]`` at every planned point: the target is either not yet
    a qcow2 image (missing or without a complete header) or one qemu-img check finds at
    most leaks in, and every cluster it maps reads as the source's."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    r = random.Random(11)
    src = bytearray(SWEEP_SIZE)
    for k in range(0, SWEEP_SIZE, 64 << 10):
        kind = r.choice(["random", "pattern", "zero", "zero"])
        if kind == "random":
            src[k : k + (64 << 10)] = r.randbytes(64 << 10)
        elif kind == "pattern":
            src[k : k + (64 << 10)] = bytes([r.randrange(1, 256)]) * (64 << 10)
    (pristine / "src.raw").write_bytes(bytes(src))
    op = {"op": "convert", "src": str(pristine / "src.raw"), "dst": "out.qcow2",
          "compress": compress, "options": {"cluster_size": 4096}, "workers": 2}
    jobs, n = kill_plan(tmp_path, pristine, [], op, 5 + compress)
    survived = 0
    failed: list[str] = []
    for job in sweep(tmp_path, pristine, [], op, jobs):
        p = Path(job["dir"]) / "out.qcow2"
        note = f"convert -c={compress} killed at {job} of {n} write-like calls"
        head = p.read_bytes()[:104] if p.exists() else b""
        if len(head) < 104 or head[:4] != b"QFI\xfb":
            survived += 1  # clearly not (yet) an image
            continue
        try:
            assert job.get("exit") in (0, 9) or job.get("signal") == signal.SIGKILL, note
            check_killed_image(p, note)
            with diskimg.open(p) as img:
                assert img.size == SWEEP_SIZE, note
                for e in img.map():
                    if e.data:
                        got = img.read(e.start, e.length)
                        assert got == bytes(src[e.start : e.start + e.length]), \
                            f"{note}: mapped range {e.start}+{e.length} differs from source"
            survived += 1
        except (AssertionError, DiskImgError) as e:
            failed.append(str(e)[:600])
    assert not failed, f"{len(failed)} of {len(jobs)} kill points failed:\n" + \
        "\n".join(failed)
    print(f"convert -c={compress}: {survived}/{len(jobs)} kill points survived "
          f"({n} write-like calls)")


def test_crash_in_create_leaves_no_half_made_image(tmp_path: Path) -> None:
    """Crash ``create`` before each of its writes: the file is either no qcow2 image yet
    (no magic) or one qemu-img check finds clean (B12, fixed: create_qcow2 writes the
    header cluster last, after the refcount structures, the L1 table and the LUKS area)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    bad = []
    for nth in range(1, 12):
        p = tmp_path / f"c{nth}.qcow2"
        code = ("import crash_child, diskimg\n"
                f"crash_child.install_crash_hook({nth})\n"
                f"diskimg.create({str(p)!r}, 'qcow2', 1 << 20)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60)
        head = p.read_bytes()[:104] if p.exists() else b""
        if res.returncode == 0:
            break
        assert res.returncode == 9, res.stderr
        if len(head) >= 104 and head[:4] == b"QFI\xfb":
            qrc, qdoc = qemu_check(p)
            if qrc != 0:
                bad.append((nth, qrc, qdoc["stderr"][:200]))
    assert not bad, bad
