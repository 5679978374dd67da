"""One shape for the public API (issue 16, item 8): one ``format=`` keyword (old spellings
warn), module-level functions that give what the CLI gives for the same input,
``str(info)`` is ``qemu-img info``'s text, and wrong argument types are UsageError that
change no byte."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.errors import UsageError

MiB = 1 << 20


def _sha(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _cli(run: Callable[..., Any], *args: str | Path, cwd: Path, check: Any = True) -> Any:
    return run([sys.executable, "-m", "diskimg", *map(str, args)], cwd=cwd, check=check)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A qcow2 image with data, a zeroed range and a hole (made by diskimg)."""
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 4 * MiB)
    with diskimg.open(p, "r+") as d:
        d.write(0, b"\x11" * 70000)
        d.write(2 * MiB + 512, b"\x22" * 4096)
        d.write_zeroes(MiB, 65536)
    return p


def _copy(p: Path, name: str) -> Path:
    q = p.with_name(name)
    shutil.copyfile(p, q)
    return q


# --- str(info) and the reading functions against the CLI ---------------------------


@pytest.mark.qemu
def test_str_info_is_qemu_img_info_text(img: Path, qemu_img: str, run: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = run([qemu_img, "info", "a.qcow2"], cwd=img.parent).stdout
    monkeypatch.chdir(img.parent)
    assert str(diskimg.info("a.qcow2")) == ref
    with diskimg.open("a.qcow2") as d:  # the method of an open image too
        assert str(d.info()) == ref
    assert _cli(run, "info", "a.qcow2", cwd=img.parent).stdout == ref


def test_info_backing_chain_and_cli(tmp_path: Path, img: Path, run: Any) -> None:
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", 4 * MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    infos = diskimg.info(top, backing_chain=True)
    assert isinstance(infos, list)
    cli = json.loads(_cli(run, "info", "--backing-chain", "--output=json", top,
                          cwd=tmp_path).stdout)
    assert [i.to_json() for i in infos] == cli


def test_map_matches_cli(img: Path, run: Any) -> None:
    cli = json.loads(_cli(run, "map", "--output=json", img, cwd=img.parent).stdout)
    mine = diskimg.map(img)
    assert [{"start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
             "zero": e.zero, "data": e.data} for e in mine] == \
        [{k: c[k] for k in ("start", "length", "depth", "present", "zero", "data")}
         for c in cli]
    assert [e.offset for e in mine] == [c.get("offset") for c in cli]
    part = json.loads(_cli(run, "map", "--output=json", "--start-offset=65536",
                           "--max-length=2M", img, cwd=img.parent).stdout)
    assert [(e.start, e.length) for e in diskimg.map(img, 65536, 2 * MiB)] == \
        [(c["start"], c["length"]) for c in part]


def test_check_matches_cli(img: Path, run: Any) -> None:
    before = _sha(img)
    res = diskimg.check(img)
    cli = json.loads(_cli(run, "check", "--output=json", img, cwd=img.parent).stdout)
    assert res.to_json() == cli
    assert _sha(img) == before
    raw = img.with_name("r.raw")
    raw.write_bytes(bytes(4096))
    with pytest.raises(diskimg.UnsupportedFeatureError, match="does not support checks"):
        diskimg.check(raw, format="raw")


def test_measure_matches_cli(img: Path, run: Any) -> None:
    cli = _cli(run, "measure", "-O", "qcow2", img, cwd=img.parent).stdout
    assert diskimg.measure("qcow2", source=img).human() == cli
    cli = _cli(run, "measure", "-O", "qcow2", "-o", "cluster_size=4k", "--size", "1G",
               cwd=img.parent).stdout
    assert diskimg.measure("qcow2", {"cluster_size": "4096"}, size=1 << 30).human() == cli


# --- the changing functions: the same bytes as the CLI -----------------------------


def test_amend_and_resize_write_what_the_cli_writes(img: Path, run: Any) -> None:
    a, b = _copy(img, "x.qcow2"), _copy(img, "y.qcow2")
    diskimg.amend(a, {"compat": "0.10"})
    _cli(run, "amend", "-o", "compat=0.10", b, cwd=img.parent)
    assert _sha(a) == _sha(b)
    diskimg.resize(a, 8 * MiB)
    _cli(run, "resize", "-q", b, "8M", cwd=img.parent)
    assert _sha(a) == _sha(b)
    with pytest.raises(UsageError, match="shrink"):
        diskimg.resize(a, MiB)
    assert _sha(a) == _sha(b)


def test_snapshot_functions_match_cli(img: Path, run: Any) -> None:
    a, b = _copy(img, "x.qcow2"), _copy(img, "y.qcow2")
    diskimg.snapshot(a, "create", "s1")
    _cli(run, "snapshot", "-c", "s1", b, cwd=img.parent)
    for p in (a, b):
        with diskimg.open(p, "r+") as d:
            d.write(0, b"\x99" * 512)
    listed = _cli(run, "snapshot", "-l", a, cwd=img.parent).stdout.splitlines()
    assert [(s.id, s.name) for s in diskimg.snapshot(a)] == \
        [tuple(line.split()[:2]) for line in listed[2:]]
    diskimg.snapshot(a, "apply", "s1")
    _cli(run, "snapshot", "-a", "s1", b, cwd=img.parent)
    with diskimg.open(a) as da, diskimg.open(b) as db, diskimg.open(img) as orig:
        assert da.read(0, 4 * MiB) == db.read(0, 4 * MiB) == orig.read(0, 4 * MiB)
    assert diskimg.snapshot(a, "delete", "s1") == []
    _cli(run, "snapshot", "-d", "s1", b, cwd=img.parent)
    ca, cb = diskimg.check(a).to_json(), diskimg.check(b).to_json()
    assert ca.pop("filename") != cb.pop("filename")
    assert ca == cb


def test_copy_functions_write_what_the_cli_writes(tmp_path: Path, img: Path, run: Any) -> None:
    diskimg.convert(img, tmp_path / "c1.raw", "raw", format="qcow2")
    _cli(run, "convert", "-f", "qcow2", "-O", "raw", img, "c2.raw", cwd=tmp_path)
    assert _sha(tmp_path / "c1.raw") == _sha(tmp_path / "c2.raw")
    diskimg.dd(img, tmp_path / "d1.raw", "raw", format="qcow2", bs=4096, count=600, skip=1)
    _cli(run, "dd", "-f", "qcow2", "-O", "raw", f"if={img}", "of=d2.raw", "bs=4096",
         "count=600", "skip=1", cwd=tmp_path)
    assert _sha(tmp_path / "d1.raw") == _sha(tmp_path / "d2.raw")
    same, off, msg = diskimg.compare(img, tmp_path / "c1.raw", format=("qcow2", "raw"))
    cli = _cli(run, "compare", "-f", "qcow2", "-F", "raw", img, "c1.raw", cwd=tmp_path)
    assert (same, off, msg + "\n") == (True, None, cli.stdout)
    # commit and rebase on two copies of the same two-layer chain
    for n in "12":
        shutil.copyfile(img, tmp_path / f"base{n}.qcow2")
        diskimg.create(tmp_path / f"top{n}.qcow2", "qcow2", 4 * MiB,
                       backing_file=f"base{n}.qcow2", backing_fmt="qcow2")
        with diskimg.open(tmp_path / f"top{n}.qcow2", "r+") as d:
            d.write(MiB, b"\x33" * 8192)
    diskimg.rebase(tmp_path / "top1.qcow2", "", format="qcow2")
    _cli(run, "rebase", "-f", "qcow2", "-b", "", "top2.qcow2", cwd=tmp_path)
    assert _sha(tmp_path / "top1.qcow2") == _sha(tmp_path / "top2.qcow2")
    for n in "12":
        diskimg.create(tmp_path / f"t{n}.qcow2", "qcow2", 4 * MiB,
                       backing_file=f"base{n}.qcow2", backing_fmt="qcow2")
        with diskimg.open(tmp_path / f"t{n}.qcow2", "r+") as d:
            d.write(3 * MiB, b"\x44" * 8192)
    diskimg.commit(tmp_path / "t1.qcow2", format="qcow2")
    _cli(run, "commit", "-q", "-f", "qcow2", "t2.qcow2", cwd=tmp_path)
    assert _sha(tmp_path / "base1.qcow2") == _sha(tmp_path / "base2.qcow2")
    # the tops differ only in the backing file name their headers hold
    b1, b2 = (tmp_path / "t1.qcow2").read_bytes(), (tmp_path / "t2.qcow2").read_bytes()
    assert b1.replace(b"base1.qcow2", b"base2.qcow2") == b2


# --- one format= keyword; the old ones warn -----------------------------------------


def test_old_format_keywords_warn_and_still_work(tmp_path: Path, img: Path) -> None:
    with pytest.warns(DeprecationWarning, match="src_format= keyword is deprecated"):
        diskimg.convert(img, tmp_path / "o.raw", "raw", src_format="qcow2")
    with pytest.warns(DeprecationWarning, match="src_format="):
        diskimg.dd(img, tmp_path / "d.raw", "raw", src_format="qcow2")
    assert _sha(tmp_path / "o.raw") == _sha(tmp_path / "d.raw")
    with pytest.warns(DeprecationWarning) as rec:
        assert diskimg.compare(img, tmp_path / "o.raw", "qcow2", "raw")[0]
    assert sorted(str(w.message).split()[1] for w in rec) == ["fmt_a=", "fmt_b="]
    diskimg.create(tmp_path / "t.qcow2", "qcow2", 4 * MiB, backing_file="a.qcow2",
                   backing_fmt="qcow2")
    with pytest.warns(DeprecationWarning, match="fmt= keyword"):
        diskimg.rebase(tmp_path / "t.qcow2", "a.qcow2", "qcow2", unsafe=True, fmt="qcow2")
    with pytest.warns(DeprecationWarning, match="fmt= keyword"):
        diskimg.commit(tmp_path / "t.qcow2", fmt="qcow2")
    with warnings.catch_warnings():  # the new keyword is silent
        warnings.simplefilter("error")
        diskimg.convert(img, tmp_path / "n.raw", "raw", format="qcow2")
    assert _sha(tmp_path / "n.raw") == _sha(tmp_path / "o.raw")


def test_old_and_new_keyword_disagreeing_is_refused(tmp_path: Path, img: Path) -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(UsageError, match="src_format="):
        diskimg.convert(img, tmp_path / "o.raw", "raw", format="qcow2", src_format="raw")
    assert not (tmp_path / "o.raw").exists()


def test_qcow2_amend_takes_format_and_fmt_warns(tmp_path: Path, img: Path) -> None:
    """qcow2.amend.amend's keyword is format= too; its old fmt= still works, with a
    DeprecationWarning, and writes the same bytes."""
    from diskimg.qcow2.amend import amend

    a, b = _copy(img, "x.qcow2"), _copy(img, "y.qcow2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amend(a, {"lazy_refcounts": "on"}, format="qcow2")
    with pytest.warns(DeprecationWarning, match="the fmt= keyword is deprecated; use format="):
        amend(b, {"lazy_refcounts": "on"}, fmt="qcow2")
    assert _sha(a) == _sha(b) != _sha(img)
    c = _copy(img, "z.qcow2")
    with pytest.warns(DeprecationWarning), pytest.raises(UsageError, match="fmt= and format="):
        amend(c, {"lazy_refcounts": "on"}, format="qcow2", fmt="raw")
    assert _sha(c) == _sha(img)


# --- wrong types are UsageError and change nothing ----------------------------------


@pytest.mark.parametrize("call", [
    lambda d: d.read(1.0, 5), lambda d: d.read(0, "5"), lambda d: d.read(0, -1),
    lambda d: d.read(True, 5), lambda d: d.readinto(0.5, bytearray(4)),
    lambda d: d.write(0.0, b"x"), lambda d: d.write(False, b"x"),
    lambda d: d.write_zeroes(0, 1.5), lambda d: d.write_zeroes("0", 512),
    lambda d: d.discard(0, -512), lambda d: d.discard(None, 512),
    lambda d: list(d.map(0.5)), lambda d: d.map(0, "1M"), lambda d: d.block_status(1.5, 512),
], ids=["float-offset", "str-length", "negative-length", "bool-offset", "readinto-float",
        "write-float", "write-bool", "zeroes-float", "zeroes-str", "discard-negative",
        "discard-none", "map-float", "map-str", "status-float"])
def test_wrong_types_on_device_methods(img: Path, call: Callable[[Any], Any]) -> None:
    before = _sha(img)
    with diskimg.open(img, "r+") as d:
        with pytest.raises(UsageError):
            call(d)
        assert d.read(0, 4) == b"\x11" * 4  # still usable
    assert _sha(img) == before


@pytest.mark.parametrize("call", [
    lambda p, t: diskimg.map(p, 0.5), lambda p, t: diskimg.map(p, 0, "1M"),
    lambda p, t: diskimg.resize(p, "8M"), lambda p, t: diskimg.resize(p, True),
    lambda p, t: diskimg.resize(p, 8.0 * MiB),
    lambda p, t: diskimg.dd(p, t / "o.raw", bs=1.5),
    lambda p, t: diskimg.dd(p, t / "o.raw", count=-1),
    lambda p, t: diskimg.measure("qcow2", size="1G"),
    lambda p, t: diskimg.snapshot(p, "create"),
    lambda p, t: diskimg.create(t / "o.raw", "raw", 1.5),
    lambda p, t: diskimg.create(t / "o.raw", "qcow2", "1M"),
    lambda p, t: diskimg.create(t / "o.raw", "qcow2", True),
], ids=["map-float", "map-str", "resize-str", "resize-bool", "resize-float", "dd-bs-float",
        "dd-count-negative", "measure-str", "snapshot-no-name", "create-float", "create-str",
        "create-bool"])
def test_wrong_types_on_module_functions(tmp_path: Path, img: Path,
                                         call: Callable[[Path, Path], Any]) -> None:
    before = _sha(img)
    with pytest.raises(UsageError):
        call(img, tmp_path)
    assert _sha(img) == before
    assert not (tmp_path / "o.raw").exists()


def test_module_functions_are_exported() -> None:
    for name in ("info", "check", "map", "measure", "amend", "snapshot", "resize", "commit",
                 "rebase", "convert", "compare", "dd"):
        fn = getattr(diskimg, name)
        assert callable(fn) and fn.__doc__, name
        assert name in diskimg.__all__
