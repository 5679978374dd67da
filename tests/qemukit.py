"""The one way the tests run qemu-img and qemu-io (the oracle).

``Qemu`` wraps both tools; ``QEMU`` is a shared instance for module-level helpers and
hypothesis state machines (``from qemukit import QEMU``; tests/ is on ``sys.path``, see
tests/conftest.py) and the ``qemu`` pytest fixture returns it (skipping the test when qemu
is not installed).

qemu-img is always ``tests/tools/qemu-img``: it runs the real qemu-img and retries only
qemu's LUKS PBKDF2-benchmark flake ("Unable to get accurate CPU usage"); the real binary
is passed to it in ``DISKIMG_REAL_QEMU_IMG`` and the wrapper directory is put first on
``PATH``, so that subprocesses (e.g. a ``diskimg`` that calls qemu-img) see it too.

Every call takes ``ok``: the exit codes that are accepted (default ``(0,)``); anything else
fails the test with the command, exit code, stdout and stderr.  ``ok=None`` accepts any
exit code (the caller inspects ``returncode``).
"""

from __future__ import annotations

import json as _json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent / "tools"
Ok = Sequence[int] | None
Arg = str | bytes | os.PathLike[str] | int  # bytes: an argument that is not UTF-8

_real = shutil.which("qemu-img")
if _real and os.path.dirname(os.path.abspath(_real)) != str(TOOLS) \
        and "DISKIMG_REAL_QEMU_IMG" not in os.environ:
    os.environ["DISKIMG_REAL_QEMU_IMG"] = _real
    os.environ["PATH"] = f"{TOOLS}{os.pathsep}{os.environ['PATH']}"

QEMU_IMG = str(TOOLS / "qemu-img") if os.environ.get("DISKIMG_REAL_QEMU_IMG") else None
QEMU_IO = shutil.which("qemu-io")
AVAILABLE = QEMU_IMG is not None and QEMU_IO is not None


def _checked(argv: list[Any], res: subprocess.CompletedProcess[Any], ok: Ok) -> None:
    if ok is not None and res.returncode not in tuple(ok):
        out, err = res.stdout, res.stderr
        if isinstance(out, bytes):
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        cmd = " ".join(map(str, argv))
        raise AssertionError(f"{cmd} exited {res.returncode} (expected {tuple(ok)})"
                             f"\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}")


