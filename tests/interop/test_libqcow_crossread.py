r"""qcow2 cross-read with libqcow (libyal's C reader, ``pyqcow`` from libqcow-python): a second
reader, independent of QEMU and of diskimg, must see the same guest bytes in images diskimg
wrote, and in images qemu wrote both readers must agree with ``qemu-img convert -O raw``.

Tested (libqcow-python 20260703): v2 and v3; cluster sizes 4 KiB / 64 KiB / 2 MiB; unaligned
random writes; zero clusters (v3 zero flag with and without a preallocated host cluster);
discards; internal snapshots (active layer read after copy-on-write); refcount_bits 4 and 16;
lazy refcounts; zlib-compressed clusters in v2 images; backing chains of three qcow2 images
(``set_parent``), v2 with zero writes in the top, v3 with data only; legacy AES
(``set_password``).

Not tested, because libqcow cannot read it (it refuses to open the image, ``unsupported
incompatible features flags``): extended L2 (0x10), zstd (0x08), external data files (0x04).

Not tested, because libqcow reads it WRONG (each reproduction prints the wrong bytes, where
qemu-io ``read -P`` and diskimg read the expected ones):

1. v3 zlib clusters whose compressed data starts at an odd host byte offset read as zeros:
   libqcow takes bit 0 of a compressed-cluster descriptor (part of the host offset) for the
   v3 "reads as zero" flag.  The same clusters in a v2 (compat=0.10) image read correctly::

     qemu-img create -q -f qcow2 c.qcow2 1M
     qemu-io -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' c.qcow2
     python -c "import pyqcow; f = pyqcow.file(); f.open('c.qcow2'); \
       print(f.read_buffer_at_offset(4, 65536))"   # b'\x00\x00\x00\x00', not b'\x02...'

2. v3 zero clusters over a backing file read the backing file's data instead of zeros::

     qemu-img create -q -f qcow2 base.qcow2 1M
     qemu-io -c 'write -P 0xaa 0 64k' base.qcow2
     qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M
     qemu-io -c 'write -z 0 64k' top.qcow2
     python -c "import pyqcow; b = pyqcow.file(); b.open('base.qcow2'); \
       t = pyqcow.file(); t.open('top.qcow2'); t.set_parent(b); \
       print(t.read_buffer_at_offset(4, 0))"       # b'\xaa\xaa\xaa\xaa', not zeros

3. LUKS (``encrypt.format=luks``) images return ciphertext (``pyqcow.encryption_types`` has
   only NONE and AES_128_CBC)::

     qemu-img create -q -f qcow2 --object secret,id=s0,data=pw \
       -o encrypt.format=luks,encrypt.key-secret=s0 l.qcow2 1M
     qemu-io --object secret,id=s0,data=pw \
       --image-opts driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=s0 \
       -c 'write -P 0x5a 0 64k'
     python -c "import pyqcow; f = pyqcow.file(); f.set_password('pw'); \
       f.open('l.qcow2'); print(f.read_buffer_at_offset(8, 0))"   # not b'ZZZZZZZZ'
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg

pyqcow = pytest.importorskip("pyqcow")

KiB, MiB = 1 << 10, 1 << 20
PASSWORD = "correct horse"
SECRETS = {"s0": PASSWORD.encode()}
OPEN_AES = {"secrets": SECRETS, "options": {"encrypt.key-secret": "s0"}}


def libqcow_read(chain: list[Path], password: str | None = None) -> bytes:
    """All guest bytes of ``chain[0]`` as libqcow reads them; ``chain[1:]`` are its backing
    files, top first, attached with ``set_parent`` (libqcow does not open them itself)."""
    with ExitStack() as stack:
        files = []
        for p in chain:
            f = pyqcow.file()
            if password is not None:
                f.set_password(password)
            f.open(str(p))
            stack.callback(f.close)
            files.append(f)
        for child, parent in pairwise(files):
            child.set_parent(parent)
        top = files[0]
        return bytes(top.read_buffer_at_offset(top.get_media_size(), 0))


class Writer:
    """Writes seeded random data through a diskimg device and mirrors it in a bytearray."""

    def __init__(self, size: int, seed: int) -> None:
        self.model = bytearray(size)
        self.rng = random.Random(seed)

    def data(self, dev: Any, off: int, n: int) -> None:
        b = self.rng.randbytes(n)
        dev.write(off, b)
        self.model[off : off + n] = b

    def zero(self, dev: Any, off: int, n: int, *, may_unmap: bool = False) -> None:
        dev.write_zeroes(off, n, may_unmap=may_unmap)
        self.model[off : off + n] = bytes(n)

    def compressed(self, dev: Any, off: int, cluster: bytes) -> None:
        dev.write_compressed(off, cluster)
        self.model[off : off + len(cluster)] = cluster


def _assert_same(path: Path, expected: bytes | bytearray, *, chain: tuple[Path, ...] = (),
                 **open_kw: Any) -> None:
    with diskimg.open(path, **open_kw) as d:
        assert d.read(0, d.size) == expected, "diskimg disagrees with the model"
    pw = PASSWORD if open_kw else None
    theirs = libqcow_read([path, *chain], pw)
    assert len(theirs) == len(expected)
    if theirs != expected:
        bad = next(i for i in range(len(expected)) if theirs[i] != expected[i])
        pytest.fail(f"libqcow differs first at guest offset {bad:#x}")


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB, 2 * MiB])
def test_diskimg_written_image_reads_identically(tmp_path: Path, compat: str,
                                                 cluster_size: int) -> None:
    size = 12 * MiB
    cs = cluster_size
    img = tmp_path / "d.qcow2"
    diskimg.create(img, "qcow2", size, options={"compat": compat, "cluster_size": cs})
    w = Writer(size, seed=cs + len(compat))
    with diskimg.open(img, "r+") as d:
        w.data(d, 1000, 300 * KiB)                 # unaligned, spans clusters
        w.data(d, 1 * MiB - 7, 2 * cs + 11)
        w.data(d, size - 100, 100)                 # last bytes of the disk
        w.data(d, 2 * MiB + 5, 8 * MiB)            # every cluster of [4M, 10M) allocated
        d.discard(4 * MiB, cs)
        w.model[4 * MiB : 4 * MiB + cs] = bytes(cs)
        w.zero(d, 6 * MiB, cs)                     # zero flag, keeps its host cluster in v3
        w.zero(d, 8 * MiB, cs, may_unmap=True)
    with diskimg.open(img, "r+") as d:             # a second session overwrites the first
        w.data(d, 64 * KiB - 3, 5 * KiB)
        w.data(d, 3 * MiB + 1, 1)
        zeros = [e for e in d.map() if e.zero and e.present]
    if compat == "1.1":    # v3: zero flags, one on a cluster that still holds stale random data
        assert any(e.offset is not None for e in zeros), zeros
    _assert_same(img, w.model)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_active_layer_after_internal_snapshot(tmp_path: Path, compat: str) -> None:
    """Clusters shared with a snapshot (refcount 2, no COPIED flag) and their copies."""
    size = 4 * MiB
    img = tmp_path / "s.qcow2"
    diskimg.create(img, "qcow2", size, options={"compat": compat, "refcount_bits": 4
                                                if compat == "1.1" else 16,
                                                "lazy_refcounts": compat == "1.1"})
    w = Writer(size, seed=7)
    with diskimg.open(img, "r+") as d:
        w.data(d, 0, 1 * MiB + 5)
        d.snapshots.create("s1")
        w.data(d, 4096, 10)                        # copy-on-write of a shared cluster
        w.zero(d, 512 * KiB, 64 * KiB)
        d.snapshots.create("s2")
        w.data(d, 2 * MiB, 100 * KiB)
    _assert_same(img, w.model)


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB, 2 * MiB])
def test_zlib_compressed_clusters_v2(tmp_path: Path, cluster_size: int) -> None:
    """v2 only: libqcow misreads some v3 compressed clusters (module docstring, item 1)."""
    cs = cluster_size
    size = 8 * cs
    img = tmp_path / "c.qcow2"
    diskimg.create(img, "qcow2", size, options={"compat": "0.10", "cluster_size": cs})
    w = Writer(size, seed=cs)
    clusters = [(b"diskimg " * cs)[:cs],                         # compresses to a few bytes
                w.rng.randbytes(cs // 2) + bytes(cs // 2),      # about half the cluster
                bytes(range(256)) * (cs // 256),
                w.rng.randbytes(cs)]                            # incompressible: stored plain
    with diskimg.open(img, "r+") as d:
        for i, c in enumerate(clusters):
            w.compressed(d, i * cs, c)
        w.compressed(d, size - cs, clusters[1])
        w.data(d, cs + 100, 50)                    # partial overwrite: decompress, merge
        d.discard(2 * cs, cs)                      # discard of a compressed cluster
        w.model[2 * cs : 3 * cs] = bytes(cs)
        compressed = [e for e in d.map() if e.data and e.offset is None]  # as qemu-img map
    assert len(compressed) >= 2, compressed
    _assert_same(img, w.model)


def test_convert_compressed_v2(tmp_path: Path) -> None:
    """``convert -c`` (thread pool) output, read by libqcow."""
    rng = random.Random(11)
    raw = tmp_path / "s.raw"
    model = bytearray(4 * MiB)
    for off in (0, 70000, 1 * MiB, 3 * MiB + 5):
        chunk = rng.randbytes(2000) * 40
        model[off : off + len(chunk)] = chunk
    raw.write_bytes(model)
    img = tmp_path / "c.qcow2"
    diskimg.convert(raw, img, "qcow2", options={"compat": "0.10"}, compress=True, workers=2)
    _assert_same(img, model)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_chain(tmp_path: Path, compat: str) -> None:
    """base <- mid <- top, each with its own writes; unaligned writes in the upper layers copy
    the rest of their cluster up from below.  v3 top layers get no zero writes (docstring,
    item 2)."""
    size = 4 * MiB
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    w = Writer(size, seed=3)
    diskimg.create(base, "qcow2", size, options={"compat": compat})
    with diskimg.open(base, "r+") as d:
        w.data(d, 0, size)
    for child, parent, cs in ((mid, base, 4 * KiB), (top, mid, 64 * KiB)):
        diskimg.create(child, "qcow2", size, backing_file=parent.name, backing_fmt="qcow2",
                       options={"compat": compat, "cluster_size": cs})
    with diskimg.open(mid, "r+") as d:
        w.data(d, 5000, 3)
        w.data(d, 1 * MiB + 1, 200 * KiB)
    with diskimg.open(top, "r+") as d:
        w.data(d, 1 * MiB + 100 * KiB, 7)
        w.data(d, 3 * MiB - 1, 2)
        if compat == "0.10":
            w.zero(d, 2 * MiB + 3, 70 * KiB)
            w.zero(d, 3 * MiB + 64 * KiB, 64 * KiB, may_unmap=True)
    f = pyqcow.file()
    f.open(str(top))
    try:
        assert f.get_backing_filename() == "mid.qcow2"
    finally:
        f.close()
    _assert_same(top, w.model, chain=(mid, base))


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_legacy_aes(tmp_path: Path, compat: str) -> None:
    size = 2 * MiB
    img = tmp_path / "a.qcow2"
    diskimg.create(img, "qcow2", size, options={"compat": compat, "encrypt.format": "aes",
                                                "encrypt.key-secret": "s0"}, secrets=SECRETS)
    w = Writer(size, seed=5)
    with diskimg.open(img, "r+", **OPEN_AES) as d:
        w.data(d, 333, 70000)                      # IV is the guest sector: unaligned start
        w.data(d, 1 * MiB, 5 * KiB)
        w.data(d, size - 512, 512)
        w.zero(d, 64 * KiB, 64 * KiB)
    _assert_same(img, w.model, **OPEN_AES)


@pytest.mark.qemu
@pytest.mark.parametrize(("compat", "cluster_size", "compress"), [
    ("0.10", "64k", True), ("0.10", "4k", False), ("1.1", "64k", False), ("1.1", "2M", False)])
def test_qemu_made_image_reads_identically(tmp_path: Path, compat: str, cluster_size: str,
                                           compress: bool) -> None:
    """The reverse sanity check: both readers agree with qemu-img on qemu's own images."""
    rng = random.Random(13)
    raw = tmp_path / "s.raw"
    src = bytearray(6 * MiB)
    src[100:300000] = rng.randbytes(299900)
    src[4 * MiB : 5 * MiB] = (rng.randbytes(4000) * 300)[: 1 * MiB]
    raw.write_bytes(src)
    img = tmp_path / "q.qcow2"
    QEMU.img("convert", *(["-c"] if compress else []), "-O", "qcow2", "-o",
             f"compat={compat},cluster_size={cluster_size}", raw, img)
    cmds = ["write -P 0x11 5000 70000", "write -z 4M 64k", "discard 4352k 64k",
            "write -z -u 128k 64k", "write -P 0x22 5M 1"]
    if compress:
        cmds.append("write -c -P 0x33 1M 64k")
    assert "fail" not in QEMU.io(img, *cmds).stdout.lower()
    _assert_same(img, QEMU.raw_bytes(img))
