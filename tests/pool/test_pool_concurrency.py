"""Two processes in one pool, and volumes a running QEMU holds (issue 6, item 5).

- diskimg's per-volume lock: an operation on a volume waits for another diskimg process
  working on it (a create still filling it, a clone reading it) and gives up cleanly after
  ``LOCK_TIMEOUT``;
- QEMU's image locks: a volume that ``qemu-io`` holds open for writing is not deleted, wiped,
  resized or uploaded to without ``--force``/``force=True``, and the error names the volume;
- a multiprocess stress run (create/delete/clone/resize/wipe on the same few names) leaves
  a pool where every file is a valid image that ``qemu-img check`` finds clean.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from diskimg.errors import ImageLockedError, PoolError
from diskimg.hostio import lock
from diskimg.pool import Pool, PoolRegistry, create, locking
from diskimg.pool.cli import main

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io missing")


@pytest.fixture
def reg(tmp_path: Path) -> PoolRegistry:
    return PoolRegistry(tmp_path / "cfg", tmp_path / "state")


@pytest.fixture
def pool(reg: PoolRegistry, tmp_path: Path) -> Pool:
    p = reg.define("p1", tmp_path / "images")
    p.build()
    p.start()
    return p


def virsh(tmp: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(["--config-dir", str(tmp / "cfg"), "--state-dir", str(tmp / "state"), *args],
              stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- diskimg's per-volume lock ----------------------------------------------------------------

def test_busy_volume_times_out_cleanly(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another diskimg process holds a volume's lock, operations give up after
    LOCK_TIMEOUT with an error naming the volume, and change nothing."""
    v = pool.create_volume("a.qcow2", "1M", "qcow2")
    before = digest(v.path)
    fd = os.open(v.path, os.O_RDWR)  # another process in the middle of, say, a wipe
    try:
        locking.lock_volume_fd(fd, True, "a.qcow2")
        monkeypatch.setattr(locking, "LOCK_TIMEOUT", 0.2)
        for op in (v.delete, lambda: v.resize(2 << 20), v.wipe,
                   lambda: v.clone("b.qcow2"), lambda: v.download(io.BytesIO())):
            with pytest.raises(PoolError, match=r"volume 'a\.qcow2' is busy"):
                op()
        assert sorted(os.listdir(pool.path)) == ["a.qcow2"]
        assert digest(v.path) == before
    finally:
        os.close(fd)
    v.delete()
    assert os.listdir(pool.path) == []


def test_delete_waits_for_create_in_progress(pool: Pool) -> None:
    """A delete that arrives while a volume is still being filled waits for the fill to end
    (without the per-volume lock it would remove the file under the creator's feet)."""
    src = pool.create_volume("src.raw", "1M")
    with open(src.path, "r+b") as f:
        f.write(b"payload")
    errors: list[BaseException] = []
    deleter_done = threading.Event()
    alive_during_fill: list[bool] = []

    def delete_new() -> None:
        try:
            pool.volume("copy.qcow2").delete()
        except BaseException as e:  # reported below
            errors.append(e)
        deleter_done.set()

    real_copy = create.copy_guest_data

    def slow_copy(*args: object) -> None:
        t = threading.Thread(target=delete_new)
        t.start()
        time.sleep(0.3)  # the deleter has had ample time: it must be waiting for the lock
        alive_during_fill.append(not deleter_done.is_set())
        real_copy(*args)  # type: ignore[arg-type]

    create.copy_guest_data = slow_copy  # type: ignore[assignment]
    try:
        made = src.clone("copy.qcow2", format="qcow2")
    finally:
        create.copy_guest_data = real_copy
    assert deleter_done.wait(10)
    assert alive_during_fill == [True]
    assert errors == []
    assert made.name == "copy.qcow2" and not os.path.exists(made.path)
    assert os.listdir(pool.path) == ["src.raw"]


def test_failed_create_never_removes_another_file(pool: Pool) -> None:
    """Cleanup after a failed create removes the file only if it is still the one this
    create made: a same-named volume created meanwhile by someone else survives."""
    def replace_then_fail(path: str) -> None:
        os.unlink(path)  # someone deleted ours (bypassing diskimg) and made their own
        Path(path).write_bytes(b"theirs")
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError, match="fill failed"):
        pool.create_volume("x.raw", 4096, _fill=replace_then_fail)
    assert Path(pool.path, "x.raw").read_bytes() == b"theirs"


# --- QEMU's image locks -----------------------------------------------------------------------

