"""Hypothesis state machine: a qcow2 image drawn from the whole option space against a
bytearray model.

The image is drawn from all of: cluster sizes 512 B .. 2 MiB (every power of two),
compat 0.10 and 1.1, refcount_bits 1..64, extended_l2, an external data file with
data_file_raw on and off, lazy_refcounts, zlib and zstd, a qcow2 or raw backing file
shorter or longer than the image, LUKS and legacy aes.  Combinations qemu-img 7.2 refuses
are mapped to the nearest one it accepts (extended_l2 needs compat 1.1 and clusters of at
least 16 KiB; refcount_bits other than 16, lazy refcounts, zstd and data files need
compat 1.1; data_file_raw excludes a backing file).

Operations: write, write_zeroes (with and without may_unmap), discard, write_compressed,
snapshot create/apply/delete, resize (grow and shrink), reopen.  Operations qemu forbids
for the image (compressed writes with encryption or a data file, internal snapshots with a
data file, resize while snapshots exist) must be refused with a DiskImgError and leave
every file byte-identical.  Offsets are biased towards 0, cluster boundaries and the last,
partial cluster (the virtual size is usually not a multiple of the cluster size).

Every step the whole disk reads back as the model and every snapshot reads back as it
was taken; diskimg's own check is clean at every reopen and at the end.  At teardown qemu
reads the same bytes (``qemu-img compare`` with the model, through secrets and the data
file) and the same virtual size, every snapshot read by qemu matches, a raw data file
equals the model byte for byte, and ``qemu-img check`` is clean.

A fresh encrypted image with data_file_raw starts from what qemu reads (qemu maps the
zeroed data file one to one, and decrypted zeros are not zeros); the clusters a grow adds
are mapped the same way, and the model takes them from the image.  Resize is refused
while snapshots exist (diskimg's rule; qemu-img 7.2 grows such an image).

What each CI run covered is counted (tests/property/conftest.py prints the counters after
the run; ``--hypothesis-show-statistics`` shows the same as hypothesis events)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import modelkit
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from qemukit import QEMU

import diskimg

QEMU_IMG = shutil.which("qemu-img")
SECRETS = {"sec0": b"model-passphrase"}
QEMU_SECRET = ["--object", "secret,id=sec0,data=model-passphrase"]
MiB = 1 << 20

#: what the runs covered, printed by tests/property/conftest.py
COVERAGE = modelkit.counter("qcow2")


def _note(what: str) -> None:
    modelkit.note(COVERAGE, what)


def _pattern(n: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


@st.composite
def image_options(draw: st.DrawFn, focus: dict[str, Any] | None = None) -> dict[str, Any]:
    """Image options from the whole space; ``focus`` pins some of them (the derandomized
    CI run shrinks towards the first choices, so the corners get machines of their own)."""
    f = focus or {}
    cluster_bits = draw(st.integers(14 if f.get("extended_l2") else 9, 21))
    cs = 1 << cluster_bits
    compat = f.get("compat") or draw(st.sampled_from(["0.10", "1.1", "1.1"]))
    v3 = compat == "1.1"
    # few clusters for big clusters, enough for several L2 tables with small ones
    max_clusters = max(3, min(160, 4 * MiB // cs))
    full = draw(st.integers(0, max_clusters))
    tail_sectors = draw(st.one_of(st.just(0), st.integers(1, max(1, cs // 512 - 1))))
    if cs == 512:
        tail_sectors = 0
    size = max(512, full * cs + tail_sectors * 512)
    data_file = f.get("data_file") or (
        draw(st.sampled_from([None, None, "off", "on"])) if v3 else None)
    backing = f.get("backing") or draw(st.sampled_from([None, None, "raw", "qcow2"]))
    if data_file == "on" and backing is not None:
        # qemu: "Backing file and data-file-raw cannot be used at the same time"
        if "backing" in f:
            data_file = "off"
        else:
            backing = None
    o = {
        "cs": cs,
        "compat": compat,
        "size": size,
        "refcount_bits": draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64])) if v3 else 16,
        "extended_l2": draw(st.booleans()) if v3 and cs >= 16384 else False,
        "lazy_refcounts": draw(st.booleans()) if v3 else False,
        "zstd": draw(st.booleans()) if v3 else False,
        "data_file": data_file,
        "backing": backing,
        # the backing file: a little or a lot shorter or longer than the image
        "backing_size": max(512, size + draw(st.sampled_from([-cs, -512, 512, cs, cs + 512])))
        // 512 * 512,
        "encrypt": draw(st.sampled_from([None, None, None, "luks", "aes"])),
    }
    o.update({k: v for k, v in f.items() if k in o})
    return o


class Qcow2Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskimg-model-"))
        self.path = self.dir / "top.qcow2"
        self.img: Any = None
        self.snaps: dict[str, bytes] = {}
        self.base = b""
        self.nsnap = 0

    # --- set-up -----------------------------------------------------------------------

    @initialize(o=image_options())
    def setup(self, o: dict[str, Any]) -> None:
        self.o = o
        self.cs = cs = o["cs"]
        self.size = o["size"]
        self.compat = o["compat"]
        self.refcount_bits = o["refcount_bits"]
        self.encrypt = o["encrypt"]
        self.data_file = o["data_file"]
        self.backing = o["backing"]
        for k in ("compat", "refcount_bits", "extended_l2", "lazy_refcounts", "zstd",
                  "data_file", "backing", "encrypt"):
            _note(f"{k}={o[k]}")
        _note(f"cluster_size={cs}")
        _note("size%cluster!=0" if self.size % cs else "size%cluster==0")
        opts: dict[str, object] = {
            "cluster_size": cs, "compat": o["compat"], "refcount_bits": o["refcount_bits"],
            "compression_type": "zstd" if o["zstd"] else "zlib",
            "extended_l2": o["extended_l2"], "lazy_refcounts": o["lazy_refcounts"]}
        self.open_kw: dict[str, Any] = {}
        if self.encrypt:
            opts.update({"encrypt.format": self.encrypt, "encrypt.key-secret": "sec0",
                         "encrypt.iter-time": 1})
            self.open_kw = {"secrets": SECRETS, "options": {"encrypt.key-secret": "sec0"}}
        if self.data_file:
            opts["data_file"] = "top.data"
            opts["data_file_raw"] = self.data_file == "on"
        self.model = bytearray(self.size)
        if self.backing:
            bsize = o["backing_size"]
            _note("backing longer" if bsize > self.size else "backing shorter")
            self.base = _pattern(bsize, 1)
            name = f"base.{self.backing}"
            if self.backing == "raw":
                (self.dir / name).write_bytes(self.base)
            else:
                diskimg.create(self.dir / name, "qcow2", bsize,
                               options={"cluster_size": 65536 if cs < 65536 else 4096})
                with diskimg.open(self.dir / name, "r+") as b:
                    b.write(0, self.base)
            n = min(bsize, self.size)
            self.model[:n] = self.base[:n]
            diskimg.create(self.path, "qcow2", self.size, backing_file=name,
                           backing_fmt=self.backing, options=opts, secrets=SECRETS)
        else:
            diskimg.create(self.path, "qcow2", self.size, options=opts, secrets=SECRETS)
        if self.encrypt and self.data_file == "on" and QEMU_IMG is not None:
            # qemu maps a raw data file one to one from the start (metadata
            # preallocation), so a new encrypted image reads as its zeroed data file
            # decrypted: take the starting contents from qemu
            out = self.dir / "start.raw"
            res = QEMU.img("convert", *self._qemu_top(self.path)[:3], "-O", "raw",
                           self._qemu_top(self.path)[3], str(out), ok=None, cwd=self.dir)
            assert res.returncode == 0, res.stderr
            self.model = bytearray(out.read_bytes())
            out.unlink()
        self._open()

    def _open(self) -> None:
        self.img = diskimg.open(self.path, "r+", **self.open_kw)

    # --- strategies that depend on the image ------------------------------------------

    def _offset(self, data: st.DataObject) -> int:
        cs, size = self.cs, self.size
        last = (size - 1) // cs * cs  # start of the last (maybe partial) cluster
        nclusters = -(-size // cs)
        off = data.draw(st.one_of(
            st.just(0),
            st.builds(lambda c: c * cs, st.integers(0, nclusters - 1)),
            st.just(last),
            st.integers(last, size - 1),
            st.sampled_from([max(0, size - 512), size - 1, min(511, size - 1),
                             min(cs - 1, size - 1)]),
            st.integers(0, size - 1),
        ))
        if off == 0:
            _note("op at offset 0")
        if off >= last:
            _note("op in last cluster")
        return off

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = self._offset(data)
        room = self.size - off
        cs = self.cs
        n = data.draw(st.one_of(
            st.just(room),
            st.sampled_from([1, 512, cs, cs + 1, 2 * cs]),
            st.integers(1, 3 * cs + 1000),
        ))
        return off, max(1, min(n, room))

    def _files(self) -> dict[str, str]:
        return modelkit.file_hashes(self.dir)

    def _refused(self, what: str, fn: Callable[[], object]) -> None:
        """``fn`` must fail with a DiskImgError and change no byte of any file."""
        self.img.flush()
        before = self._files()
        with pytest.raises(diskimg.DiskImgError):
            fn()
        self.img.flush()
        assert self._files() == before, f"refused {what} changed a file"
        _note(f"refused: {what}")

    # --- operations --------------------------------------------------------------------

    @rule(data=st.data(), seed=st.integers(0, 255), fill=st.booleans())
    def write(self, data: st.DataObject, seed: int, fill: bool) -> None:
        off, n = self._range(data)
        buf = bytes([seed | 1]) * n if fill else _pattern(n, seed)
        self.img.write(off, buf)
        self.model[off : off + n] = buf
        _note("write")

    @rule(data=st.data(), seed=st.integers(0, 255), compressible=st.booleans())
    def write_compressed(self, data: st.DataObject, seed: int, compressible: bool) -> None:
        """A whole cluster (the last one may be partial) written compressed (qemu-io write
        -c); incompressible data falls back to a normal cluster.  qemu refuses it for
        encrypted images and with a data file."""
        nclusters = -(-self.size // self.cs)
        c = data.draw(st.one_of(st.just(0), st.just(nclusters - 1),
                                st.integers(0, nclusters - 1)))
        off = c * self.cs
        n = min(self.cs, self.size - off)
        if compressible:
            buf = bytes([seed]) * (n // 2) + bytes(n - n // 2)
        else:
            buf = _pattern(n, seed)
            buf = bytes(b ^ (i * 131 & 0xFF) for i, b in enumerate(buf[:4096])) + buf[4096:]
        if self.encrypt or self.data_file:
            self._refused("write_compressed", lambda: self.img.write_compressed(off, buf))
            return
        self.img.write_compressed(off, buf)
        self.model[off : off + n] = buf
        _note("write_compressed")

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = self._range(data)
        self.img.write_zeroes(off, n, may_unmap=unmap)
        self.model[off : off + n] = bytes(n)
        _note(f"write_zeroes may_unmap={unmap}")

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """Discard touches whole clusters only (the partial last one counts as whole);
        they then read as zeros, except in a v2 image with a backing file, which ignores
        discards as QEMU does (it has no zero flag there)."""
        off, n = self._range(data)
        self.img.discard(off, n)
        first = -(-off // self.cs) * self.cs
        end = (off + n) // self.cs * self.cs if off + n < self.size else self.size
        if end > first:
            if not (self.backing and self.compat == "0.10"):
                self.model[first:end] = bytes(end - first)
        _note("discard")

    @precondition(lambda self: len(self.snaps) < 3)
    @rule()
    def snapshot_create(self) -> None:
        name = f"s{self.nsnap}"
        self.nsnap += 1
        if self.data_file:
            self._refused("snapshot with data file", lambda: self.img.snapshots.create(name))
            return
        self.img.flush()
        before = self._files()
        try:
            sn = self.img.snapshots.create(name)
        except diskimg.UsageError as e:
            # only narrow refcounts can refuse, and then nothing may have changed
            assert self.refcount_bits < 16 and "maximum" in str(e), e
            assert self._files() == before, "refused snapshot create changed a file"
            _note("refused: snapshot create (refcount maximum)")
            return
        self.snaps[sn.id] = bytes(self.model)
        _note("snapshot_create")

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def snapshot_apply(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.flush()
        before = self._files()
        try:
            self.img.snapshots.apply(sid)
        except diskimg.UsageError as e:
            assert self.refcount_bits < 16 and "maximum" in str(e), e
            assert self._files() == before, "refused snapshot apply changed a file"
            _note("refused: snapshot apply (refcount maximum)")
            return
        self.model = bytearray(self.snaps[sid])
        self.size = len(self.model)  # qemu 7.2 resizes to the snapshot's disk size
        _note("snapshot_apply")

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def snapshot_delete(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.snapshots.delete(sid)
        del self.snaps[sid]
        _note("snapshot_delete")

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        """Grow or shrink; the grown part reads as zeros, even over a longer backing
        file.  A v2 image with internal snapshots is refused, as qemu 7.2 refuses it (its
        snapshot entries keep no disk size); a v3 one resizes its active layer only."""
        cs = self.cs
        new = data.draw(st.one_of(
            st.integers(1, max(2, 2 * self.size // 512)).map(lambda s: s * 512),
            st.integers(1, max(1, 2 * self.size // cs)).map(lambda c: c * cs),
            st.sampled_from([self.size + 512, max(512, self.size - 512)]),
        ))
        new = max(512, min(new, self.size + 2 * cs, 8 * MiB))
        if self.snaps and self.compat == "0.10":
            self._refused("resize of a v2 image with snapshots",
                          lambda: self.img.resize(new, shrink=True))
            return
        if self.compat == "0.10" and self.backing and len(self.base) > self.size \
                and new > -(-self.size // cs) * cs:
            # qemu-img 7.2 zeroes what a longer backing file would show in new clusters,
            # and v2 has no zero flag: "Failed to zero out new clusters"
            self._refused("grow of a v2 image over a longer backing file",
                          lambda: self.img.resize(new, shrink=True))
            return
        old = self.size
        self.img.resize(new, shrink=True)
        _note(modelkit.resize_model(self.model, new))
        self.size = new
        if new > old and self.encrypt and self.data_file == "on":
            # the new clusters are mapped one to one over the raw data file's zeros, as
            # at create (qemu's implied preallocation=metadata): they read as those
            # zeros decrypted; the rest of the old last cluster is zeroed
            cend = min(new, -(-old // cs) * cs)
            self.model[cend:new] = self.img.read(cend, new - cend)

    @rule()
    def reopen(self) -> None:
        self.check_is_clean()
        self.img.close()
        self._open()
        _note("reopen")

    # --- invariants --------------------------------------------------------------------

    @precondition(lambda self: self.img is not None)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.img.size == self.size
        got = self.img.read(0, self.size)
        if got != self.model:
            bad = next(i for i in range(self.size) if got[i] != self.model[i])
            raise AssertionError(f"first difference at guest byte {bad} "
                                 f"(cluster {bad // self.cs})")

    @precondition(lambda self: bool(self.snaps))
    @invariant()
    def snapshots_keep_their_contents(self) -> None:
        for sid, content in self.snaps.items():
            with self.img.snapshot_view(snapshot_id=sid) as v:
                same = v.read(0, v.size) == content
                assert same, f"snapshot {sid} changed"

    def check_is_clean(self) -> None:
        """diskimg's own check (at every reopen and at the end; qemu-img check too at the
        end)."""
        res = self.img.check()
        assert res.exit_code == 0 and res.leaks == 0 and res.corruptions == 0, \
            res.human_lines()

    # --- qemu's view at the end --------------------------------------------------------
    # (every qemu-img call runs in self.dir: qemu 7.2 opens a relative data_file name from
    # its working directory)

    def _qemu_top(self, path: Path) -> list[str]:
        if self.encrypt:
            return [*QEMU_SECRET, "--image-opts",
                    f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
        return ["-f", "qcow2", str(path)]

    def _qemu_compare(self, path: Path, content: bytes, what: str) -> None:
        assert QEMU_IMG is not None
        ref = self.dir / "model.raw"
        ref.write_bytes(content)
        top = self._qemu_top(path)
        if self.encrypt:
            args = [*top, f"driver=raw,file.filename={ref}"]
        else:
            args = [*top, "-F", "raw", str(ref)]
        res = QEMU.img("compare", *args, ok=None, cwd=self.dir)
        assert res.returncode == 0, f"{what}: {res.stdout}{res.stderr}"
        ref.unlink()

    def _refused_like_qemu(self, sid: str) -> None:
        """diskimg's apply of snapshot ``sid`` (on a copy of the closed image) refuses, as
        qemu-img's did, for the refcount maximum, and leaves the copy byte-identical."""
        copy = self.dir / f"dsnap{sid}.qcow2"
        shutil.copyfile(self.path, copy)
        digest = hashlib.sha256(copy.read_bytes()).hexdigest()
        with diskimg.open(copy, "r+", **self.open_kw) as img, \
                pytest.raises(diskimg.UsageError, match="maximum"):
            img.snapshots.apply(sid)
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest, "refusal changed the file"
        copy.unlink()
        _note("refused by qemu and diskimg: snapshot apply (refcount maximum)")

    def teardown(self) -> None:
        try:
            if self.img is None:
                return
            self.check_is_clean()
            if QEMU_IMG is None:
                return
            self.img.close()
            self.img = None
            chk = QEMU.img("check", *self._qemu_top(self.path), ok=None, cwd=self.dir)
            assert chk.returncode == 0 and "No errors were found" in chk.stdout, \
                chk.stdout + chk.stderr
            info = QEMU.img("info", "--output=json", *self._qemu_top(self.path), ok=None,
                            cwd=self.dir)
            assert json.loads(info.stdout)["virtual-size"] == self.size, info.stdout
            self._qemu_compare(self.path, bytes(self.model), "qemu reads the active layer")
            if self.data_file == "on" and not self.encrypt:
                raw = (self.dir / "top.data").read_bytes()
                same = raw[: self.size] == self.model  # (no pytest diff of megabytes)
                assert same, "the raw data file differs from the disk"
                # (qemu too writes the last cluster whole: zeros past the disk's end)
                assert not any(raw[self.size :]), "data past the disk in the raw data file"
                assert len(raw) <= -(-self.size // self.cs) * self.cs, len(raw)
            for sid, content in self.snaps.items():
                # qemu applies the snapshot on a copy; then it must read what was taken
                copy = self.dir / f"snap{sid}.qcow2"
                shutil.copyfile(self.path, copy)
                # (qemu-img snapshot takes no -f)
                target = self._qemu_top(copy)[3:] if self.encrypt else [str(copy)]
                opts = [*QEMU_SECRET, "--image-opts"] if self.encrypt else []
                res = QEMU.img("snapshot", *opts, "-a", sid, *target, ok=None, cwd=self.dir)
                if res.returncode and self.refcount_bits < 16 \
                        and "Invalid argument" in res.stderr:
                    # qemu takes the snapshot's references before it drops the active
                    # layer's: at the refcount maximum it refuses, and so must diskimg,
                    # changing nothing
                    self._refused_like_qemu(sid)
                    copy.unlink()
                    continue
                assert res.returncode == 0, res.stdout + res.stderr
                self._qemu_compare(copy, content, f"qemu reads snapshot {sid}")
                copy.unlink()
            COVERAGE["runs checked by qemu"] += 1
        finally:
            if self.img is not None:
                self.img.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TestQcow2Model = Qcow2Machine.TestCase
# CI: ~30 image configurations of up to 15 operations each (the counters show which)
TestQcow2Model.settings = settings(max_examples=30, stateful_step_count=15, deadline=None)

# The corners of the option space, each with a machine of its own: the derandomized CI
# profile shrinks towards the first choice of every option (compat 0.10, no data file, 16-bit
# refcounts, ...), so without these a CI run would rarely reach them.
FOCI: dict[str, dict[str, Any]] = {
    "data_file_raw": {"compat": "1.1", "data_file": "on"},
    "data_file": {"compat": "1.1", "data_file": "off"},
    "data_file_extended_l2": {"compat": "1.1", "data_file": "off", "extended_l2": True},
    "refcount_bits_1": {"compat": "1.1", "refcount_bits": 1},
    "refcount_bits_32": {"compat": "1.1", "refcount_bits": 32},
    "refcount_bits_64": {"compat": "1.1", "refcount_bits": 64},
    "extended_l2": {"compat": "1.1", "extended_l2": True},
    "lazy_refcounts_zstd": {"compat": "1.1", "lazy_refcounts": True, "zstd": True},
    "luks": {"compat": "1.1", "encrypt": "luks"},
    "luks_data_file_raw": {"compat": "1.1", "encrypt": "luks", "data_file": "on"},
    "qcow2_backing": {"compat": "1.1", "backing": "qcow2"},
    "raw_backing_v2": {"compat": "0.10", "backing": "raw"},
}


def _focused(name: str, focus: dict[str, Any]) -> type:
    @initialize(o=image_options(focus))
    def setup(self: Qcow2Machine, o: dict[str, Any]) -> None:
        Qcow2Machine.setup(self, o)

    # the same rules, with an initialize step (overriding the base one) that draws from the
    # focused options
    machine = type(f"Qcow2Machine_{name}", (Qcow2Machine,), {"setup": setup})
    case = machine.TestCase
    case.settings = settings(max_examples=5, stateful_step_count=12, deadline=None)
    return case


for _name, _focus in FOCI.items():
    globals()[f"TestQcow2Model_{_name}"] = _focused(_name, _focus)
