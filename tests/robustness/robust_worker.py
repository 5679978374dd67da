"""Runs diskimg on (hostile) images under resource limits; driven by robustlib.Worker.

Protocol: one JSON job per stdin line, one JSON report per stdout line (the first line is
``{"ready": true}``).  A job names an image; the worker runs

1. read-only API: ``diskimg.open`` (format probed) + ``info()`` + full ``read`` +
   ``map()`` + ``check()``, then verifies the image file is byte-identical and its mtime
   unchanged;
2. repair: ``check(repair="all")`` on a copy opened ``"r+"``, then a full read of it;
3. CLI in-process (``diskimg.cli.main.main``): ``info``, ``info --output=json``, ``check``,
   ``convert -O raw`` — exit codes, stderr shape, output size, output == API read,
   image unchanged.

Every outcome must be success or a ``DiskImgError`` with a message.  Anything else (other
exception types, a timeout — ``signal.setitimer`` per job —, ``MemoryError`` under
``RLIMIT_AS``, a CLI traceback or "internal error", a modified source, an oversized
output) is listed in the report's ``bugs``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

READ_CAP = 64 << 20      # bytes of guest data read/converted at most per image
MAP_CAP = 200_000        # map entries looked at
CHUNK = 1 << 20
#: Steps that hit a known, reported bug (each has a strict xfail in test_known_bugs.py) are
#: skipped so the fuzzer keeps finding new ones; DISKIMG_FUZZ_NO_WORKAROUNDS=1 disables it.
WORKAROUNDS = os.environ.get("DISKIMG_FUZZ_NO_WORKAROUNDS") != "1"


class Timeout(BaseException):
    """Raised by the job alarm; a BaseException so no ``except Exception`` swallows it."""


def _alarm(signum: int, frame: object) -> None:
    raise Timeout()


def sha(path: Path) -> tuple[str, int] | None:
    try:
        st = path.stat()
        return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns
    except OSError:
        return None


class Job:
    def __init__(self, job: dict[str, Any], mem_mb: int) -> None:
        import diskimg

        self.diskimg = diskimg
        self.job = job
        self.mem_mb = mem_mb
        self.bugs: list[str] = []
        self.steps: list[list[Any]] = []
        self.info: dict[str, Any] = {}
        self.image = Path(job["image"])
        self.wd = Path(job["workdir"])
        o = job.get("open") or {}
        self.kw = {"secrets": {k: v.encode() for k, v in (o.get("secrets") or {}).items()},
                   "options": dict(o.get("options") or {})}
        self.timed_out = False

    # --- one step -------------------------------------------------------------------------
    def step(self, name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        from diskimg.errors import DiskImgError

        if self.timed_out:
            return False, None
        t0 = time.monotonic()
        try:
            v = fn()
        except Timeout:
            self.timed_out = True
            self.bugs.append(f"{name}: exceeded the time limit of {self.job['time_limit']} s "
                             f"(after {time.monotonic() - t0:.1f} s in this step)")
            self.steps.append([name, "timeout"])
            return False, None
        except DiskImgError as e:
            msg = str(e)
            if not msg.strip():
                self.bugs.append(f"{name}: {type(e).__name__} with an empty message")
            self.steps.append([name, "error", type(e).__name__, msg[:400]])
            return False, e
        except MemoryError:
            self.bugs.append(f"{name}: MemoryError (needs more than the {self.mem_mb} MiB "
                             f"address-space limit)\n{traceback.format_exc()[-2500:]}")
            self.steps.append([name, "bug", "MemoryError"])
            return False, None
        except BaseException as e:
            self.bugs.append(f"{name}: {type(e).__name__}: {str(e)[:300]}\n"
                             f"{traceback.format_exc()[-2500:]}")
            self.steps.append([name, "bug", type(e).__name__, str(e)[:300]])
            return False, None
        self.steps.append([name, "ok", round(time.monotonic() - t0, 3)])
        return True, v

    # --- API ------------------------------------------------------------------------------
    def read_all(self, dev: Any) -> str:
        h = hashlib.sha256()
        size = dev.size
        n = min(size, READ_CAP)
        for off in range(0, n, CHUNK):
            h.update(dev.read(off, min(CHUNK, n - off)))
        if size > READ_CAP:
            dev.read(size - CHUNK, CHUNK)
            return ""
        return h.hexdigest()

    def map_all(self, dev: Any) -> int:
        pos = 0
        count = 0
        for e in islice(dev.map(), MAP_CAP):
            if e.start != pos or e.length <= 0:
                raise AssertionError(f"map entry {e} does not continue at {pos}")
            pos += e.length
            count += 1
        if count < MAP_CAP and pos != dev.size:
            raise AssertionError(f"map covers [0, {pos}) of a {dev.size}-byte disk")
        return count

    def api(self) -> None:
        ok, dev = self.step("open", lambda: self.diskimg.open(self.image, "r", **self.kw))
        if not ok:
            return
        try:
            ok, info = self.step("info", lambda: json.loads(json.dumps(dev.info().to_json())))
            if ok:
                self.info = info
            self.info["size"] = dev.size
            self.info["format"] = dev.format
            ok, digest = self.step("read", lambda: self.read_all(dev))
            if ok and digest:
                self.info["sha256"] = digest
            self.step("map", lambda: self.map_all(dev))
            if not dev.supports_check:  # raw (e.g. a mutated magic): no checks
                return
            ok, res = self.step("check", lambda: dev.check())
            if ok:
                code = getattr(res, "exit_code", None)
                self.info["check"] = code
                if code not in (0, 1, 2, 3, None):
                    self.bugs.append(f"check: exit_code {code}")
        finally:
            self.step("close", dev.close)

    def repair(self) -> None:
        rw = self.wd / ("rw" + self.image.suffix)
        shutil.copyfile(self.image, rw)
        ok, dev = self.step("open r+", lambda: self.diskimg.open(rw, "r+", **self.kw))
        if not ok:
            return
        if not dev.supports_check:
            self.step("close r+", dev.close)
            return
        try:
            ok, res = self.step("check repair=all", lambda: dev.check(repair="all"))
            if ok:
                self.info["repair"] = getattr(res, "exit_code", None)
            self.step("read after repair", lambda: self.read_all(dev))
        finally:
            self.step("close r+", dev.close)
        ok, dev = self.step("reopen after repair", lambda: self.diskimg.open(rw, "r", **self.kw))
        if ok:
            try:
                ok, res = self.step("check after repair", lambda: dev.check())
                if ok:
                    self.info["recheck"] = code = getattr(res, "exit_code", None)
                    if self.info.get("repair") == 0 and code != 0:
                        self.bugs.append(f"check(repair='all') reported a clean image (exit 0)"
                                         f" but a fresh check of it exits {code}")
            finally:
                self.step("close reopened", dev.close)

    # --- CLI ------------------------------------------------------------------------------
    def cli(self, name: str, argv: list[str], codes: tuple[int, ...],
            max_err_lines: int | None = 2) -> tuple[int | None, str]:
        from diskimg.cli.main import main

        out_b, err_b = io.BytesIO(), io.BytesIO()
        out = io.TextIOWrapper(out_b, encoding="utf-8", errors="replace")
        err = io.TextIOWrapper(err_b, encoding="utf-8", errors="replace")

        def go() -> int:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return main(argv)

        ok, rc = self.step(f"cli {name}", go)
        out.flush()
        err.flush()
        stdout = out_b.getvalue().decode("utf-8", "replace")
        stderr = err_b.getvalue().decode("utf-8", "replace")
        if not ok:
            return None, stdout
        lines = stderr.splitlines()
        prog = [ln for ln in lines if ln.startswith("diskimg:")]
        what = f"cli {name} ({' '.join(argv)})"
        if "Traceback" in stderr or "internal error" in stderr:
            self.bugs.append(f"{what}: exit {rc}, stderr: {stderr[-2500:]}")
        elif rc not in codes:
            self.bugs.append(f"{what}: exit code {rc} not in {codes}; stderr: {stderr[-800:]}")
        elif len(prog) > 2 or (max_err_lines is not None and len(lines) > max_err_lines):
            self.bugs.append(f"{what}: {len(lines)} stderr lines: {stderr[-800:]}")
        elif rc and not prog and name != "check":
            self.bugs.append(f"{what}: exit {rc} without a 'diskimg:' error line")
        return rc, stdout

    def clis(self) -> None:
        p = str(self.image)
        if self.job.get("luks"):
            pre = ["--object", "secret,id=s0,data=pw", "--image-opts"]
            name = f"driver=qcow2,file.filename={p},encrypt.key-secret=s0"
        else:
            pre, name = [], p
        self.cli("info", ["info", *pre, name], (0, 1))
        rc, out = self.cli("info json", ["info", "--output=json", *pre, name], (0, 1))
        if rc == 0:
            try:
                json.loads(out)
            except ValueError:
                self.bugs.append(f"cli info --output=json printed invalid JSON: {out[:300]}")
        codes = (0, 1, 2, 3) if self.info.get("format", "qcow2") != "raw" else (1, 63)
        self.cli("check", ["check", *pre, name], codes, max_err_lines=None)
        size = self.info.get("size")
        if size is not None and size > READ_CAP:
            self.steps.append(["cli convert", "skipped (virtual size above the cap)"])
            return
        dst = self.wd / "out.raw"
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        rc, _ = self.cli("convert", ["convert", *pre, "-O", "raw", name, str(dst)], (0, 1))
        if rc == 0:
            got = dst.stat().st_size
            if size is None:
                self.bugs.append(f"convert succeeded ({got} bytes) where diskimg.open failed")
            elif got > -(-size // 512) * 512:
                # raw targets are rounded up to whole sectors, as qemu-img creates them
                self.bugs.append(f"convert output is {got} bytes, virtual size is {size}")
            elif "sha256" in self.info and self.info.get("format") == "qcow2":
                h = hashlib.sha256(dst.read_bytes()[:size].ljust(size, b"\0")).hexdigest()
                if h != self.info["sha256"]:
                    self.bugs.append("convert -O raw output differs from the API's read()")
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()

    def selftest(self, what: str) -> None:
        """Planted failures, so the tests can prove the harness detects each kind."""

        def hang() -> None:
            while True:
                time.sleep(0.01)

        def alloc() -> None:
            _ = bytearray(2 * (self.mem_mb << 20))

        def crash() -> None:
            os._exit(3)

        def wrong() -> None:
            raise ValueError("not a DiskImgError")

        def empty() -> None:
            from diskimg.errors import FormatError

            raise FormatError("")

        self.step(f"selftest {what}", {"hang": hang, "alloc": alloc, "crash": crash,
                                       "wrong": wrong, "empty": empty}[what])

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, float(self.job["time_limit"]))
        try:
            if self.job.get("selftest"):
                self.selftest(self.job["selftest"])
                return self.report(t0)
            before = sha(self.image)
            self.api()
            if sha(self.image) != before:
                self.bugs.append("the read-only API pipeline (open/info/read/map/check) "
                                 "modified the image file")
                before = sha(self.image)
            if self.job.get("repair", True):
                self.repair()
            if self.job.get("cli", True):
                self.clis()
                if sha(self.image) != before:
                    self.bugs.append("a read-only CLI command (info/check/convert source) "
                                     "modified the image file")
        except Timeout:
            self.bugs.append(f"exceeded the time limit of {self.job['time_limit']} s between "
                             "steps")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return self.report(t0)

    def report(self, t0: float) -> dict[str, Any]:
        return {"bugs": self.bugs, "steps": self.steps, "info": self.info,
                "elapsed": round(time.monotonic() - t0, 3),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mb", type=int, default=1024)
    a = ap.parse_args()
    import diskimg
    import diskimg.cli.main
    import diskimg.qcow2.check
    import diskimg.qcow2.image

    with contextlib.suppress(ImportError):
        import diskimg.vmdk  # noqa: F401
    if a.mem_mb:
        lim = a.mem_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _alarm)
    real_out = sys.stdout
    real_out.write(json.dumps({"ready": True}) + "\n")
    real_out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            rep = Job(job, a.mem_mb).run()
        except BaseException as e:
            rep = {"bugs": [f"worker failure: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc()[-2000:]}"], "steps": []}
        real_out.write(json.dumps(rep) + "\n")
        real_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
