"""Error wording and option validation as qemu-img 7.2's (issue 17 item 7).

Every case runs the same command line with qemu-img and with diskimg, each in its own copy
of the same directory, and compares the exit code, stderr (qemu-img's program name replaced
by diskimg's), stdout, and that a refused command changed no file (the sha256 of every file
before and after).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import Result, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

# -- the images a case starts from (made once with qemu-img, copied for each run) ---------


def _plain(d: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", d / "a.qcow2", "1M")
    QEMU.img("create", "-q", "-f", "raw", d / "r.raw", "1M")


def _snap(d: Path) -> None:
    _plain(d)
    QEMU.img("snapshot", "-c", "s1", d / "a.qcow2")


SETUPS: dict[str, Callable[[Path], None]] = {"plain": _plain, "snap": _snap}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, make in SETUPS.items():
        d = tmp_path_factory.mktemp(f"tpl-{name}")
        make(d)
        out[name] = d
    return out


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


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


# -- 1. malformed -o lists ----------------------------------------------------------------

OPTION_LISTS = [
    ["create", "-f", "qcow2", "-o", ",,", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", ",,help", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "help,", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=64k", "-o", ",,", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", ",,", "-o", "cluster_size=64k", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "hel,,p", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "lazy_refcounts,,cluster_size=64k", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "lazy,,refcounts=on", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "nolazy_refcounts,,", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", ",,"],  # the list is checked before the file name
    ["amend", "-o", ",,", "a.qcow2"],
    ["convert", "-O", "qcow2", "-o", ",,", "a.qcow2", "x.qcow2"],
    ["measure", "-O", "qcow2", "-o", "a,", "a.qcow2"],
]

OPTION_HELP = [
    ["create", "-f", "qcow2", "-o", "help,,", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "x,,help", "x.qcow2", "1M"],
    ["amend", "-o", "x,,help", "a.qcow2"],
]


@pytest.mark.parametrize("argv", OPTION_LISTS + OPTION_HELP, ids=" ".join)
def test_option_list(di, templates, tmp_path: Path, argv: list[str]) -> None:
    _compare(di, templates, tmp_path, "plain", argv)


# -- 2. -l snapshot parameters ------------------------------------------------------------

SNAPSHOT_PARAMS = [
    ["convert", "-l", "snapshot.foo=1", "-O", "raw", "a.qcow2", "x.raw"],
    ["convert", "-l", "snapshot.id=1,foo=2", "-O", "raw", "a.qcow2", "x.raw"],
    ["convert", "-l", "snapshot.id=1,", "-O", "raw", "a.qcow2", "x.raw"],
    ["convert", "-l", "s1", "-O", "raw", "a.qcow2", "a.qcow2", "x.raw"],
    ["convert", "-l", "foo=1", "-O", "raw", "a.qcow2", "a.qcow2", "x.raw"],
]


@pytest.mark.parametrize("argv", SNAPSHOT_PARAMS, ids=" ".join)
def test_snapshot_param(di, templates, tmp_path: Path, argv: list[str]) -> None:
    _compare(di, templates, tmp_path, "snap", argv)


# -- 5. preallocation values --------------------------------------------------------------

PREALLOCATION = [
    ["create", "-f", "qcow2", "-o", "preallocation=1234", "x.qcow2", "1M"],
    ["convert", "-O", "raw", "-o", "preallocation=1234", "a.qcow2", "x.raw"],
    ["convert", "-O", "vmdk", "-o", "preallocation=1234", "a.qcow2", "x.vmdk"],
]


@pytest.mark.parametrize("argv", PREALLOCATION, ids=" ".join)
def test_preallocation_value(di, templates, tmp_path: Path, argv: list[str]) -> None:
    _compare(di, templates, tmp_path, "plain", argv)


def test_vmdk_takes_the_protocol_preallocation(di, templates, tmp_path: Path) -> None:
    """qemu-img accepts the file protocol's preallocation for a vmdk (and allocates nothing
    more): diskimg refused it by name.  Same guest bytes as qemu's target."""
    mine, ref = _compare(di, templates, tmp_path, "plain",
                         ["convert", "-O", "vmdk", "-o", "preallocation=full", "a.qcow2",
                          "x.vmdk"])
    assert mine.rc == 0
    QEMU.img("compare", tmp_path / "q" / "x.vmdk", tmp_path / "d" / "x.vmdk")
