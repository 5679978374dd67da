"""Every writable vmdk subformat vs a bytearray model (hypothesis state machine).

Variants: the five subformats qemu-img creates (monolithicSparse, monolithicFlat,
twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized), with and without zeroed grains
(sparse ones: qemu refuses zeroed_grain for flat ones) and compat6 (hardware version 6);
a descriptor with three small sparse extents (extent edges inside the disk); and a
monolithicSparse child over a vmdk parent (copy-on-write from the parent).  The virtual
size is drawn, usually not a multiple of the 64 KiB grain.

streamOptimized is append-only in diskimg: a new image is written front to back (a write
that starts in a grain before the one last written is refused and changes nothing), it
cannot be read or mapped until it is closed (refused, not read as zeros), and once it
holds data it opens read-only.

Every step the image reads back the model and ``map()`` never calls a run zero where the
model has data; at teardown ``qemu-img check`` is clean and ``qemu-img compare`` says the
image equals the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import modelkit
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from qemukit import QEMU

import diskimg
from diskimg.hostio import open_host_file
from diskimg.vmdk.create import build
from diskimg.vmdk.extent_line import ExtentLine

KiB = 1024
GRAIN = 64 * KiB
QEMU_IMG = shutil.which("qemu-img")
VARIANTS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat", "streamOptimized", "multi-extent", "child"]
#: what the runs covered, printed by tests/property/conftest.py
COVERAGE = modelkit.counter("vmdk")


def _note(what: str) -> None:
    modelkit.note(COVERAGE, what)


def _make_multi(path: Path) -> int:
    """A descriptor with three sparse extents of 128, 64 and 108 KiB.  (Extents that end
    inside a grain, other than the last, confuse qemu 7.2's block status, so
    ``qemu-img compare`` would report false mismatches.)"""
    from diskimg.vmdk import _init_sparse

    exts = []
    for i, sectors in enumerate((256, 128, 216)):
        name = f"m-s{i + 1:03d}.vmdk"
        h = open_host_file(path.parent / name, True, create=True, lock_mode=False)
        try:
            _init_sparse(h, sectors, False)
        finally:
            h.close()
        exts.append(ExtentLine("RW", sectors, "SPARSE", name))
    path.write_text(build(cid=1, parent_cid=0xFFFFFFFF, create_type="twoGbMaxExtentSparse",
                          parent_hint=None, extents=exts, hw_version="4", cylinders=0,
                          heads=16, adapter_type="ide", tools_version="1"))
    return 600 * 512


class VmdkModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-vmdk-model-"))
        self.path = self.dir / "disk.vmdk"
        self.img: Any = None
        self.variant = ""
        self.stream_grain = -1      # streamOptimized: the grain last written to
        self.read_only = False      # streamOptimized with data, after reopening
        self.streaming = False      # streamOptimized written to in this session

    @initialize(variant=st.sampled_from(VARIANTS), zeroed=st.booleans(),
                compat6=st.booleans(),
                size=st.sampled_from([300 * KiB, 300 * KiB, GRAIN + 512, 1536, 1024 * KiB,
                                      3 * GRAIN]))
    def create(self, variant: str, zeroed: bool, compat6: bool, size: int) -> None:
        self.variant = variant
        if variant in ("monolithicFlat", "twoGbMaxExtentFlat", "multi-extent", "child"):
            zeroed = False
        if variant == "multi-extent":
            size = _make_multi(self.path)
        elif variant == "child":
            base = self.dir / "base.vmdk"
            diskimg.create(base, "vmdk", size)
            parent = os.urandom(size)
            with diskimg.open(base, "r+") as b:
                b.write(0, parent)
            diskimg.create(self.path, "vmdk", size, backing_file="base.vmdk", backing_fmt="vmdk",
                           options={"compat6": compat6})
            self.model = bytearray(parent)
        else:
            diskimg.create(self.path, "vmdk", size,
                           options={"subformat": variant, "zeroed_grain": zeroed,
                                    "compat6": compat6})
        self.size = size
        if variant != "child":
            self.model = bytearray(size)
        _note(f"variant={variant}")
        _note(f"zeroed_grain={zeroed}")
        _note(f"compat6={compat6}")
        _note(f"size%grain={'0' if size % GRAIN == 0 else '!=0'}")
        self._open()

    def _open(self) -> None:
        self.img = diskimg.open(self.path, "r" if self.read_only else "r+")

    # --- strategies --------------------------------------------------------------------

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = self.size
        last = (size - 1) // GRAIN * GRAIN
        off = data.draw(st.one_of(
            st.just(0), st.just(last), st.integers(last, size - 1),
            st.integers(0, (size - 1) // GRAIN).map(lambda g: g * GRAIN),
            st.sampled_from([1, 511, 512, GRAIN - 1, GRAIN + 1, size - 512, size - 1]),
            st.integers(0, size - 1)).filter(lambda o: 0 <= o < size))
        n = data.draw(st.one_of(st.sampled_from([1, 512, 4096, GRAIN, GRAIN + 1, 2 * GRAIN,
                                                 size - off]),
                                st.integers(1, 140 * KiB)))
        return off, max(1, min(n, size - off))

    def _files(self) -> dict[str, str]:
        return modelkit.file_hashes(self.dir)

    def _refused(self, what: str, fn: Any) -> None:
        before = self._files()
        try:
            fn()
        except diskimg.DiskImgError:
            pass
        else:
            raise AssertionError(f"{what} was not refused")
        assert self._files() == before, f"refused {what} changed a file"
        _note(f"refused: {what}")

    def _stream_ok(self, off: int, n: int) -> bool:
        """Whether a streamOptimized image accepts a write of ``[off, off + n)``."""
        return off // GRAIN >= self.stream_grain

    def _do_write(self, what: str, off: int, n: int, fn: Any, data: bytes) -> None:
        if self.read_only or (self.variant == "streamOptimized"
                              and not self._stream_ok(off, n)):
            self._refused(what, fn)
            return
        fn()
        self.model[off:off + n] = data
        if self.variant == "streamOptimized":
            self.stream_grain = (off + n - 1) // GRAIN
            self.streaming = True
        _note(what)
        if off == 0:
            _note("write at offset 0")
        if off + n == self.size:
            _note("write to the end")

    # --- operations --------------------------------------------------------------------

    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=70 * KiB))
    def write(self, data: st.DataObject, payload: bytes) -> None:
        off, _ = self._range(data)
        payload = payload[: self.size - off]
        self._do_write("write", off, len(payload), lambda: self.img.write(off, payload),
                       payload)

    @rule(data=st.data(), byte=st.integers(1, 255))
    def write_pattern(self, data: st.DataObject, byte: int) -> None:
        off, n = self._range(data)
        buf = bytes([byte]) * n
        self._do_write("write_pattern", off, n, lambda: self.img.write(off, buf), buf)

    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_unmap: bool) -> None:
        off, n = self._range(data)
        self._do_write(f"write_zeroes may_unmap={may_unmap}", off, n,
                       lambda: self.img.write_zeroes(off, n, may_unmap=may_unmap), bytes(n))

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        if self.read_only:
            self._refused("discard", lambda: self.img.discard(off, n))
            return
        self.img.discard(off, n)      # advisory in vmdk (as qemu): contents unchanged
        _note("discard")

    @rule()
    def reopen(self) -> None:
        self.img.close()
        if self.variant == "streamOptimized" and any(self.model) and not self.read_only:
            # a streamOptimized image that holds data is read-only from now on
            before = self._files()
            try:
                diskimg.open(self.path, "r+").close()
            except diskimg.UnsupportedFeatureError:
                pass
            else:
                raise AssertionError("streamOptimized image with data opened read-write")
            assert self._files() == before
            self.read_only = True
        self.stream_grain = -1
        self.streaming = False
        self._open()
        _note("reopen")

    # --- invariants --------------------------------------------------------------------

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img.size == self.size
        if self.streaming:
            # a stream being written reads back only after close: refused, never zeros
            self._refused("read while streaming", lambda: self.img.read(0, self.size))
            self._refused("map while streaming", lambda: list(self.img.map()))
            return
        got = self.img.read(0, self.size)
        if got != self.model:
            bad = next(i for i in range(self.size) if got[i] != self.model[i])
            raise AssertionError(f"first difference at byte {bad}")

    @precondition(lambda self: self.img is not None and not self.streaming)
    @invariant()
    def map_zero_runs_are_zero(self) -> None:
        pos = 0
        for e in self.img.map():
            assert e.start == pos and e.length > 0
            if e.zero:
                assert not any(self.model[e.start:e.start + e.length])
            pos += e.length
        assert pos == self.size

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                self.img = None
                if QEMU_IMG:
                    ref = self.dir / "model.raw"
                    ref.write_bytes(self.model)
                    chk = QEMU.img("check", self.path, timeout=60, ok=None)
                    assert chk.returncode == 0, chk.stdout + chk.stderr
                    res = QEMU.img("compare", "-f", "vmdk", "-F", "raw", self.path, ref,
                                   timeout=60, ok=None)
                    assert res.returncode == 0, res.stdout + res.stderr
                    COVERAGE["runs checked by qemu"] += 1
        finally:
            if self.img is not None:
                self.img.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TestVmdkModel = VmdkModel.TestCase
TestVmdkModel.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