@contextmanager
def qemu_holding(path: str, fmt: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``qemu-io`` process with ``path`` open read-write (its commands come from a pipe we
    keep open), i.e. what a running VM looks like to the lock bytes."""
    proc = subprocess.Popen([QEMU_IO or "qemu-io", "-f", fmt, path], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        fd = os.open(path, os.O_RDONLY)
        try:  # look at the lock byte without taking any lock (that would race qemu-io)
            while not lock._held_by_other(fd, lock.LOCK_BASE_PERM + lock.PERM_WRITE):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "qemu-io did not lock the image"
                time.sleep(0.02)
        finally:
            os.close(fd)
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()  # EOF: qemu-io quits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_volume_held_by_qemu_is_refused(pool: Pool, tmp_path: Path, fmt: str) -> None:
    name = f"busy.{fmt}"
    assert virsh(tmp_path, "vol-create-as", "p1", name, "1M", "--format", fmt)[0] == 0
    v = pool.volume(name)
    (tmp_path / "up.bin").write_bytes(b"x" * 512)
    with qemu_holding(v.path, fmt):
        before = digest(v.path)
        for args in (["vol-delete", name, "p1"], ["vol-wipe", name, "p1"],
                     ["vol-resize", name, "2M", "--pool", "p1"],
                     ["vol-upload", name, str(tmp_path / "up.bin"), "--pool", "p1"]):
            rc, out, err = virsh(tmp_path, *args)
            assert rc == 1, args
            assert f"error: storage volume '{name}' in pool 'p1' is in use by another " \
                   "process" in err, err
            assert "--force" in err and "Traceback" not in err
            assert digest(v.path) == before, args
        for op in (v.delete, v.wipe, lambda: v.resize(2 << 20)):
            with pytest.raises(ImageLockedError, match=f"'{name}' in pool 'p1' is in use"):
                op()
        assert digest(v.path) == before
        info = json.loads(subprocess.run([QEMU_IMG or "", "info", "-U", "--output=json",
                                          v.path], capture_output=True, check=True).stdout)
        assert info["format"] == fmt and info["virtual-size"] == 1 << 20
        # force overrides: the file goes (the running QEMU keeps its open inode)
        rc, out, err = virsh(tmp_path, "vol-delete", name, "p1", "--force")
        assert (rc, err) == (0, "") and out == f"Vol {name} deleted\n\n"
        assert not os.path.exists(v.path)


# --- two processes, one pool ------------------------------------------------------------------

_WORKER = r"""
import json, os, random, sys, time, traceback
from diskimg.errors import ImageLockedError, PoolError
from diskimg.pool import PoolRegistry

cfg, state, seed, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pool = PoolRegistry(cfg, state).lookup("p1")
rnd = random.Random(seed)
names = [f"v{i}.{ext}" for i in range(4) for ext in ("raw", "qcow2")]
done = {"create": 0, "delete": 0, "clone": 0, "resize": 0, "wipe": 0, "refused": 0}
end = time.monotonic() + seconds
while time.monotonic() < end:
    name = rnd.choice(names)
    fmt = name.rsplit(".", 1)[1]
    op = rnd.choice(["create", "create", "delete", "clone", "clone", "resize", "wipe"])
    try:
        if op == "create":
            pool.create_volume(name, "1M", fmt)
        elif op == "clone":
            dst = rnd.choice([n for n in names if n.endswith(fmt)])
            pool.volume(name).clone(dst)
        elif op == "delete":
            pool.volume(name).delete()
        elif op == "resize":
            pool.volume(name).resize(2 << 20)
        else:
            pool.volume(name).wipe()
        done[op] += 1
    except (PoolError, ImageLockedError):
        done["refused"] += 1   # exists already / not found / busy / in use: a clean no
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
print(json.dumps(done))
"""


@needs_qemu
def test_two_processes_leave_a_consistent_pool(pool: Pool, tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "cfg"),
                               str(tmp_path / "state"), str(seed), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    totals: dict[str, int] = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        for k, n in json.loads(out).items():
            totals[k] = totals.get(k, 0) + n
    # both workers really raced: every operation succeeded somewhere, and some were refused
    assert all(totals[k] > 0 for k in ("create", "delete", "clone", "resize", "wipe",
                                        "refused")), totals
    files = sorted(os.listdir(pool.path))
    for fn in files:
        stem, ext = fn.rsplit(".", 1)
        assert stem in {f"v{i}" for i in range(4)} and ext in ("raw", "qcow2"), files
        path = os.path.join(pool.path, fn)
        info = json.loads(subprocess.run([QEMU_IMG or "", "info", "--output=json", path],
                                         capture_output=True, check=True).stdout)
        assert info["format"] == ext, (fn, info)
        assert info["virtual-size"] in (1 << 20, 2 << 20), (fn, info)
        if ext == "qcow2":
            chk = subprocess.run([QEMU_IMG or "", "check", path], capture_output=True,
                                 text=True)
            assert chk.returncode == 0, (fn, chk.stdout, chk.stderr)
        assert pool.volume(fn).format == ext
