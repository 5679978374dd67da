"""Error wording and option validation as qemu-img 7.2's (issue 17 item 7).

Every case runs the same command line with qemu-img and with diskimg, each in its own copy
of the same directory, and compares the exit code, stderr (qemu-img's program name replaced
by diskimg's), stdout, and that a refused command changed no file (the sha256 of every file
before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

from .conftest import Result, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

SRC = Path(diskimg.__file__).resolve().parents[1]  # the tree under test (PYTHONPATH's)

# -- the images a case starts from (made once with qemu-img, copied for each run) ---------


def _plain(d: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", d / "a.qcow2", "1M")
    QEMU.img("create", "-q", "-f", "raw", d / "r.raw", "1M")


def _small(d: Path) -> None:
    _plain(d)
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", d / "s.qcow2", "1M")


def _datafile(d: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "dfa.qcow2", "1M", cwd=d)


def _snap(d: Path) -> None:
    _plain(d)
    QEMU.img("snapshot", "-c", "s1", d / "a.qcow2")


def _self_loop(d: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", d / "a.qcow2", "1M")
    QEMU.img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", d / "a.qcow2")


def _loop3(d: Path) -> None:
    """lp/c -> lp/b -> lp/a -> lp/c, and t.qcow2 on top of lp/b."""
    (d / "lp").mkdir()
    QEMU.img("create", "-q", "-f", "qcow2", d / "lp/a.qcow2", "1M")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "lp/b.qcow2")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d / "lp/c.qcow2")
    QEMU.img("rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", d / "lp/a.qcow2")
    QEMU.img("create", "-q", "-u", "-f", "qcow2", "-b", "lp/b.qcow2", "-F", "qcow2",
             d / "t.qcow2", "1M", cwd=d)


def _sized(d: Path) -> None:
    """qcow2 headers whose size the L1 table cannot map: past what qemu's int L1 index
    reaches (``big``), within one L1 span of 2**64 (``wrap``: qemu's count wraps and its
    sector count fails), over an L1 table too small (``short``)."""
    for name, size in (("big", (1 << 61) + 512), ("wrap", (1 << 64) - 512),
                       ("short", 2 << 40)):
        QEMU.img("create", "-q", "-f", "qcow2", d / f"{name}.qcow2", "1M")
        with open(d / f"{name}.qcow2", "r+b") as f:
            f.seek(24)  # the header's size field
            f.write(size.to_bytes(8, "big"))


SETUPS: dict[str, Callable[[Path], None]] = {"plain": _plain, "snap": _snap, "small": _small,
                                              "datafile": _datafile,
                                              "self-loop": _self_loop, "loop3": _loop3,
                                              "sized": _sized}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, make in SETUPS.items():
        d = tmp_path_factory.mktemp(f"tpl-{name}")
        make(d)
        out[name] = d
    return out


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _compare(di, templates: dict[str, Path], tmp_path: Path, setup: str,
             argv: list[str]) -> tuple[Result, Result]:
    qd, dd = tmp_path / "q", tmp_path / "d"
    shutil.copytree(templates[setup], qd)
    shutil.copytree(templates[setup], dd)
    before = _hashes(dd)
    ref = qemu(*argv, cwd=qd)
    mine = di(*argv, cwd=dd)
    assert (mine.rc, mine.err) == (ref.rc, ref.err)
    assert mine.out == ref.out
    if ref.rc:
        assert _hashes(dd) == before  # a refusal changes nothing (qemu-img may leave an
        # empty new file behind: not compared)
    return mine, ref


# -- the cases: (starting directory, command line) ----------------------------------------

CASES: list[tuple[str, list[str]]] = [
    # 1. malformed -o lists: checked as read, then parsed with QemuOpts' grammar
    ("plain", ["create", "-f", "qcow2", "-o", ",,", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", ",,help", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "help,", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "cluster_size=64k", "-o", ",,", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", ",,", "-o", "cluster_size=64k", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "hel,,p", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "lazy_refcounts,,cluster_size=64k", "x.qcow2",
               "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "lazy,,refcounts=on", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "nolazy_refcounts,,", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", ",,"]),  # checked before the file name
    ("plain", ["amend", "-o", ",,", "a.qcow2"]),
    ("plain", ["convert", "-O", "qcow2", "-o", ",,", "a.qcow2", "x.qcow2"]),
    ("plain", ["measure", "-O", "qcow2", "-o", "a,", "a.qcow2"]),
    ("plain", ["create", "-f", "qcow2", "-o", "help,,", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "x,,help", "x.qcow2", "1M"]),
    ("plain", ["amend", "-o", "x,,help", "a.qcow2"]),
    # 2. -l snapshot parameters
    ("snap", ["convert", "-l", "snapshot.foo=1", "-O", "raw", "a.qcow2", "x.raw"]),
    ("snap", ["convert", "-l", "snapshot.id=1,foo=2", "-O", "raw", "a.qcow2", "x.raw"]),
    ("snap", ["convert", "-l", "snapshot.id=1,", "-O", "raw", "a.qcow2", "x.raw"]),
    ("snap", ["convert", "-l", "s1", "-O", "raw", "a.qcow2", "a.qcow2", "x.raw"]),
    ("snap", ["convert", "-l", "foo=1", "-O", "raw", "a.qcow2", "a.qcow2", "x.raw"]),
    # 4. backing chains that loop (qemu-img info --backing-chain detects it)
    ("self-loop", ["info", "--backing-chain", "a.qcow2"]),
    ("self-loop", ["info", "--backing-chain", "./a.qcow2"]),
    ("loop3", ["info", "--backing-chain", "lp/c.qcow2"]),
    ("loop3", ["info", "--backing-chain", "--output=json", "lp/a.qcow2"]),
    ("loop3", ["info", "--backing-chain", "t.qcow2"]),  # the loop below the top
    # 5. preallocation values
    ("plain", ["create", "-f", "qcow2", "-o", "preallocation=1234", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "100T"]),
    ("plain", ["convert", "-O", "raw", "-o", "preallocation=1234", "a.qcow2", "x.raw"]),
    ("plain", ["convert", "-O", "vmdk", "-o", "preallocation=1234", "a.qcow2", "x.vmdk"]),
    # 6. empty backing file names
    ("plain", ["create", "-f", "qcow2", "-b", "", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-u", "-b", "", "-F", "qcow2", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "qcow2", "-o", "backing_file=", "x.qcow2", "1M"]),
    ("plain", ["create", "-f", "vmdk", "-b", "", "x.vmdk", "1M"]),
    ("plain", ["convert", "-B", "", "-O", "qcow2", "a.qcow2", "x.qcow2"]),
    # 7. formats qemu reads but cannot create
    ("plain", ["create", "-f", "bochs", "x.img", "1M"]),
    ("plain", ["create", "-f", "vvfat", "x.img", "1M"]),
    ("plain", ["create", "-f", "null-co", "x.img", "1M"]),
    ("plain", ["create", "-f", "dmg", "-o", "help"]),
    ("plain", ["convert", "-O", "cloop", "a.qcow2", "x.img"]),
    ("plain", ["measure", "-O", "quorum", "--size", "1M"]),
    ("plain", ["dd", "-O", "throttle", "if=a.qcow2", "of=x.img"]),
    ("plain", ["dd", "-O", "foo", "if=a.qcow2", "of=x.img"]),
    ("plain", ["dd", "-O", "foo", "if=nope.img", "of=x.img"]),
    # 10. copy offloading (-C) conflicts, in qemu-img's order
    ("plain", ["convert", "-C", "-c", "-S", "4k", "-O", "qcow2", "a.qcow2", "x.qcow2"]),
    ("plain", ["convert", "-C", "-S", "0", "-O", "raw", "a.qcow2", "x.raw"]),
    ("plain", ["convert", "-C", "--salvage", "-O", "raw", "a.qcow2", "x.raw"]),
    ("plain", ["convert", "-C", "-S", "4k", "a.qcow2"]),
    ("plain", ["convert", "-C", "-c", "--target-is-zero", "-O", "qcow2", "a.qcow2", "x.qcow2"]),
    ("plain", ["convert", "--skip-broken-bitmaps", "--target-is-zero", "-O", "qcow2",
               "a.qcow2", "x.qcow2"]),
    # 11. convert -o help: with a target name, the protocol's options merged in
    ("plain", ["convert", "-O", "qcow2", "-o", "help", "a.qcow2", "x.qcow2"]),
    ("plain", ["convert", "-O", "raw", "-o", "help", "a.qcow2", "x.raw"]),
    ("plain", ["convert", "-O", "vmdk", "-o", "help", "a.qcow2", "x.vmdk"]),
    ("plain", ["convert", "-O", "luks", "-o", "help", "a.qcow2", "x.luks"]),
    ("plain", ["convert", "-O", "raw", "-o", "help", "-m", "99", "a.qcow2", "r.raw"]),
    ("plain", ["convert", "-O", "raw", "-o", "help", "-n", "a.qcow2", "r.raw"]),
    # 13. sizes past what the L1 table can map (one limit: layout.l1_entries_for/l1_fits)
    ("plain", ["create", "-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "137438954496"]),
    ("plain", ["measure", "-O", "qcow2", "-o", "cluster_size=512", "--size", "137438953472"]),
    ("plain", ["create", "-f", "qcow2", "x.qcow2", "100P"]),
    ("plain", ["measure", "-O", "qcow2", "-o", "cluster_size=512", "--size", "137438954496"]),
    ("small", ["resize", "s.qcow2", "137438954496"]),
    ("small", ["resize", "s.qcow2", "1T"]),
    ("plain", ["resize", "a.qcow2", "100P"]),
    ("plain", ["create", "-f", "raw", "x.raw", "1E"]),  # EFBIG from the file system
    ("plain", ["create", "-f", "raw", "x.raw", "9223372036854775807"]),  # rounds past off_t
    # 13b. a qcow2 header size the L1 table cannot map (qemu's open: "Image is too big")
    ("sized", ["info", "big.qcow2"]),
    ("sized", ["check", "big.qcow2"]),
    ("sized", ["convert", "-O", "raw", "big.qcow2", "x.raw"]),
    ("sized", ["resize", "big.qcow2", "2M"]),
    ("sized", ["info", "wrap.qcow2"]),
    ("sized", ["info", "short.qcow2"]),
    # 14. snapshot refusals: qemu's errno text, one "Could not ... snapshot" prefix
    ("datafile", ["snapshot", "-c", "s", "dfa.qcow2"]),
    ("datafile", ["snapshot", "-a", "s", "dfa.qcow2"]),
    ("snap", ["snapshot", "-a", "nope", "a.qcow2"]),
    ("snap", ["snapshot", "-d", "nope", "a.qcow2"]),
    ("plain", ["snapshot", "-c", "s", "r.raw"]),
    # 15. a refcount narrower than a snapshot's shared clusters need
    ("snap", ["amend", "-o", "refcount_bits=1", "a.qcow2"]),
    # 16. writable opens of a chain that loops: qemu's lock conflict on its own file
    # (qemu 7.2's read-only opens -- convert, map, check, compare, measure -- recurse
    # thousands of levels deep for over a minute: diskimg refuses those with 'Backing
    # chain loop' instead)
    ("self-loop", ["resize", "a.qcow2", "2M"]),
    ("loop3", ["resize", "lp/c.qcow2", "2M"]),
    ("self-loop", ["commit", "a.qcow2"]),
    ("loop3", ["rebase", "-b", "", "lp/c.qcow2"]),
]


@pytest.mark.parametrize(("setup", "argv"), CASES, ids=lambda v: v if isinstance(v, str)
                         else " ".join(v) or "-")
def test_wording_as_qemu(di, templates, tmp_path: Path, setup: str, argv: list[str]) -> None:
    _compare(di, templates, tmp_path, setup, argv)


def test_vmdk_takes_the_protocol_preallocation(di, templates, tmp_path: Path) -> None:
    """qemu-img accepts the file protocol's preallocation for a vmdk (and allocates nothing
    more): diskimg refused it by name.  Same guest bytes as qemu's target."""
    mine, ref = _compare(di, templates, tmp_path, "plain",
                         ["convert", "-O", "vmdk", "-o", "preallocation=full", "a.qcow2",
                          "x.vmdk"])
    assert mine.rc == 0
    QEMU.img("compare", tmp_path / "q" / "x.vmdk", tmp_path / "d" / "x.vmdk")


