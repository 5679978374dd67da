"""Writable vmdk subformats vs a bytearray model (hypothesis state machine).

Variants: monolithicSparse (with and without zeroed grains), monolithicFlat, a
twoGbMaxExtentSparse-style descriptor with three small sparse extents (extent edges inside
grains), and a monolithicSparse child over a vmdk parent (copy-on-write from the parent).
Every step the image reads back the model and ``map()`` never calls a run zero where the
model has data; at teardown ``qemu-img check`` is clean and ``qemu-img compare`` says the
image equals the model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from diskimg.hostio import open_host_file
from diskimg.vmdk import create_vmdk, open_vmdk
from diskimg.vmdk.descriptor import ExtentLine, build
from diskimg.vmdk.image import VmdkImage

KiB = 1024
SIZE = 300 * KiB              # not a multiple of the 64 KiB grain
QEMU_IMG = shutil.which("qemu-img")
_edges = sorted({0, 1, 511, 512, 65535, 65536, 65537, 128 * KiB, 192 * KiB - 1,
                 SIZE - 65536, SIZE - 512, SIZE - 1})
offsets = st.one_of(st.sampled_from(_edges), st.integers(0, SIZE - 1))
lengths = st.one_of(st.sampled_from([1, 512, 4096, 65536, 65537, 131072]),
                    st.integers(1, 140 * KiB))
VARIANTS = ["sparse", "sparse-zeroed", "flat", "multi-extent", "child"]


def _clip(off: int, n: int) -> int:
    return max(0, min(n, SIZE - off))


def _make_multi(path: Path) -> None:
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


class VmdkModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-vmdk-model-"))
        self.path = self.dir / "disk.vmdk"
        self.model = bytearray(SIZE)
        self.img: VmdkImage | None = None
        self.variant = ""

    def _open(self) -> None:
        self.img = open_vmdk(open_host_file(self.path, True))
        if self.variant == "child":
            self.img.backing = open_vmdk(open_host_file(self.dir / "base.vmdk"))
            self.img.backing_attached()

    @initialize(variant=st.sampled_from(VARIANTS))
    def create(self, variant: str) -> None:
        self.variant = variant
        if variant == "multi-extent":
            _make_multi(self.path)
        elif variant == "child":
            base = self.dir / "base.vmdk"
            create_vmdk(base, SIZE, options={})
            self.model[:] = os.urandom(SIZE)
            with open_vmdk(open_host_file(base, True)) as b:
                b.write(0, self.model)
            create_vmdk(self.path, SIZE, backing_file="base.vmdk", options={})
        else:
            sub = "monolithicFlat" if variant == "flat" else "monolithicSparse"
            create_vmdk(self.path, SIZE, options={"subformat": sub,
                                                  "zeroed_grain": variant.endswith("zeroed")})
        self._open()

    @rule(off=offsets, data=st.binary(min_size=1, max_size=70 * KiB))
    def write(self, off: int, data: bytes) -> None:
        data = data[: _clip(off, len(data))]
        assert self.img is not None
        self.img.write(off, data)
        self.model[off:off + len(data)] = data

    @rule(off=offsets, byte=st.integers(1, 255), n=lengths)
    def write_pattern(self, off: int, byte: int, n: int) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.write(off, bytes([byte]) * n)
        self.model[off:off + n] = bytes([byte]) * n

    @rule(off=offsets, n=lengths, may_unmap=st.booleans())
    def write_zeroes(self, off: int, n: int, may_unmap: bool) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.write_zeroes(off, n, may_unmap=may_unmap)
        self.model[off:off + n] = bytes(n)

    @rule(off=offsets, n=lengths)
    def discard(self, off: int, n: int) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.discard(off, n)      # advisory in vmdk (as qemu): contents unchanged

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self._open()

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img is not None
        got = self.img.read(0, SIZE)
        if got != self.model:
            bad = next(i for i in range(SIZE) if got[i] != self.model[i])
            raise AssertionError(f"first difference at byte {bad}")

    @precondition(lambda self: self.img is not None)
    @invariant()
    def map_zero_runs_are_zero(self) -> None:
        assert self.img is not None
        pos = 0
        for e in self.img.map():
            assert e.start == pos and e.length > 0
            if e.zero:
                assert not any(self.model[e.start:e.start + e.length])
            pos += e.length
        assert pos == SIZE

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                if QEMU_IMG:
                    ref = self.dir / "model.raw"
                    ref.write_bytes(self.model)
                    chk = subprocess.run([QEMU_IMG, "check", str(self.path)],
                                         capture_output=True, text=True, timeout=60)
                    assert chk.returncode == 0, chk.stdout + chk.stderr
                    res = subprocess.run(
                        [QEMU_IMG, "compare", "-f", "vmdk", "-F", "raw", str(self.path),
                         str(ref)], capture_output=True, text=True, timeout=60)
                    assert res.returncode == 0, res.stdout + res.stderr
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


VmdkModel.TestCase.settings = settings(VmdkModel.TestCase.settings, stateful_step_count=25)
TestVmdkModel = VmdkModel.TestCase