class Qemu:
    """qemu-img and qemu-io as the tests use them."""

    def __init__(self, qemu_img: str | None = QEMU_IMG, qemu_io: str | None = QEMU_IO) -> None:
        self.qemu_img = qemu_img or "qemu-img"
        self.qemu_io = qemu_io or "qemu-io"

    # -- plumbing ---------------------------------------------------------------------------
    def run(self, argv: Sequence[Arg], *, ok: Ok = (0,), cwd: Arg | None = None,
            env: Mapping[str, str] | None = None, input: str | bytes | None = None,
            text: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` (stdin is /dev/null unless ``input`` is given)."""
        args: list[Any] = [a if isinstance(a, bytes) else str(a) for a in argv]
        kw: dict[str, Any] = {"input": input} if input is not None else \
            {"stdin": subprocess.DEVNULL}
        res = subprocess.run(args, capture_output=True, text=text, timeout=timeout,
                             cwd=None if cwd is None else str(cwd),
                             env=None if env is None else dict(env), **kw)
        _checked(args, res, ok)
        return res

    # -- qemu-img ---------------------------------------------------------------------------
    def img(self, *args: Arg, ok: Ok = (0,), cwd: Arg | None = None,
            env: Mapping[str, str] | None = None, input: str | bytes | None = None,
            text: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[Any]:
        """``qemu-img ARGS``."""
        return self.run([self.qemu_img, *args], ok=ok, cwd=cwd, env=env, input=input,
                        text=text, timeout=timeout)

    def json(self, sub: str, *args: Arg, ok: Ok = (0,), cwd: Arg | None = None) -> Any:
        """``qemu-img SUB --output=json ARGS``, parsed."""
        return _json.loads(self.img(sub, "--output=json", *args, ok=ok, cwd=cwd).stdout)

    def info(self, path: Arg, *extra: Arg, cwd: Arg | None = None) -> Any:
        return self.json("info", *extra, path, cwd=cwd)

    def map(self, path: Arg, fmt: str | None = None, *extra: Arg,
            cwd: Arg | None = None) -> Any:
        """``qemu-img map --output=json`` as a list of extents."""
        return self.json("map", *(("-f", fmt) if fmt else ()), *extra, path, cwd=cwd)

    def check(self, path: Arg, *extra: Arg, ok: Ok = (0, 2, 3),
              cwd: Arg | None = None) -> dict[str, Any]:
        """``qemu-img check --output=json`` (exit 0 clean, 2 corruptions, 3 leaks)."""
        res = self.img("check", "--output=json", *extra, path, ok=ok, cwd=cwd)
        report: dict[str, Any] = _json.loads(res.stdout)
        report["_returncode"] = res.returncode
        return report

    def check_clean(self, path: Arg, *extra: Arg, cwd: Arg | None = None) -> None:
        """qemu-img check exits 0 and reports no corruption, leak or check error."""
        res = self.img("check", *extra, path, ok=None, cwd=cwd)
        assert res.returncode == 0 and "No errors were found on the image." in res.stdout, \
            f"qemu-img check {path} exited {res.returncode}: {res.stdout}{res.stderr}"

    def compare(self, a: Arg, b: Arg, *extra: Arg, cwd: Arg | None = None) -> int:
        """``qemu-img compare`` exit code (0 identical, 1 differ, 2+ error)."""
        return self.img("compare", *extra, a, b, ok=None, cwd=cwd).returncode

    def raw_bytes(self, path: Arg, fmt: str | None = None, *extra: Arg,
                  cwd: Arg | None = None) -> bytes:
        """Every guest byte of ``path`` as qemu sees it (``convert -O raw`` to a temp file).
        ``extra`` goes before the source (e.g. ``--object ... --image-opts``)."""
        with tempfile.TemporaryDirectory(prefix="qemukit-") as d:
            out = Path(d) / "out.raw"
            self.img("convert", *(("-f", fmt) if fmt else ()), *extra, "-O", "raw",
                     path, out, cwd=cwd)
            return out.read_bytes()

    # -- qemu-io ----------------------------------------------------------------------------
    def io(self, path: Arg, *cmds: str, fmt: str | None = "qcow2",
           image_opts: bool = False, objects: Sequence[str] = (), read_only: bool = False,
           share: bool = False, extra: Sequence[Arg] = (), ok: Ok = (0,),
           verify: bool = True, cwd: Arg | None = None, env: Mapping[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[Any]:
        """``qemu-io [-f FMT] -c CMD ... PATH``.

        ``image_opts``: ``path`` is an ``--image-opts`` string (no ``-f``); ``objects``
        each become ``--object OBJ`` (e.g. ``secret,id=sec0,data=...``); ``read_only``
        adds ``-r``, ``share`` adds ``-U``.  With ``verify`` (the default) a "Pattern
        verification failed" in the output fails the test even though qemu-io exits 0.
        """
        argv: list[Arg] = [self.qemu_io]
        for o in objects:
            argv += ["--object", o]
        if image_opts:
            argv.append("--image-opts")
        elif fmt:
            argv += ["-f", fmt]
        if read_only:
            argv.append("-r")
        if share:
            argv.append("-U")
        argv += list(extra)
        for c in cmds:
            argv += ["-c", c]
        res = self.run([*argv, path], ok=ok, cwd=cwd, env=env, timeout=timeout)
        if verify:
            out = res.stdout + res.stderr
            assert "Pattern verification failed" not in out, f"qemu-io {path} {cmds}: {out}"
        return res


    # -- qemu-nbd + nbdinfo --------------------------------------------------------------
    @contextmanager
    def nbd(self, path: Arg, *args: Arg, fmt: str | None = "qcow2",
            sock: Arg | None = None) -> Iterator[str]:
        """``qemu-nbd -t ARGS -f FMT -k SOCK PATH`` while the block runs; yields the
        socket's path (a temporary one unless ``sock``); the server is always stopped."""
        with tempfile.TemporaryDirectory(prefix="qemukit-nbd-") as d:
            where = str(sock) if sock is not None else str(Path(d) / "nbd.sock")
            argv: list[Arg] = ["qemu-nbd", "-t", *args]
            if fmt is not None:
                argv += ["-f", fmt]
            with serving([*argv, "-k", where, path], where):
                yield where

    def dirty_map(self, path: Arg, bitmap: str, fmt: str = "qcow2") -> list[tuple[int, int]]:
        """The dirty (offset, length) extents of persistent bitmap ``bitmap`` as qemu
        exports them: ``qemu-nbd -r -B BITMAP`` on a unix socket, read with ``nbdinfo
        --map=qemu:dirty-bitmap:BITMAP --json``; the server is always stopped."""
        with self.nbd(path, "-r", "-B", bitmap, fmt=fmt) as sock:
            res = self.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--json",
                            f"nbd+unix:///?socket={sock}"])
        out: list[tuple[int, int]] = []
        for ext in _json.loads(res.stdout):
            if ext["type"] & 1:
                if out and out[-1][0] + out[-1][1] == ext["offset"]:
                    out[-1] = (out[-1][0], out[-1][1] + ext["length"])
                else:
                    out.append((ext["offset"], ext["length"]))
        return out


def _listening(sock: Arg) -> bool:
    """Whether the Unix socket ``sock`` accepts connections.  qemu-nbd binds the name
    and listens after, and a connect in between is refused (CI saw it), so the file
    alone is not enough: a socket still bound under that name without the listening
    flag (__SO_ACCEPTCON, 0x10000, in /proc/net/unix) is not ready.  ``diskimg nbd``
    binds a temporary name, listens, then renames it into place: its file appears ready.
    No probe connection is made (a server without -t would end after it)."""
    if not os.path.exists(sock):
        return False
    names = {str(sock), os.path.abspath(str(sock))}  # as bound: relative or absolute
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:  # no procfs: the file's existence is all there is to go on
        return True
    for line in lines:
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[7] in names and not int(fields[3], 16) & 0x10000:
            return False
    return True


@contextmanager
def serving(argv: Sequence[Arg], sock: Arg, *, env: Mapping[str, str] | None = None,
            timeout: float = 20.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run an NBD server (qemu-nbd, or ``diskimg nbd``) that listens on the Unix socket
    ``sock`` while the block runs: yields the process once the socket exists; it is
    stopped on the way out, whatever happened: SIGTERM (a clean exit: the image flushed
    and unlocked), SIGKILL when that takes more than 10 s; always reaped."""
    server = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(sock) and server.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _listening(sock):
            server.kill()
            raise AssertionError(f"{' '.join(map(str, argv))} did not listen: "
                                 f"{server.communicate()[1]!r}")
        yield server
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        server.wait()
        if server.stderr is not None:
            server.stderr.close()


QEMU = Qemu()