# -- 12. the program name is argv[0]'s ----------------------------------------------------

AS_NAMED = ("import sys; sys.argv[0] = sys.argv.pop(1); from diskimg.cli.main import main; "
            "sys.exit(main())")


def _as(argv0: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """diskimg started as ``argv0`` (a copy installed under another name)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("DISKIMG_DEBUG", None)
    return subprocess.run([sys.executable, "-c", AS_NAMED, argv0, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_installed_as_qemu_img_speaks_as_qemu_img(templates, tmp_path: Path) -> None:
    """Under qemu-img's name (a script or test suite written for qemu-img), every message,
    the commands it suggests included, is qemu-img's byte for byte: no substitution."""
    qd, dd = tmp_path / "q", tmp_path / "d"
    shutil.copytree(templates["plain"], qd)
    shutil.copytree(templates["plain"], dd)
    before = _hashes(dd)
    for argv in (["amend", "-o", "backing_file=x.qcow2", "a.qcow2"],  # 'NAME rebase'
                 ["info", "--foo", "a.qcow2"]):                        # 'NAME --help'
        ref = QEMU.img(*argv, ok=None, cwd=qd)
        mine = _as("/usr/local/bin/qemu-img", *argv, cwd=dd)
        assert (mine.returncode, mine.stderr) == (ref.returncode, ref.stderr)
        assert "qemu-img" in mine.stderr and "diskimg" not in mine.stderr
        assert _hashes(dd) == before
    # another name, and python -m diskimg (argv[0]: the package's __main__.py)
    other = _as("/opt/bin/vdisk", *argv, cwd=dd)
    assert other.stderr == ref.stderr.replace("qemu-img", "vdisk")
    main_py = _as(str(SRC / "diskimg" / "__main__.py"), *argv, cwd=dd)
    assert main_py.stderr == ref.stderr.replace("qemu-img", "diskimg")
