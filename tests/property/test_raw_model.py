"""raw image vs a bytearray model (hypothesis state machine).

The image is created with preallocation off, falloc or full, or is an existing file whose
length is not a multiple of 512 (the disk is then the file rounded up to a sector, the
tail reading as zeros, qemu's rule).  Sizes are drawn; writes are biased towards 0, 4 KiB
and 64 KiB edges and the tail.  Operations: write, write_zeroes (with and without
may_unmap), discard, writes through the file view, resize (grow and shrink), reopen.

Every step: the image reads back exactly the model, and ``map()`` covers the disk and never
claims a run is zero/hole when the model holds non-zero bytes there.  At teardown
``qemu-img compare`` against a plain file built from the model must say identical, and
qemu sees the same virtual size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import modelkit
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from qemukit import QEMU

import diskimg

KiB = 1024
QEMU_IMG = shutil.which("qemu-img")
SIZES = [300 * KiB, 300 * KiB, 64 * KiB + 512, 4096, 512]
ODD_SIZES = [1, 1000, 4097, 300 * KiB - 100]
#: what the runs covered, printed by tests/property/conftest.py
COVERAGE = modelkit.counter("raw")


def _note(what: str) -> None:
    modelkit.note(COVERAGE, what)


class RawModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-raw-model-"))
        self.path = self.dir / "disk.raw"
        self.img: diskimg.BlockDevice | None = None

    @initialize(prealloc=st.sampled_from(["off", "falloc", "full", "existing odd file"]),
                size=st.sampled_from(SIZES), odd=st.sampled_from(ODD_SIZES),
                seed=st.integers(1, 255))
    def create(self, prealloc: str, size: int, odd: int, seed: int) -> None:
        if prealloc == "existing odd file":
            content = bytes((seed + i * 7) & 0xFF or 1 for i in range(odd))
            self.path.write_bytes(content)
            size = -(-odd // 512) * 512
            self.model = bytearray(content) + bytearray(size - odd)
        else:
            diskimg.create(self.path, "raw", size, options={"preallocation": prealloc})
            self.model = bytearray(size)
        self.size = size
        _note(f"create: {prealloc}")
        _note(f"size={size}")
        # format="raw": random data may legitimately look like another format's magic
        self.img = diskimg.open(self.path, "r+", format="raw")

    def _offset(self, data: st.DataObject) -> int:
        size = self.size
        edges = [e for e in (0, 1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537,
                             size - 4096, size - 513, size - 512, size - 1) if 0 <= e < size]
        off = data.draw(st.one_of(st.sampled_from(edges), st.integers(0, size - 1)))
        if off == 0:
            _note("op at offset 0")
        return off

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = self._offset(data)
        n = data.draw(st.one_of(st.sampled_from([1, 511, 512, 4096, 65536, 65537,
                                                 self.size - off]),
                                st.integers(1, 80 * KiB)))
        n = max(1, min(n, self.size - off))
        if off + n == self.size:
            _note("op to the end")
        return off, n

    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=70 * KiB))
    def write(self, data: st.DataObject, payload: bytes) -> None:
        off = self._offset(data)
        payload = payload[: self.size - off]
        assert self.img is not None
        self.img.write(off, payload)
        self.model[off : off + len(payload)] = payload
        _note("write")

    @rule(data=st.data(), byte=st.integers(1, 255))
    def write_pattern(self, data: st.DataObject, byte: int) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.write(off, bytes([byte]) * n)
        self.model[off : off + n] = bytes([byte]) * n
        _note("write_pattern")

    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_unmap: bool) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.write_zeroes(off, n, may_unmap=may_unmap)
        self.model[off : off + n] = bytes(n)
        _note(f"write_zeroes may_unmap={may_unmap}")

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.discard(off, n)
        self.model[off : off + n] = bytes(n)  # raw: a discarded range reads as zeros
        _note("discard")

    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=20 * KiB))
    def write_through_file_view(self, data: st.DataObject, payload: bytes) -> None:
        off = self._offset(data)
        payload = payload[: self.size - off]
        assert self.img is not None
        f = self.img.as_file()
        f.seek(off)
        f.write(payload)
        f.flush()
        self.model[off : off + len(payload)] = payload
        _note("write through file view")

    @rule(sectors=st.integers(1, 700))
    def resize(self, sectors: int) -> None:
        new = sectors * 512
        assert self.img is not None
        self.img.resize(new)  # type: ignore[attr-defined]
        _note(modelkit.resize_model(self.model, new))
        self.size = new

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = diskimg.open(self.path, "r+", format="raw")
        _note("reopen")

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img is not None
        assert self.img.size == self.size
        got = self.img.read(0, self.size)
        if got != self.model:
            bad = next(i for i in range(self.size) if got[i] != self.model[i])
            raise AssertionError(f"first difference at byte {bad}")

    @precondition(lambda self: self.img is not None)
    @invariant()
    def map_covers_disk_and_holes_are_zero(self) -> None:
        assert self.img is not None
        pos = 0
        for e in self.img.map():
            assert e.start == pos and e.length > 0
            assert e.present and e.depth == 0
            if not e.data:
                assert e.zero
                assert not any(self.model[e.start : e.start + e.length])
            pos += e.length
        assert pos == self.size

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                assert self.size - 512 < self.path.stat().st_size <= self.size
                if QEMU_IMG:
                    ref = self.dir / "model.raw"
                    ref.write_bytes(self.model)
                    res = QEMU.img("compare", "-f", "raw", "-F", "raw", self.path, ref,
                                   timeout=60, ok=None)
                    assert res.returncode == 0, res.stdout + res.stderr
                    assert res.stdout.strip() == "Images are identical."
                    info = QEMU.img("info", "--output=json", "-f", "raw", self.path, timeout=60,
                                    ok=None)
                    assert json.loads(info.stdout)["virtual-size"] == self.size
                    COVERAGE["runs checked by qemu"] += 1
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestRawModel = RawModel.TestCase
# inherits the profile loaded in tests/conftest.py ("ci" bounds max_examples, derandomized)
TestRawModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
