"""Lock safety (issue 15 bug 1 and its test net): nothing diskimg writes is touched while
another process holds QEMU's lock on it, and diskimg's own lock keeps qemu out.

Every writing CLI command and API call runs against images that a live ``qemu-io`` holds
open for writing (what a running VM looks like to the lock bytes).  Each must fail with
qemu's words, and the sha256 of every file in the directory (image, backing file, data
file, source, pool XML and state) must be unchanged -- the old code emptied the target
(``O_TRUNC``) before it found out about the lock.  For qcow2 and vmdk the message is
compared with qemu-img's for the same command; qemu's raw driver shares write access, so
qemu-img goes ahead on a raw file qemu-io holds, while diskimg refuses it with qemu's
"shared write" wording.  The reverse direction: while diskimg holds an image open "r+",
qemu-io and qemu-img refuse it and the file stays as it is.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import ImageLockedError

pytestmark = pytest.mark.qemu

SRC = str(Path(diskimg.__file__).resolve().parents[1])  # the diskimg under test


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (names relative to it), symlinks as their target."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = "-> " + os.readlink(p)
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def held(qemu_io: str, img: Path, fmt: str) -> Iterator[None]:
    """``img`` open read-write in an interactive qemu-io until the block ends; once it has
    answered a read, it holds its lock."""
    p = subprocess.Popen([qemu_io, "-f", fmt, str(img)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=img.parent)  # qemu finds a relative data file name from here
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("read 0 512\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert "read 512/512 bytes" in line, line
        yield
    finally:
        if p.stdin:
            p.stdin.close()  # EOF: qemu-io quits
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def di(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "diskimg", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def write_lock(img: Path) -> str:
    return f'Failed to get "write" lock\nIs another process using the image [{img}]?'


def shared_lock(img: Path) -> str:
    return f'Failed to get shared "write" lock\nIs another process using the image [{img}]?'


@pytest.fixture
def images(master_images: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`master_images` for one test."""
    d = tmp_path / "imgs"
    shutil.copytree(master_images, d)
    return d


