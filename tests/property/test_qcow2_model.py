"""Hypothesis state machine: a qcow2 image (with and without a backing file) against a
bytearray model, with internal snapshots (create/apply/delete) checked through views.
Every run ends with ``qemu-img check`` clean and ``qemu-img compare`` identical to the
model."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import diskimg

QEMU = shutil.which("qemu-img")
SIZE = 1 << 20  # 1 MiB keeps every example fast and still spans many clusters
SECRETS = {"sec0": b"model-passphrase"}
QEMU_SECRET = ["--object", "secret,id=sec0,data=model-passphrase"]


class Qcow2Machine(RuleBasedStateMachine):
    with_backing = False

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-model-"))
        self.path = self.dir / "top.qcow2"
        self.img: diskimg.BlockDevice | None = None
        self.snaps: dict[str, bytes] = {}

    @initialize(
        cluster_bits=st.sampled_from([9, 12, 16]),
        compat=st.sampled_from(["0.10", "1.1"]),
        refcount_bits=st.sampled_from([1, 16, 64]),
        size_sectors=st.integers(1, SIZE // 512),
        zstd=st.booleans(),
        extended_l2=st.booleans(),
        encrypt=st.sampled_from([None, None, "luks", "aes"]),
    )
    def setup(self, cluster_bits: int, compat: str, refcount_bits: int,
              size_sectors: int, zstd: bool, extended_l2: bool, encrypt: str | None) -> None:
        if compat == "0.10":
            refcount_bits = 16
            zstd = False
        if compat == "0.10" or cluster_bits < 14:
            extended_l2 = False
        self.cs = 1 << cluster_bits
        self.refcount_bits = refcount_bits
        self.size = size_sectors * 512
        self.compat = compat
        opts: dict[str, object] = {
            "cluster_size": self.cs, "compat": compat, "refcount_bits": refcount_bits,
            "compression_type": "zstd" if zstd else "zlib", "extended_l2": extended_l2}
        self.encrypt = encrypt
        self.open_kw: dict[str, object] = {}
        if encrypt:
            opts.update({"encrypt.format": encrypt, "encrypt.key-secret": "sec0",
                         "encrypt.iter-time": 1})
            self.open_kw = {"secrets": SECRETS, "options": {"encrypt.key-secret": "sec0"}}
        if self.with_backing:
            base = self.dir / "base.raw"
            pattern = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (self.size // 256 + 1)
            base_len = self.size // 2  # shorter than the overlay: the tail reads as zeros
            base.write_bytes(pattern[:base_len])
            self.model = bytearray(pattern[:base_len]) + bytearray(self.size - base_len)
            diskimg.create(self.path, "qcow2", self.size, backing_file="base.raw",
                           backing_fmt="raw", options=opts, secrets=SECRETS)
        else:
            self.model = bytearray(self.size)
            diskimg.create(self.path, "qcow2", self.size, options=opts, secrets=SECRETS)
        self.img = diskimg.open(self.path, "r+", **self.open_kw)  # type: ignore[arg-type]

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.integers(1, min(self.size - off, 3 * self.cs + 1000)))
        return off, n

    @rule(data=st.data(), byte=st.integers(1, 255))
    def write(self, data: st.DataObject, byte: int) -> None:
        off, n = self._range(data)
        buf = bytes([byte]) * n
        assert self.img is not None
        self.img.write(off, buf)
        self.model[off : off + n] = buf

    @rule(data=st.data(), seed=st.integers(0, 255), compressible=st.booleans())
    def write_compressed(self, data: st.DataObject, seed: int, compressible: bool) -> None:
        """A whole cluster written compressed (qemu-io write -c); incompressible data falls
        back to a normal cluster."""
        assert self.img is not None
        if self.encrypt:
            with pytest.raises(diskimg.UnsupportedFeatureError):
                self.img.write_compressed(0, bytes(min(self.cs, self.size)))  # type: ignore[attr-defined]
            return
        nclusters = -(-self.size // self.cs)
        c = data.draw(st.integers(0, nclusters - 1))
        off = c * self.cs
        n = min(self.cs, self.size - off)
        if compressible:
            buf = bytes([seed]) * (n // 2) + bytes(n - n // 2)
        else:
            buf = bytes((seed + i * 131 + (i >> 3) * 17) & 0xFF for i in range(n))
        self.img.write_compressed(off, buf)  # type: ignore[attr-defined]
        self.model[off : off + n] = buf

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.write_zeroes(off, n, may_unmap=unmap)
        self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """Discard touches whole clusters only; they then read as zeros, except in a v2
        image with a backing file, which ignores discards as QEMU does."""
        off, n = self._range(data)
        assert self.img is not None
        self.img.discard(off, n)
        first = -(-off // self.cs) * self.cs
        end = (off + n) // self.cs * self.cs if off + n < self.size else self.size
        if end > first:
            if not (self.with_backing and self.compat == "0.10"):
                self.model[first:end] = bytes(end - first)

    @precondition(lambda self: len(self.snaps) < 3)
    @rule()
    def snapshot_create(self) -> None:
        assert self.img is not None
        try:
            sn = self.img.snapshots.create(f"s{len(self.snaps)}")  # type: ignore[attr-defined]
        except diskimg.UsageError as e:
            # only narrow refcounts can refuse, and then nothing may have changed
            assert self.refcount_bits < 4 and "maximum" in str(e)
            return
        self.snaps[sn.id] = bytes(self.model)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def snapshot_apply(self, data: st.DataObject) -> None:
        assert self.img is not None
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        try:
            self.img.snapshots.apply(sid)  # type: ignore[attr-defined]
        except diskimg.UsageError as e:
            assert self.refcount_bits < 4 and "maximum" in str(e)
            return
        self.model = bytearray(self.snaps[sid])

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def snapshot_delete(self, data: st.DataObject) -> None:
        assert self.img is not None
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.snapshots.delete(sid)  # type: ignore[attr-defined]
        del self.snaps[sid]

    @precondition(lambda self: bool(self.snaps))
    @invariant()
    def snapshots_keep_their_contents(self) -> None:
        assert self.img is not None
        for sid, content in self.snaps.items():
            with self.img.snapshot_view(snapshot_id=sid) as v:  # type: ignore[attr-defined]
                assert v.read(0, v.size) == content

    @precondition(lambda self: not self.snaps)
    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        """Grow or shrink (qcow2 refuses both while snapshots exist); the grown part reads
        as zeros, even over a longer backing file."""
        assert self.img is not None
        new = data.draw(st.integers(1, SIZE // 512)) * 512
        self.img.resize(new, shrink=True)  # type: ignore[attr-defined]
        if new < self.size:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - self.size))
        self.size = new

    @invariant()
    def check_is_clean(self) -> None:
        if self.img is not None:
            res = self.img.check()  # type: ignore[attr-defined]
            assert res.exit_code == 0 and res.leaks == 0 and res.corruptions == 0, \
                res.human_lines()

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = diskimg.open(self.path, "r+", **self.open_kw)  # type: ignore[arg-type]

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img is not None
        assert self.img.read(0, self.size) == self.model

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                if QEMU:
                    top = [str(self.path)]
                    if self.encrypt:
                        top = [*QEMU_SECRET, "--image-opts",
                               f"driver=qcow2,file.filename={self.path},encrypt.key-secret=sec0"]
                    chk = subprocess.run([QEMU, "check", *top], capture_output=True, text=True)
                    assert chk.returncode == 0, chk.stdout + chk.stderr
                    ref = self.dir / "model.raw"
                    ref.write_bytes(self.model)
                    if self.encrypt:
                        args = [*top, f"driver=raw,file.filename={ref}"]
                    else:
                        args = ["-f", "qcow2", "-F", "raw", str(self.path), str(ref)]
                    cmp = subprocess.run([QEMU, "compare", *args],
                                         capture_output=True, text=True)
                    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Qcow2BackingMachine(Qcow2Machine):
    with_backing = True


TestQcow2Model = Qcow2Machine.TestCase
TestQcow2Model.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestQcow2BackingModel = Qcow2BackingMachine.TestCase
TestQcow2BackingModel.settings = settings(max_examples=20, stateful_step_count=25,
                                          deadline=None)
