"""raw image vs a bytearray model (hypothesis state machine).

Every step: the image reads back exactly the model, and ``map()`` covers the disk and never
claims a run is zero/hole when the model holds non-zero bytes there.  At teardown
``qemu-img compare`` against a plain file built from the model must say identical.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import diskimg

KiB = 1024
SIZE = 300 * KiB  # a multiple of 512 but not of 4 KiB: exercises partial-block edges
QEMU_IMG = shutil.which("qemu-img")

# offsets that sit on or near interesting boundaries, plus anything at all
_edges = sorted({0, 1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537,
                 SIZE - 4096, SIZE - 513, SIZE - 512, SIZE - 1})
offsets = st.one_of(st.sampled_from(_edges), st.integers(0, SIZE - 1))
lengths = st.one_of(st.sampled_from([1, 511, 512, 4096, 65536, 65537]),
                    st.integers(1, 80 * KiB))


def _clip(off: int, n: int) -> int:
    return max(0, min(n, SIZE - off))


class RawModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-raw-model-"))
        self.path = self.dir / "disk.raw"
        self.model = bytearray(SIZE)
        self.img: diskimg.BlockDevice | None = None

    @initialize(prealloc=st.sampled_from(["off", "falloc", "full"]))
    def create(self, prealloc: str) -> None:
        diskimg.create(self.path, "raw", SIZE, options={"preallocation": prealloc})
        # format="raw": random data may legitimately look like another format's magic
        self.img = diskimg.open(self.path, "r+", format="raw")

    @rule(off=offsets, data=st.binary(min_size=1, max_size=70 * KiB))
    def write(self, off: int, data: bytes) -> None:
        data = data[: _clip(off, len(data))]
        assert self.img is not None
        self.img.write(off, data)
        self.model[off : off + len(data)] = data

    @rule(off=offsets, byte=st.integers(1, 255), n=lengths)
    def write_pattern(self, off: int, byte: int, n: int) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.write(off, bytes([byte]) * n)
        self.model[off : off + n] = bytes([byte]) * n

    @rule(off=offsets, n=lengths, may_unmap=st.booleans())
    def write_zeroes(self, off: int, n: int, may_unmap: bool) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.write_zeroes(off, n, may_unmap=may_unmap)
        self.model[off : off + n] = bytes(n)

    @rule(off=offsets, n=lengths)
    def discard(self, off: int, n: int) -> None:
        n = _clip(off, n)
        assert self.img is not None
        self.img.discard(off, n)
        self.model[off : off + n] = bytes(n)  # raw: a discarded range reads as zeros

    @rule(off=offsets, data=st.binary(min_size=1, max_size=20 * KiB))
    def write_through_file_view(self, off: int, data: bytes) -> None:
        data = data[: _clip(off, len(data))]
        assert self.img is not None
        f = self.img.as_file()
        f.seek(off)
        f.write(data)
        f.flush()
        self.model[off : off + len(data)] = data

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = diskimg.open(self.path, "r+", format="raw")

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img is not None
        assert self.img.size == SIZE
        got = self.img.read(0, SIZE)
        if got != self.model:
            bad = next(i for i in range(SIZE) if got[i] != self.model[i])
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
        assert pos == SIZE

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                assert self.path.stat().st_size == SIZE
                if QEMU_IMG:
                    ref = self.dir / "model.raw"
                    ref.write_bytes(self.model)
                    res = subprocess.run(
                        [QEMU_IMG, "compare", "-f", "raw", "-F", "raw", str(self.path), str(ref)],
                        capture_output=True, text=True, timeout=60)
                    assert res.returncode == 0, res.stdout + res.stderr
                    assert res.stdout.strip() == "Images are identical."
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestRawModel = RawModel.TestCase
# inherits the profile loaded in tests/conftest.py ("ci" bounds max_examples, derandomized)
TestRawModel.settings = settings(stateful_step_count=30, deadline=None)