@pytest.fixture(scope="module")
def master_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of images with data in them: base.qcow2 <- top.qcow2, a qcow2 with a
    snapshot and an external data file, raw, vmdk (sparse and flat), a source."""
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("lock-safety") / "imgs"
    d.mkdir()

    def q(*a: str) -> None:
        r = QEMU.img(*a, cwd=d, ok=None)
        assert r.returncode == 0, r.stderr

    def w(fmt: str, name: str, pattern: int, off: str) -> None:
        r = QEMU.io(name, f"write -P {pattern} {off} 64k", fmt=fmt, cwd=d, ok=None,
                    verify=False)
        assert r.returncode == 0, r.stderr

    q("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    w("qcow2", "base.qcow2", 1, "0")
    q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    w("qcow2", "top.qcow2", 2, "64k")
    q("create", "-q", "-f", "qcow2", "snap.qcow2", "1M")
    w("qcow2", "snap.qcow2", 3, "0")
    q("snapshot", "-c", "s1", "snap.qcow2")
    w("qcow2", "snap.qcow2", 4, "128k")
    q("create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "ext.qcow2", "1M")
    w("qcow2", "ext.qcow2", 5, "0")
    q("create", "-q", "-f", "qcow2", "nb.qcow2", "1M")
    q("create", "-q", "-f", "raw", "img.raw", "1M")
    w("raw", "img.raw", 6, "0")
    q("create", "-q", "-f", "vmdk", "img.vmdk", "1M")
    w("vmdk", "img.vmdk", 7, "0")
    q("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M")
    w("vmdk", "flat.vmdk", 8, "0")
    q("create", "-q", "-f", "raw", "src.raw", "1M")
    w("raw", "src.raw", 9, "192k")
    return d


# (the image qemu-io holds, its format, the command): diskimg's exit code and stderr must be
# qemu-img's for the same command under the same hold
Case = tuple[str, str, list[str]]

QCOW2_CASES: list[Case] = [
    ("top.qcow2", "qcow2", ["create", "-f", "qcow2", "top.qcow2", "1M"]),
    ("top.qcow2", "qcow2", ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                            "top.qcow2"]),
    ("ext.qcow2", "qcow2", ["create", "-f", "qcow2", "-o", "data_file=ext.data",
                            "ext.qcow2", "1M"]),
    ("top.qcow2", "qcow2", ["convert", "-O", "qcow2", "src.raw", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["convert", "-c", "-O", "qcow2", "src.raw", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["convert", "-n", "-O", "qcow2", "src.raw", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["dd", "-O", "qcow2", "if=src.raw", "of=top.qcow2"]),
    ("top.qcow2", "qcow2", ["resize", "top.qcow2", "2M"]),
    ("top.qcow2", "qcow2", ["commit", "top.qcow2"]),
    ("base.qcow2", "qcow2", ["commit", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["rebase", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["rebase", "-u", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"]),
    ("nb.qcow2", "qcow2", ["rebase", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"]),
    ("top.qcow2", "qcow2", ["amend", "-o", "lazy_refcounts=on", "top.qcow2"]),
    ("snap.qcow2", "qcow2", ["snapshot", "-c", "s2", "snap.qcow2"]),
    ("snap.qcow2", "qcow2", ["snapshot", "-a", "s1", "snap.qcow2"]),
    ("snap.qcow2", "qcow2", ["snapshot", "-d", "s1", "snap.qcow2"]),
    ("snap.qcow2", "qcow2", ["check", "-r", "all", "snap.qcow2"]),
    ("snap.qcow2", "qcow2", ["check", "-r", "leaks", "snap.qcow2"]),
    ("src.raw", "raw", ["convert", "-O", "qcow2", "src.raw", "new.qcow2"]),
]
VMDK_CASES: list[Case] = [
    ("img.vmdk", "vmdk", ["create", "-f", "vmdk", "img.vmdk", "1M"]),
    ("flat.vmdk", "vmdk", ["create", "-f", "vmdk", "-o", "subformat=monolithicFlat",
                           "flat.vmdk", "1M"]),
    ("img.vmdk", "vmdk", ["convert", "-O", "vmdk", "src.raw", "img.vmdk"]),
    ("img.vmdk", "vmdk", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                          "src.raw", "img.vmdk"]),
    ("flat.vmdk", "vmdk", ["convert", "-n", "-O", "vmdk", "src.raw", "flat.vmdk"]),
    ("img.vmdk", "vmdk", ["dd", "-O", "vmdk", "if=src.raw", "of=img.vmdk"]),
    ("img.vmdk", "vmdk", ["resize", "img.vmdk", "2M"]),
    ("img.vmdk", "vmdk", ["snapshot", "-c", "s", "img.vmdk"]),
    ("img.vmdk", "vmdk", ["check", "-r", "all", "img.vmdk"]),
    ("img.vmdk", "vmdk", ["commit", "img.vmdk"]),
    ("img.vmdk", "vmdk", ["rebase", "-u", "-b", "", "img.vmdk"]),
    ("img.vmdk", "vmdk", ["amend", "-o", "toolsversion=3", "img.vmdk"]),
]


def _restore(images: Path, master: Path) -> None:
    """Put back the images a failing command changed, so the next case starts clean."""
    shutil.rmtree(images)
    shutil.copytree(master, images)


def _run_cases(images: Path, master: Path, qemu_io: str, cases: list[Case]) -> None:
    failures = []
    for held_name, fmt, args in cases:
        with held(qemu_io, images / held_name, fmt):
            before = digests(images)
            mine = di(*args, cwd=images)
            after_mine = digests(images)
        if after_mine != before:
            changed = sorted(k for k in set(before) | set(after_mine)
                             if before.get(k) != after_mine.get(k))
            failures.append(f"{args}: changed {changed}")
            _restore(images, master)
        with held(qemu_io, images / held_name, fmt):
            theirs = QEMU.img(*args, cwd=images, ok=None)
            assert theirs.returncode == 1 and digests(images) == before, \
                (args, theirs.stderr)
        want = theirs.stderr.replace("qemu-img: ", "diskimg: ")
        if mine.returncode != 1 or mine.stderr != want:
            failures.append(f"{args}: exit {mine.returncode}, stderr {mine.stderr!r}, "
                            f"qemu-img: {theirs.stderr!r}")
    assert not failures, "\n".join(failures)


def test_qcow2_commands_leave_a_held_image_alone(images: Path, master_images: Path,
                                                 qemu_io: str) -> None:
    _run_cases(images, master_images, qemu_io, QCOW2_CASES)


def test_vmdk_commands_leave_a_held_image_alone(images: Path, master_images: Path,
                                                qemu_io: str) -> None:
    _run_cases(images, master_images, qemu_io, VMDK_CASES)


def test_raw_commands_leave_a_held_image_alone(images: Path, master_images: Path,
                                               qemu_io: str) -> None:
    """qemu's raw driver shares write access, so qemu-img would go ahead here; diskimg
    refuses a raw file another process writes, in qemu's words for that conflict."""
    img = images / "img.raw"
    cases = [
        (["create", "-f", "raw", "img.raw", "1M"], f"{img.name}: {shared_lock(img.name)}"),
        (["convert", "-O", "raw", "src.raw", "img.raw"],
         f"img.raw: error while converting raw: {shared_lock(img.name)}"),
        (["convert", "-n", "-O", "raw", "src.raw", "img.raw"],
         f"Could not open 'img.raw': {shared_lock(img.name)}"),
        (["dd", "-O", "raw", "if=src.raw", "of=img.raw"],
         f"img.raw: error while creating output image: {shared_lock(img.name)}"),
        (["resize", "-f", "raw", "img.raw", "2M"],
         f"Could not open 'img.raw': {shared_lock(img.name)}"),
    ]
    failures = []
    for args, want in cases:
        with held(qemu_io, img, "raw"):
            before = digests(images)
            r = di(*args, cwd=images)
            changed = digests(images) != before
        if (r.returncode, r.stderr) != (1, f"diskimg: {want}\n"):
            failures.append(f"{args}: exit {r.returncode}, stderr {r.stderr!r}")
        if changed:
            failures.append(f"{args}: changed files")
            _restore(images, master_images)
    assert not failures, "\n".join(failures)


