"""Image lifecycle (issue 15, bugs 4-6): close and double close; an image that is never
closed is closed on garbage collection with a ``ResourceWarning`` and its files and QEMU's
locks are released (qemu-io then takes the write lock and reads what was written); every
call after ``close()`` raises :class:`diskimg.ClosedImageError` and changes no byte; and
``map()`` in a session equals ``qemu-img map`` of the flushed file and ``map()`` after
reopening, whatever the session did before.

Every format: qcow2 (plain, a backing chain qcow2 -> qcow2 -> raw, LUKS), raw and vmdk
(monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, streamOptimized).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diskimg
from diskimg import ClosedImageError

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 4 * MiB
PATTERN = 0xA5
WHERE = 3 * MiB + 4096  # inside the top image, past the backing file's data


@dataclass
class Kind:
    """An image to open: its path, open() arguments, qemu-io's way to open it, and every
    host file it consists of (descriptor, extents, backing files)."""

    path: Path
    files: list[Path]
    open_kw: dict[str, Any] = field(default_factory=dict)
    qemu_open: list[str] = field(default_factory=list)
    fmt: str = "qcow2"
    #: False for streamOptimized: holding data, it reopens read-only only
    rewritable: bool = True

    def open(self, mode: str = "r+") -> Any:
        return diskimg.open(self.path, mode, **self.open_kw)


def _qcow2(tmp: Path) -> Kind:
    p = tmp / "plain.qcow2"
    diskimg.create(p, "qcow2", SIZE)
    return Kind(p, [p], qemu_open=["-f", "qcow2", str(p)])


def _chain(tmp: Path) -> Kind:
    base, mid, top = tmp / "base.raw", tmp / "mid.qcow2", tmp / "top.qcow2"
    diskimg.create(base, "raw", SIZE)
    with diskimg.open(base, "r+", "raw") as b:
        b.write(0, b"\x11" * 8192)
    diskimg.create(mid, "qcow2", SIZE, backing_file=base.name, backing_fmt="raw")
    with diskimg.open(mid, "r+") as m:
        m.write(MiB, b"\x22" * 8192)
    diskimg.create(top, "qcow2", SIZE, backing_file=mid.name, backing_fmt="qcow2")
    return Kind(top, [top, mid, base], qemu_open=["-f", "qcow2", str(top)])


def _luks(tmp: Path) -> Kind:
    p = tmp / "luks.qcow2"
    opts = {"encrypt.format": "luks", "encrypt.key-secret": "s0", "encrypt.iter-time": "10"}
    diskimg.create(p, "qcow2", SIZE, options=opts, secrets={"s0": b"pw"})
    return Kind(p, [p], open_kw={"secrets": {"s0": b"pw"},
                                 "options": {"encrypt.key-secret": "s0"}},
                qemu_open=["--object", "secret,id=s0,data=pw", "--image-opts",
                           f"driver=qcow2,file.filename={p},encrypt.key-secret=s0"])


def _raw(tmp: Path) -> Kind:
    p = tmp / "disk.raw"
    diskimg.create(p, "raw", SIZE)
    return Kind(p, [p], open_kw={"format": "raw"}, qemu_open=["-f", "raw", str(p)], fmt="raw")


def _vmdk(sub: str) -> Callable[[Path], Kind]:
    def make(tmp: Path) -> Kind:
        p = tmp / f"{sub}.vmdk"
        diskimg.create(p, "vmdk", SIZE, options={"subformat": sub})
        files = sorted(tmp.glob(f"{sub}*.vmdk"))
        return Kind(p, files, qemu_open=["-f", "vmdk", str(p)], fmt="vmdk",
                    rewritable=sub != "streamOptimized")

    return make


KINDS: dict[str, Callable[[Path], Kind]] = {
    "qcow2": _qcow2,
    "qcow2-chain": _chain,
    "qcow2-luks": _luks,
    "raw": _raw,
    "vmdk-monolithicSparse": _vmdk("monolithicSparse"),
    "vmdk-monolithicFlat": _vmdk("monolithicFlat"),
    "vmdk-twoGbMaxExtentSparse": _vmdk("twoGbMaxExtentSparse"),
    "vmdk-streamOptimized": _vmdk("streamOptimized"),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    return KINDS[request.param](tmp_path)


def _sha(files: list[Path]) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _assert_released(k: Kind, run: Any, qemu_io: str, written: bytes) -> None:
    """qemu-io takes the write lock of every host file, and qemu reads ``written`` (one
    repeated byte) back at WHERE: it reached the files and the image is consistent."""
    for f in k.files:
        run([qemu_io, "-f", "raw", "-c", "read 0 512", f])  # read-write open: write lock
    assert written == written[:1] * len(written)
    out = run([qemu_io, *k.qemu_open, "-c",
               f"read -P {written[0]} {WHERE} {len(written)}"]).stdout
    assert f"read {len(written)}/{len(written)} bytes" in out and "fail" not in out, out


# --- close, double close -----------------------------------------------------------------
def test_close_twice_releases_everything(kind: Kind, run: Any, qemu_io: str) -> None:
    before = _fds()
    img = kind.open()
    data = b"\x3c" * 4096
    img.write(WHERE, data)
    img.close()
    img.close()  # harmless
    assert img.closed
    assert _fds() == before
    shas = _sha(kind.files)
    img.close()
    assert _sha(kind.files) == shas
    _assert_released(kind, run, qemu_io, data)


# --- finalizer -----------------------------------------------------------------------------
def _collect_warnings(drop: Callable[[], None]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        drop()
        gc.collect()
    return [w for w in got if issubclass(w.category, ResourceWarning)]


def test_finalizer_closes_unclosed_image(kind: Kind, run: Any, qemu_io: str) -> None:
    before = _fds()
    holder = {"img": kind.open()}
    data = b"\x4d" * 4095
    holder["img"].write(WHERE, data)
    got = _collect_warnings(holder.clear)
    assert [str(w.message) for w in got] == [f"unclosed image '{kind.path}'"]
    assert _fds() == before
    _assert_released(kind, run, qemu_io, data)


def test_finalizer_through_as_file(kind: Kind, run: Any, qemu_io: str) -> None:
    before = _fds()
    img = kind.open()
    f = img.as_file()
    f.seek(WHERE)
    data = b"\x6e" * 1500
    f.write(data)  # still in the BufferedRandom's buffer
    holder = {"f": f}
    del img, f
    got = _collect_warnings(holder.clear)
    assert len(got) == 1 and str(kind.path) in str(got[0].message)
    assert _fds() == before
    _assert_released(kind, run, qemu_io, data)


def test_finalizer_with_snapshot_view(tmp_path: Path, run: Any, qemu_io: str) -> None:
    k = _chain(tmp_path)
    before = _fds()
    img = k.open()
    data = b"\x7f" * 4096
    img.write(WHERE, data)
    img.snapshots.create("s1")
    holder = {"view": img.snapshot_view(name="s1")}
    assert holder["view"].read(WHERE, len(data)) == data
    del img  # the view keeps its image alive
    got = _collect_warnings(lambda: None)
    assert got == [] and _fds() != before
    got = _collect_warnings(holder.clear)
    assert [str(w.message) for w in got] == [f"unclosed image '{k.path}'"]
    assert _fds() == before
    _assert_released(k, run, qemu_io, data)


@pytest.mark.parametrize("name", ["qcow2", "raw"])
def test_finalizer_in_forked_child_leaves_parent_image_alone(
        name: str, tmp_path: Path, run: Any, qemu_io: str) -> None:
    k = KINDS[name](tmp_path)
    img = k.open()
    img.write(WHERE, b"\x21" * 4096)
    pid = os.fork()
    if pid == 0:  # the child drops its copy: must neither flush nor unlock the parent's
        code = 99
        try:
            del img
            code = len(_collect_warnings(lambda: None))  # no "unclosed image" either
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    res = run([qemu_io, "-f", "raw", "-c", "read 0 512", k.path], check=1)
    assert 'Failed to get "write" lock' in res.stderr  # the parent still holds it
    img.close()
    _assert_released(k, run, qemu_io, b"\x21" * 4096)


def test_backing_file_alone_is_quiet_when_top_closed(tmp_path: Path) -> None:
    k = _chain(tmp_path)
    img = k.open()
    chain = img.chain()
    img.close()
    assert all(d.closed for d in chain)
    got = _collect_warnings(lambda: (chain.clear(), None)[1])
    assert got == []


def test_failed_open_releases_the_data_file(tmp_path: Path, run: Any, qemu_img: str) -> None:
    p, data = tmp_path / "df.qcow2", tmp_path / "df.raw"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", p, "1M"])
    with open(p, "r+b") as f:  # a snapshot table at an unaligned offset: found after the
        f.seek(60)             # data file was opened
        f.write(struct.pack(">IQ", 1, 0x10200))
    shas = _sha([p, data])
    before = _fds()
    for mode in ("r", "r+"):
        with pytest.raises(diskimg.FormatError, match="Snapshot table offset invalid"):
            diskimg.open(p, mode)
    gc.collect()
    assert _fds() == before  # the data file is closed again
    assert _sha([p, data]) == shas


# --- use after close -----------------------------------------------------------------------
def _calls(img: Any, fmt: str) -> dict[str, Callable[[], object]]:
    buf = bytearray(4096)
    calls: dict[str, Callable[[], object]] = {
        "read": lambda: img.read(0, 4096),
        "read-unallocated": lambda: img.read(SIZE - 4096, 4096),
        "readinto": lambda: img.readinto(0, buf),
        "write": lambda: img.write(0, b"x" * 512),
        "write_zeroes": lambda: img.write_zeroes(0, 65536),
        "write_zeroes-unmap": lambda: img.write_zeroes(0, 65536, may_unmap=True),
        "discard": lambda: img.discard(0, 65536),
        "flush": img.flush,
        "map": lambda: img.map(),
        "block_status": lambda: img.block_status(0, 4096),
        "info": img.info,
        "as_file": img.as_file,
        "resize": lambda: img.resize(SIZE * 2),
    }
    if fmt in ("qcow2", "vmdk"):
        calls["check"] = img.check
    if fmt == "qcow2":
        calls.update({
            "check-repair": lambda: img.check(repair="all"),
            "write_compressed": lambda: img.write_compressed(0, b"c" * 65536),
            "write_compressed_clusters": lambda: img.write_compressed_clusters(
                0, [(b"c" * 65536, None)]),
            "align_compressed_end": img.align_compressed_end,
            "preallocate": lambda: img.preallocate(0, 65536, "metadata"),
            "snapshots.list": img.snapshots.list,
            "snapshots.find": lambda: img.snapshots.find("s1"),
            "snapshots.create": lambda: img.snapshots.create("s2"),
            "snapshots.apply": lambda: img.snapshots.apply("s1"),
            "snapshots.delete": lambda: img.snapshots.delete("s1"),
            "snapshot_view": lambda: img.snapshot_view(name="s1"),
        })
    return calls


@pytest.mark.parametrize("mode", ["r+", "r"])
def test_every_call_after_close_raises(kind: Kind, mode: str) -> None:
    if mode == "r+" and not kind.rewritable:
        mode = "r"
    with kind.open() as img:
        img.write(0, b"\x5a" * 8192)
        if kind.fmt == "qcow2":
            img.snapshots.create("s1")
    img = kind.open(mode)
    view = img.snapshot_view(name="s1") if kind.fmt == "qcow2" else None
    early_file = img.as_file()
    pending = img.as_file() if mode == "r+" else None
    if pending is not None:
        pending.write(b"never written")  # buffered, not yet in the image
    devices = img.chain()
    img.close()
    shas = _sha(kind.files)
    msg = f"I/O operation on closed image '{kind.path}'"
    for name, call in _calls(img, kind.fmt).items():
        with pytest.raises(ClosedImageError, match="I/O operation on closed image") as ei:
            call()
        assert str(ei.value) == msg, name
        assert isinstance(ei.value, diskimg.UsageError)
    for dev in devices[1:]:  # the backing files were closed with their image
        with pytest.raises(ClosedImageError):
            dev.read(0, 512)
    if view is not None:  # a snapshot view is closed with its image
        with pytest.raises(ClosedImageError):
            view.read(0, 512)
        with pytest.raises(ClosedImageError):
            view.map()
        view.close()
    with pytest.raises(ClosedImageError):
        early_file.read(10)
    early_file.close()  # nothing to flush: no error
    if pending is not None:  # buffered bytes cannot reach a closed image: said loudly
        with pytest.raises(ClosedImageError):
            pending.close()
    img.close()
    assert _sha(kind.files) == shas


# --- bug 6: map does not depend on the session's history ------------------------------------
def _json(entries: Any) -> list[dict[str, Any]]:
    return [e.to_json() for e in entries]


def test_readme_example_map(tmp_path: Path, run: Any, qemu_img: str) -> None:
    p = tmp_path / "disk.qcow2"
    diskimg.create(p, "qcow2", 64 * MiB)
    with diskimg.open(p, "r+") as img:
        img.write(0, b"hello, disk")
        img.write_zeroes(MiB, 64 << 10)
        session = _json(img.map())
        img.flush()
        qemu = json.loads(run([qemu_img, "map", "-U", "--output=json", p]).stdout)
    with diskimg.open(p) as img:
        reopened = _json(img.map())
    assert session == qemu == reopened
    assert session[0] == {"start": 0, "length": 65536, "depth": 0, "present": True,
                          "zero": False, "data": True, "offset": session[0]["offset"]}


_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200_000),
              st.sampled_from([0, 1, 0xEE])),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 300_000),
              st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(1, 300_000),
              st.just(0)),
    st.tuples(st.just("map"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=8)

_MAP_FORMATS = {
    "qcow2": ("qcow2", {}),
    "qcow2-4k": ("qcow2", {"cluster_size": "4096"}),
    "qcow2-512": ("qcow2", {"cluster_size": "512"}),
    "qcow2-extl2": ("qcow2", {"extended_l2": "on", "cluster_size": "32768"}),
    "raw": ("raw", {}),
    "vmdk": ("vmdk", {}),
    "vmdk-flat": ("vmdk", {"subformat": "monolithicFlat"}),
}


@pytest.mark.parametrize("name", sorted(_MAP_FORMATS))
def test_map_does_not_depend_on_session(name: str, tmp_path_factory: pytest.TempPathFactory,
                                        qemu_img: str, run: Any) -> None:
    fmt, opts = _MAP_FORMATS[name]

    @settings(max_examples=6)
    @given(ops=_OPS)
    def check(ops: list[tuple[str, int, int, int]]) -> None:
        p = tmp_path_factory.mktemp("map") / f"disk.{fmt}"
        diskimg.create(p, fmt, SIZE, options=opts)
        img = diskimg.open(p, "r+", fmt)
        try:
            for op, off, n, arg in ops:
                n = min(n, SIZE - off)
                if op == "write":
                    img.write(off, bytes([arg]) * n)
                elif op == "zero":
                    img.write_zeroes(off, n, may_unmap=bool(arg))
                elif op == "discard":
                    img.discard(off, n)
                else:
                    _json(img.map())  # an early map must not fix what later ones say
            session = _json(img.map())
            img.flush()
            qemu = json.loads(run([qemu_img, "map", "-U", "-f", fmt, "--output=json",
                                   p]).stdout)
            assert session == qemu, ops
        finally:
            img.close()
        with diskimg.open(p, "r", fmt) as again:
            assert _json(again.map()) == session, ops

    check()
