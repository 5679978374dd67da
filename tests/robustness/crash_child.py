"""Crash-consistency writer: opens an image ``"r+"`` and runs a seeded random sequence of
writes, write_zeroes, discards, compressed writes, snapshot create/delete, resizes and
flushes until it is killed (test_crash_consistency.py).

    python crash_child.py SPEC.json      (what the spec holds: :func:`main`)

stdout protocol (unbuffered, one line per event: a line in the pipe survives the writer's
SIGKILL, so the parent knows exactly what was started and what was made durable):

    OP <json>          printed *before* an operation starts
    REFUSED <i> <msg>  operation ``i`` raised a DiskImgError (it must have changed nothing)
    FLUSHED <i>        printed after ``flush()`` (or the ``close()`` of a reopen) of
                       operation ``i`` returned, before the next operation starts
    DONE               all operations finished and the image was closed

The data of a write is :func:`payload` (seed, op index, length), so the parent can replay
the log into a model of the disk without the child sending the bytes.

    python crash_child.py --sweep SPEC.json

runs one whole operation (``amend`` or ``convert``, :func:`run_operation`) once per job of
the spec, each in a forked child (diskimg is imported once) working in the job's own
directory, and prints one JSON line per job.  A job either ends the child just before its
``nth`` write-like host call (pwrite, pwritev, truncate, punch_hole, zero_range,
preallocate, write_zeros, flush: every point where the file can change) or SIGKILLs it
``kill_after`` seconds after the fork; ``nth=0`` runs to the end and records in
``calls`` how many write-like calls the operation made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from typing import Any


def payload(seed: int, i: int, n: int, compressible: bool = False) -> bytes:
    r = random.Random(f"{seed}/{i}")
    if compressible:
        unit = r.randbytes(37)
        return (unit * (n // 37 + 1))[:n]
    return r.randbytes(n)


# --- the model of the disk (shared with the parent) ---------------------------------
@dataclass
class Model:
    data: bytearray
    known: bytearray  # 1 where the model knows the contents
    cs: int
    seed: int
    snaps: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    def apply(self, op: dict[str, Any]) -> None:
        k = op["op"]
        if k in ("write", "compressed"):
            off, n = op["off"], op["len"]
            self.data[off : off + n] = payload(self.seed, op["i"], n,
                                                 compressible=k == "compressed")
            self.known[off : off + n] = b"\1" * n
        elif k == "zero":
            off, n = op["off"], op["len"]
            self.data[off : off + n] = bytes(n)
            self.known[off : off + n] = b"\1" * n
        elif k == "discard":
            off, n = op["off"], op["len"]
            self.known[off : off + n] = bytes(n)
        elif k == "snap":
            self.snaps[op["name"]] = (bytes(self.data), bytes(self.known))
        elif k == "unsnap":
            del self.snaps[op["name"]]
        elif k == "resize":
            old, new = self.size, op["size"]
            if new < old:
                del self.data[new:]
                del self.known[new:]
            else:
                self.data.extend(bytes(new - old))
                self.known.extend(b"\1" * (new - old))
                # a shrink keeps the last partial cluster whole: growing again shows its
                # old tail (qemu 7.2 does the same without a backing file)
                tail = min(new, -(-old // self.cs) * self.cs)
                if tail > old:
                    self.known[old:tail] = bytes(tail - old)


def choose(r: random.Random, size: int, cs: int, nsnap: int,
           kinds: list[str]) -> dict[str, Any]:
    """The next operation: a random pick among ``kinds`` (weighted by repetition); writes
    start at guest offset 0 and in the last, partial cluster more often than elsewhere."""

    def start() -> int:
        x = r.random()
        if x < 0.1:
            return 0
        if x < 0.2:
            return r.randrange(max(0, (size - 1) // cs * cs), size)
        return r.randrange(size)

    while True:
        k = r.choice(kinds)
        if k == "write":
            off = start()
            n = min(size - off, r.randint(1, min(3 * cs, 256 << 10)))
            return {"op": "write", "off": off, "len": n}
        if k in ("zero", "discard"):
            off = start()
            n = min(size - off, r.randint(1, min(6 * cs, 512 << 10)))
            return {"op": k, "off": off, "len": n, "unmap": r.random() < 0.5}
        if k == "compressed":
            c = r.randrange(-(-size // cs))
            return {"op": "compressed", "off": c * cs, "len": min(cs, size - c * cs)}
        if k in ("flush", "reopen"):
            return {"op": k}
        if k == "snap" and nsnap < 3:
            return {"op": "snap"}
        if k == "unsnap" and nsnap:
            return {"op": "unsnap", "pick": r.randrange(nsnap)}
        if k == "resize" and not nsnap:
            new = -(-(size + r.randint(1, 2 * cs)) // 512) * 512
            return {"op": "resize", "size": new}
        if k == "shrink" and not nsnap:
            lo = max(size // 2, cs) // 512 * 512
            if lo < size:
                return {"op": "resize", "size": r.randrange(lo, size, 512)}


# the default operation mix (a qcow2 image without restrictions)
KINDS = ["write"] * 6 + ["zero", "discard", "compressed", "flush", "flush", "reopen",
                         "snap", "unsnap", "resize", "shrink"]


def main(spec_path: str) -> int:
    """Run one seeded sequence as ``spec`` says (written by test_crash_consistency.py):

    ``image``, ``format``, ``open`` (keyword arguments of ``diskimg.open``: ``secrets`` as
    text, ``options``), ``seed``, ``nops``, ``kinds`` (operation mix, :data:`KINDS` by
    default); ``arm_op``/``arm_calls``: end the process just before the ``arm_calls``-th
    write-like host call made from the start of the first operation at index ``arm_op``
    or later whose kind is in ``arm_kinds`` (default: any; ``arm_op`` -1: from the
    open on, which repairs a dirty lazy_refcounts image) on (the deterministic kill;
    without them the parent SIGKILLs at a moment of its choice);
    ``lie``: the harness self-test, claim flushes without flushing.
    """
    import diskimg

    with open(spec_path) as f:
        spec = json.load(f)
    seed, nops = spec["seed"], spec["nops"]
    kinds = spec.get("kinds", KINDS)
    lie = spec.get("lie", False)
    if lie:
        ops = [{"op": "write", "off": (k * 3 + 1) * 65536, "len": 8192} for k in range(20)]
        ops.append({"op": "flush"})
        chooser = iter(ops)
        nops = len(ops)
    calls = [0]
    if spec.get("arm_op") is not None:
        calls = install_crash_hook(spec["arm_calls"])
        calls[0] = -(1 << 62)  # disarmed until operation arm_op starts
        if spec["arm_op"] == -1:
            calls[0] = 0
    arm_kinds = spec.get("arm_kinds")
    kw = dict(spec.get("open", {}))
    if "secrets" in kw:
        kw["secrets"] = {k: v.encode() for k, v in kw["secrets"].items()}
    r = random.Random(seed)
    out = sys.stdout
    img = diskimg.open(spec["image"], "r+", spec.get("format"), **kw)
    cs = img.cluster_size or 65536  # None: no clusters (raw, flat vmdk)
    for i in range(nops):
        snaps = img.snapshots.list() if "snap" in kinds else []
        op = next(chooser) if lie else choose(r, img.size, cs, len(snaps), kinds)
        op["i"] = i
        if op["op"] == "snap":
            op["name"] = f"s{i}"
        if op["op"] == "unsnap":
            op["name"] = snaps[op["pick"]].name
        # the intent reaches the pipe (the kernel) before the operation starts
        out.write("OP " + json.dumps(op) + "\n")
        out.flush()
        if (spec.get("arm_op") is not None and calls[0] < 0 and i >= spec["arm_op"]
                and (not arm_kinds or op["op"] in arm_kinds)):
            calls[0] = 0
        kind = op["op"]
        try:
            if kind == "write":
                img.write(op["off"], payload(seed, i, op["len"]))
            elif kind == "zero":
                img.write_zeroes(op["off"], op["len"], may_unmap=op["unmap"])
            elif kind == "discard":
                img.discard(op["off"], op["len"])
            elif kind == "compressed":
                img.write_compressed(op["off"],  # type: ignore[attr-defined]
                                     payload(seed, i, op["len"], compressible=True))
            elif kind == "snap":
                img.snapshots.create(op["name"])  # type: ignore[attr-defined]
            elif kind == "unsnap":
                img.snapshots.delete(op["name"])  # type: ignore[attr-defined]
            elif kind == "resize":
                img.resize(op["size"], shrink=op["size"] < img.size)
            elif kind == "flush" and not lie:
                img.flush()
            elif kind == "reopen":  # close() flushes (and clears the dirty bit)
                img.close()
                img = diskimg.open(spec["image"], "r+", spec.get("format"), **kw)
        except diskimg.DiskImgError as e:
            # a refusal: it must have changed nothing (the parent holds it to that)
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            out.write(f"REFUSED {i} {msg}\n")
            out.flush()
            continue
        if kind in ("flush", "reopen"):
            out.write(f"FLUSHED {i}\n")
            out.flush()
    if lie:
        os.kill(os.getpid(), signal.SIGKILL)
    img.close()
    out.write("DONE\n")
    out.flush()
    return 0


# --- kill-point sweeps of whole operations ------------------------------------------------
WRITE_CALLS = ("pwrite", "pwritev", "truncate", "punch_hole", "zero_range", "preallocate",
               "write_zeros", "flush")


def install_crash_hook(nth: int) -> list[int]:
    """Count write-like calls on writable host files; ``os._exit(9)`` just before call
    ``nth`` (never when ``nth`` is 0).  Returns the one-element call counter."""
    from diskimg.hostio.file import HostFile

    calls = [0]
    for name in WRITE_CALLS:
        real = getattr(HostFile, name)

        def hook(self: Any, *a: Any, _real: Any = real, **kw: Any) -> Any:
            if self.writable:
                calls[0] += 1
                if calls[0] == nth:
                    os._exit(9)
            return _real(self, *a, **kw)

        setattr(HostFile, name, hook)
    return calls


def run_operation(op: dict[str, Any]) -> None:
    """``{"op": "amend", "image": p, "options": {...}}`` or ``{"op": "convert", "src": p,
    "dst": p, "compress": bool, "options": {...}}``; relative paths are in the job's
    directory (the current one)."""
    import diskimg

    if op["op"] == "amend":
        from diskimg.qcow2.amend import amend

        amend(op["image"], op["options"])
    elif op["op"] == "convert":
        diskimg.convert(op["src"], op["dst"], "qcow2", options=op.get("options"),
                        compress=op.get("compress", False), workers=op.get("workers"))
    else:
        raise ValueError(op["op"])


def sweep(spec_path: str) -> int:
    import shutil
    import time

    import diskimg
    import diskimg.qcow2.amend  # imported once, before the forks

    with open(spec_path) as f:
        spec = json.load(f)
    assert diskimg.qcow2.amend.amend and diskimg.convert  # resolved before the forks
    for job in spec["jobs"]:
        d = job["dir"]
        os.makedirs(d, exist_ok=True)
        for name in spec.get("copy", []):
            shutil.copyfile(os.path.join(spec["pristine"], name), os.path.join(d, name))
        sys.stdout.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(d)
                calls = install_crash_hook(job.get("nth", 0))
                run_operation(spec["op"])
                with open("calls", "w") as f:
                    f.write(str(calls[0]))
                os._exit(0)
            except BaseException as e:
                try:
                    with open("error", "w") as f:
                        f.write(f"{type(e).__name__}: {e}")
                finally:
                    os._exit(3)
        if "kill_after" in job:
            time.sleep(job["kill_after"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        took = time.perf_counter() - t0
        if os.WIFSIGNALED(status):
            res = {"dir": d, "signal": os.WTERMSIG(status), "seconds": took}
        else:
            res = {"dir": d, "exit": os.WEXITSTATUS(status), "seconds": took}
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sweep":
        sys.exit(sweep(sys.argv[2]))
    sys.exit(main(sys.argv[1]))