def _api_calls(d: Path) -> list[tuple[str, str, Callable[[], object]]]:
    from diskimg.qcow2.amend import amend

    def snap() -> None:
        with diskimg.open(d / "snap.qcow2", "r+") as img:
            img.snapshots.create("s2")  # type: ignore[attr-defined]

    def check_repair() -> None:
        with diskimg.open(d / "snap.qcow2", "r+", for_check=True) as img:
            img.check(repair="all")  # type: ignore[attr-defined]

    return [
        ("top.qcow2", "qcow2", lambda: diskimg.create(d / "top.qcow2", "qcow2", 1 << 20)),
        ("ext.qcow2", "qcow2", lambda: diskimg.create(
            d / "ext.qcow2", "qcow2", 1 << 20, options={"data_file": "ext.data"})),
        ("img.raw", "raw", lambda: diskimg.create(d / "img.raw", "raw", 1 << 20)),
        ("img.vmdk", "vmdk", lambda: diskimg.create(d / "img.vmdk", "vmdk", 1 << 20)),
        ("flat.vmdk", "vmdk", lambda: diskimg.create(
            d / "flat.vmdk", "vmdk", 1 << 20, options={"subformat": "monolithicFlat"})),
        ("top.qcow2", "qcow2", lambda: diskimg.convert(d / "src.raw", d / "top.qcow2",
                                                       "qcow2")),
        ("img.raw", "raw", lambda: diskimg.convert(d / "src.raw", d / "img.raw", "raw")),
        ("img.vmdk", "vmdk", lambda: diskimg.convert(d / "src.raw", d / "img.vmdk", "vmdk")),
        ("top.qcow2", "qcow2", lambda: diskimg.convert(d / "src.raw", d / "top.qcow2",
                                                       "qcow2", target_exists=True)),
        ("img.raw", "raw", lambda: diskimg.dd(d / "src.raw", d / "img.raw", "raw")),
        ("top.qcow2", "qcow2", lambda: diskimg.dd(d / "src.raw", d / "top.qcow2", "qcow2")),
        ("top.qcow2", "qcow2", lambda: diskimg.commit(d / "top.qcow2")),
        ("base.qcow2", "qcow2", lambda: diskimg.commit(d / "top.qcow2")),
        ("top.qcow2", "qcow2", lambda: diskimg.rebase(d / "top.qcow2", "nb.qcow2", "qcow2")),
        ("nb.qcow2", "qcow2", lambda: diskimg.rebase(d / "top.qcow2", "nb.qcow2", "qcow2")),
        ("top.qcow2", "qcow2", lambda: amend(d / "top.qcow2", {"lazy_refcounts": "on"})),
        ("snap.qcow2", "qcow2", snap),
        ("snap.qcow2", "qcow2", check_repair),
        ("img.raw", "raw", lambda: diskimg.open(d / "img.raw", "r+").close()),
    ]


def test_api_calls_leave_a_held_image_alone(images: Path, master_images: Path,
                                            qemu_io: str) -> None:
    failures = []
    for i, (held_name, fmt, call) in enumerate(_api_calls(images)):
        with held(qemu_io, images / held_name, fmt):
            before = digests(images)
            try:
                call()
                failures.append(f"call {i} ({held_name}): no error")
            except ImageLockedError as e:
                msg = str(e)
                if "lock\nIs another process using the image [" not in msg:
                    failures.append(f"call {i} ({held_name}): {msg!r}")
            changed = digests(images) != before
        if changed:
            failures.append(f"call {i} ({held_name}): changed files")
            _restore(images, master_images)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk"])
def test_qemu_refuses_an_image_diskimg_holds(images: Path, fmt: str, qemu_io: str) -> None:
    """The reverse: while diskimg has the image open "r+", qemu-io and qemu-img (info
    without -U, check, create over it, convert onto it) are refused and change nothing."""
    name = {"qcow2": "top.qcow2", "raw": "img.raw", "vmdk": "img.vmdk"}[fmt]
    img = images / name
    with diskimg.open(img, "r+", fmt) as dev:
        data = dev.read(0, 256 << 10)
        before = digests(images)
        results = {
            "qemu-io": QEMU.io(name, "write -P 0x55 0 64k", fmt=fmt, cwd=images, ok=None,
                               verify=False),
            "create": QEMU.img("create", "-f", fmt, name, "1M", cwd=images, ok=None),
            "convert": QEMU.img("convert", "-O", fmt, "src.raw", name, cwd=images, ok=None),
            "convert -n": QEMU.img("convert", "-n", "-O", fmt, "src.raw", name, cwd=images,
                                   ok=None),
        }
        if fmt != "raw":  # qemu's raw driver lets readers share a writer's file
            results["info"] = QEMU.img("info", "-f", fmt, name, cwd=images, ok=None)
            results["check"] = QEMU.img("check", "-f", fmt, name, cwd=images, ok=None)
        assert digests(images) == before
        assert dev.read(0, 256 << 10) == data
    for what, r in results.items():
        assert r.returncode != 0, (what, r.stdout)
        assert "lock\nIs another process using the image [" in r.stderr, (what, r.stderr)
        assert f"[{name}]?" in r.stderr, (what, r.stderr)
    # released on close: qemu-img reads it, and its bytes are the ones diskimg saw
    r = QEMU.img("info", "-f", fmt, name, cwd=images, ok=None)
    assert r.returncode == 0, r.stderr
    r = QEMU.io(name, "read -P 0 256k 64k", fmt=fmt, cwd=images, ok=None, verify=False)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


# --- pool verbs --------------------------------------------------------------------------


def test_pool_verbs_leave_a_held_volume_alone(tmp_path: Path, qemu_io: str) -> None:
    """vol-create(-as/-from), vol-clone, vol-upload, vol-wipe, vol-resize and vol-delete
    with a volume qemu-io holds: refused, every file (volumes, pool XML, state) the same,
    the error ends in qemu-img's two lines (what libvirt relays from qemu-img)."""
    from diskimg.pool.cli import main

    cfg = tmp_path / "cfg"
    state = tmp_path / "state"

    def virsh(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = main(["--config-dir", str(cfg), "--state-dir", str(state), *args],
                  stdout=out, stderr=err)
        return rc, err.getvalue()

    pool_dir = tmp_path / "pool"
    assert virsh("pool-define-as", "p1", "dir", "--target", str(pool_dir))[0] == 0
    assert virsh("pool-build", "p1")[0] == 0
    assert virsh("pool-start", "p1")[0] == 0
    up = tmp_path / "up.bin"
    up.write_bytes(b"u" * 4096)
    xml = tmp_path / "vol.xml"
    failures = []
    for fmt in ("qcow2", "raw", "vmdk"):
        name = f"vm.{fmt}"
        assert virsh("vol-create-as", "p1", name, "1M", "--format", fmt)[0] == 0
        path = pool_dir / name
        r = QEMU.io(path, "write -P 0x33 0 64k", fmt=fmt, cwd=tmp_path, ok=None, verify=False)
        assert r.returncode == 0, r.stderr
        xml.write_text(f"<volume><name>{name}</name><capacity>1048576</capacity>"
                       f"<target><format type='{fmt}'/></target></volume>")
        clone_xml = tmp_path / "clone.xml"
        clone_xml.write_text(f"<volume><name>copy.{fmt}</name><capacity>1048576</capacity>"
                             f"<target><format type='{fmt}'/></target></volume>")
        def lines(msg: str) -> str:  # virsh prints each line of an error after "error: "
            return f"error: Could not open '{path}': " + msg.replace("\n", "\nerror: ")

        wording = lines(write_lock(path) if fmt != "raw" else shared_lock(path))
        cmds = [
            (["vol-create-as", "p1", name, "1M", "--format", fmt], "exists already"),
            (["vol-create", "p1", str(xml)], "exists already"),
            (["vol-create-from", "p1", str(clone_xml), name, "--inputpool", "p1"],
             lines(shared_lock(path))),
            (["vol-clone", name, f"copy.{fmt}", "--pool", "p1"], lines(shared_lock(path))),
            (["vol-upload", name, str(up), "--pool", "p1"], wording),
            (["vol-wipe", name, "p1"], wording),
            (["vol-delete", name, "p1"], wording),
        ]
        if fmt != "vmdk":
            cmds.append((["vol-resize", name, "2M", "--pool", "p1"], wording))
        # vol-download onto a file a running QEMU holds (here: the held image itself)
        cmds.append((["vol-download", name, str(path), "--pool", "p1"], wording))
        with held(qemu_io, path, fmt):
            before = digests(tmp_path)
            for args, want in cmds:
                rc, err = virsh(*args)
                if rc != 1 or want not in err or "Traceback" in err:
                    failures.append(f"{args}: exit {rc}: {err!r}")
                if digests(tmp_path) != before:
                    failures.append(f"{args}: changed files")
        assert not failures, "\n".join(failures)
        # the same volume, free again, is cloned and deleted normally
        assert virsh("vol-clone", name, f"copy.{fmt}", "--pool", "p1")[0] == 0
        r = QEMU.img("compare", "-f", fmt, "-F", fmt, path, pool_dir / f"copy.{fmt}",
                     cwd=tmp_path, ok=None)
        assert r.returncode == 0, r.stdout + r.stderr
        assert virsh("vol-delete", f"copy.{fmt}", "p1")[0] == 0
    assert not failures, "\n".join(failures)


def _virsh(tmp_path: Path) -> Callable[..., tuple[int, str]]:
    """``virsh`` (diskimg's) over a config and state directory in ``tmp_path``, with an
    active pool ``p1`` at ``tmp_path / "pool"``: (exit code, stderr) of a command."""
    from diskimg.pool.cli import main

    def virsh(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = main(["--config-dir", str(tmp_path / "cfg"), "--state-dir",
                   str(tmp_path / "state"), *args], stdout=out, stderr=err)
        return rc, err.getvalue()

    for args in (["pool-define-as", "p1", "dir", "--target", str(tmp_path / "pool")],
                 ["pool-build", "p1"], ["pool-start", "p1"]):
        assert virsh(*args) == (0, ""), args
    return virsh


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_forced_wipe_of_a_held_volume_leaves_a_usable_empty_image(
        tmp_path: Path, qemu_io: str, fmt: str) -> None:
    """``vol-wipe --force`` on a qcow2 or vmdk volume a running qemu-io holds: the old data
    is gone and an empty image of the same format and size is in its place.  The
    re-create used to take QEMU's lock itself, was refused by qemu-io's, and left a
    0-byte file (exit 1) where the volume was."""
    virsh = _virsh(tmp_path)
    name = f"vm.{fmt}"
    path = tmp_path / "pool" / name
    assert virsh("vol-create-as", "p1", name, "4M", "--format", fmt)[0] == 0
    r = QEMU.io(path, "write -P 0x33 0 1M", fmt=fmt, cwd=tmp_path, ok=None, verify=False)
    assert r.returncode == 0, r.stderr
    before = QEMU.img("info", "--output=json", "-f", fmt, path, cwd=tmp_path, ok=None)
    with held(qemu_io, path, fmt):
        assert virsh("vol-wipe", name, "p1", "--force") == (0, "")
    r = QEMU.img("check", "-f", fmt, path, cwd=tmp_path, ok=None)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    after = QEMU.img("info", "--output=json", "-f", fmt, path, cwd=tmp_path, ok=None)
    import json

    old, new = json.loads(before.stdout), json.loads(after.stdout)
    assert (new["format"], new["virtual-size"]) == (old["format"], old["virtual-size"])
    r = QEMU.io(path, "read -P 0 0 4M", fmt=fmt, cwd=tmp_path, ok=None, verify=False)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout
    assert b"\x33" * 512 not in path.read_bytes()  # no sector of the old data is left


def test_wipe_of_a_vmdk_whose_backing_file_is_gone_changes_nothing(
        tmp_path: Path) -> None:
    """A vmdk's re-create reads its backing file (the parent's CID).  With that file gone,
    vol-wipe is refused before the first byte is overwritten: the volume stays
    byte-identical (it used to be overwritten, then emptied, and the re-create failed)."""
    virsh = _virsh(tmp_path)
    pool = tmp_path / "pool"
    QEMU.img("create", "-q", "-f", "vmdk", pool / "base.vmdk", "1M", cwd=tmp_path)
    QEMU.img("create", "-q", "-f", "vmdk", "-b", pool / "base.vmdk", "-F", "vmdk",
             pool / "child.vmdk", cwd=tmp_path)
    r = QEMU.io(pool / "child.vmdk", "write -P 0x44 0 64k", fmt="vmdk", cwd=tmp_path,
                ok=None, verify=False)
    assert r.returncode == 0, r.stderr
    (pool / "base.vmdk").unlink()
    assert virsh("pool-refresh", "p1")[0] == 0
    before = digests(tmp_path)
    rc, err = virsh("vol-wipe", "child.vmdk", "p1")
    assert rc == 1 and "Failed to wipe vol child.vmdk" in err, err
    assert "base.vmdk" in err and "Traceback" not in err, err
    assert digests(tmp_path) == before


@pytest.mark.parametrize(("name", "fmt", "opts", "other"), [
    ("vm.qcow2", "qcow2", ["-o", "data_file=vm.data"], "vm.data"),
    ("vm.vmdk", "vmdk", ["-o", "subformat=monolithicFlat"], "vm-flat.vmdk"),
    ("vm.vmdk", "vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "vm-s001.vmdk")])
def test_wipe_of_a_volume_whose_data_lives_in_another_file_changes_nothing(
        tmp_path: Path, name: str, fmt: str, opts: list[str], other: str) -> None:
    """A qcow2 with an external data file, a vmdk with extent files: the guest's bytes are
    in the other file, which wiping the volume file would leave as it is.  vol-wipe is
    refused before the first byte is written (every file byte-identical, the guest data
    still readable) instead of reporting a wipe that left the data behind."""
    virsh = _virsh(tmp_path)
    pool = tmp_path / "pool"
    QEMU.img("create", "-q", "-f", fmt, *opts, pool / name, "1M", cwd=pool)
    r = QEMU.io(pool / name, "write -P 0x5e 0 64k", fmt=fmt, cwd=pool, ok=None,
                verify=False)
    assert r.returncode == 0, r.stderr
    assert b"\x5e" * 512 in (pool / other).read_bytes()
    assert virsh("pool-refresh", "p1")[0] == 0
    before = digests(tmp_path)
    rc, err = virsh("vol-wipe", name, "p1")
    assert rc == 1 and f"Failed to wipe vol {name}" in err, err
    assert "keeps guest data in other files too" in err and other in err, err
    assert digests(tmp_path) == before


@pytest.mark.parametrize(("fmt", "opts"), [
    ("raw", {}), ("raw", {"preallocation": "full"}), ("qcow2", {}),
    ("qcow2", {"preallocation": "metadata"}), ("qcow2", {"preallocation": "falloc"}),
    ("qcow2", {"data_file": "img.data"}), ("vmdk", {}),
    ("vmdk", {"subformat": "twoGbMaxExtentSparse"}), ("vmdk", {"subformat": "monolithicFlat"}),
    ("luks", {"key-secret": "s0", "iter-time": 10})])
def test_a_create_told_not_to_lock_goes_ahead_where_a_locking_one_is_refused(
        tmp_path: Path, qemu_io: str, fmt: str, opts: dict[str, object]) -> None:
    """``make_image(lock=False)`` (how vol-wipe re-creates a volume whose lock its own
    descriptor holds, or was forced past) takes no lock on any file it makes, on every
    branch: raw, qcow2 with preallocation or a data file, multi-file vmdk, luks.  Without
    it the same create over a file qemu-io holds is refused and changes no byte."""
    from diskimg.image_create import make_image

    secrets = {"s0": b"pw"}
    img = tmp_path / f"img.{fmt}"
    diskimg.create(img, fmt, 1 << 20, options=dict(opts), secrets=secrets)
    with held(qemu_io, img, "raw"):
        before = digests(tmp_path)
        with pytest.raises(ImageLockedError):
            make_image(img, fmt, 2 << 20, None, None, dict(opts), secrets)
        assert digests(tmp_path) == before
        make_image(img, fmt, 2 << 20, None, None, dict(opts), secrets, lock=False)
    spec = (f"driver=luks,key-secret=s0,file.filename={img}" if fmt == "luks"
            else f"driver={fmt},file.filename={img}")
    obj = ["--object", "secret,id=s0,data=pw"] if fmt == "luks" else []
    r = QEMU.img("info", "--output=json", *obj, "--image-opts", spec, cwd=tmp_path, ok=None)
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["virtual-size"] == 2 << 20
    if fmt in ("qcow2", "vmdk"):
        r = QEMU.img("check", "-f", fmt, img, cwd=tmp_path, ok=None)
        assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(("name", "fmt", "part", "pattern"),
                         [("ext.qcow2", "qcow2", "ext.data", 5),
                          ("flat.vmdk", "vmdk", "flat-flat.vmdk", 8)])
def test_files_an_image_names_are_locked_with_it(images: Path, name: str, fmt: str,
                                                 part: str, pattern: int) -> None:
    """qemu locks every file of an image; diskimg holding a qcow2 or vmdk "r+" holds its
    external data file or extents too, so qemu-io cannot write guest data under it."""
    with diskimg.open(images / name, "r+") as dev:
        data = dev.read(0, 128 << 10)
        before = digests(images)
        r = QEMU.io(part, "write -P 0x77 0 64k", fmt="raw", cwd=images, ok=None, verify=False)
        assert r.returncode == 1, r.stdout
        assert r.stderr == (f"qemu-io: can't open device {part}: "
                            f"{write_lock(Path(part))}\n"), r.stderr
        assert digests(images) == before
        assert dev.read(0, 128 << 10) == data
    r = QEMU.io(name, f"read -P {pattern} 0 64k", fmt=fmt, cwd=images, ok=None, verify=False)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


@pytest.mark.parametrize("args", [
    ["check", "-r", "all", "-f", "raw", "img.raw"], ["check", "-r", "leaks", "-f", "raw",
                                                    "img.raw"],
    ["check", "-f", "raw", "img.raw"], ["check", "-r", "all", "img.raw"],
    ["check", "img.raw"], ["check", "--output=json", "-f", "raw", "img.raw"],
])
def test_check_of_a_held_raw_file_reports_no_check_support_like_qemu(
        images: Path, qemu_io: str, args: list[str]) -> None:
    """qemu's raw driver unshares nothing, so qemu-img check of a raw file a qemu-io holds
    opens it and says "This image format does not support checks" (exit 63); diskimg gave
    its lock error.  Every file stays byte-identical."""
    img = images / "img.raw"
    with held(qemu_io, img, "raw"):
        before = digests(images)
        mine = di(*args, cwd=images)
        assert digests(images) == before
        theirs = QEMU.img(*args, cwd=images, ok=None)
        assert digests(images) == before
    assert theirs.returncode == 63
    assert (mine.returncode, mine.stdout, mine.stderr) == (
        theirs.returncode, theirs.stdout, theirs.stderr.replace("qemu-img: ", "diskimg: "))


def test_check_of_raw_still_refused_where_qemu_refuses(images: Path, qemu_io: str) -> None:
    """A qcow2 holder unshares write: check -r all -f raw (a writer) is refused by both,
    check -f raw (a reader) reaches "does not support checks" in both."""
    img = images / "top.qcow2"
    for args, code in ((["check", "-r", "all", "-f", "raw", img.name], 1),
                       (["check", "-f", "raw", img.name], 63)):
        with held(qemu_io, img, "qcow2"):
            before = digests(images)
            mine = di(*args, cwd=images)
            theirs = QEMU.img(*args, cwd=images, ok=None)
            assert digests(images) == before
        assert theirs.returncode == code
        assert (mine.returncode, mine.stderr) == (
            theirs.returncode, theirs.stderr.replace("qemu-img: ", "diskimg: "))
