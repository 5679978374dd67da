r"""vmdk cross-read with libvmdk (libyal's C reader, ``pyvmdk`` from libvmdk-python, which
follows VMware's published layout rather than QEMU's code): every subformat diskimg writes,
written through diskimg's block-device API or by ``convert``, must read the same guest bytes
through libvmdk; and on qemu-img's own vmdks both readers must agree with qemu-img.

Tested (libvmdk-python 20260714): monolithicSparse, monolithicFlat, twoGbMaxExtentSparse and
twoGbMaxExtentFlat (two extents, split at 2 GiB, opened with ``open_extent_data_files``),
streamOptimized (written through the device and by the one-pass ``convert``), images created
with ``zeroed_grain=on``, and a three-image parent chain (``set_parent``) whose CID links
libvmdk reports as diskimg wrote them.

Not tested, because libvmdk reads it WRONG: grain-table entries of 1 ("zeroed grain", used
when the header's zeroed-grain flag is set — qemu-img's and diskimg's ``zeroed_grain=on``
writing zeros over a whole grain).  libvmdk reads such a grain from sector 1 of the file, so
it returns the embedded descriptor text instead of zeros (and fails outright with a parent)::

    qemu-img create -q -f vmdk -o zeroed_grain=on z.vmdk 1M
    qemu-io -f vmdk -c 'write -P 0xaa 0 1M' -c 'write -z 0 64k' z.vmdk
    python -c "import pyvmdk; h = pyvmdk.handle(); h.open('z.vmdk'); \
      h.open_extent_data_files(); print(h.read_buffer_at_offset(4, 0))"   # b'# Di', not zeros

So the ``zeroed_grain=on`` images below are zeroed only in part of a grain (stored as data).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg

pyvmdk = pytest.importorskip("pyvmdk")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]


@contextmanager
def libvmdk(chain: list[Path]) -> Iterator[Any]:
    """An open pyvmdk handle for ``chain[0]``, its extent files opened and ``chain[1:]``
    (its parents, top first) attached with ``set_parent``."""
    with ExitStack() as stack:
        handles = []
        for p in chain:
            h = pyvmdk.handle()
            h.open(str(p))
            stack.callback(h.close)
            h.open_extent_data_files()
            handles.append(h)
        for child, parent in pairwise(handles):
            child.set_parent(parent)
        yield handles[0]


class Model:
    """The expected guest bytes in a few windows of a (possibly 2 GiB) disk; the rest of the
    disk is zeros.  ``write``/``zero`` go through a diskimg device and into the window."""

    def __init__(self, windows: list[tuple[int, int]], seed: int) -> None:
        self.windows = [(lo, bytearray(hi - lo)) for lo, hi in windows]
        self.rng = random.Random(seed)

    def _put(self, off: int, b: bytes) -> None:
        for lo, buf in self.windows:
            if lo <= off and off + len(b) <= lo + len(buf):
                buf[off - lo : off - lo + len(b)] = b
                return
        raise AssertionError(f"write at {off:#x} outside the model's windows")

    def write(self, dev: Any, off: int, n: int) -> None:
        b = self.rng.randbytes(n)
        dev.write(off, b)
        self._put(off, b)

    def zero(self, dev: Any, off: int, n: int) -> None:
        dev.write_zeroes(off, n)
        self._put(off, bytes(n))

    def check(self, path: Path, chain: tuple[Path, ...] = (), probes: tuple[int, ...] = ()
              ) -> None:
        """diskimg and libvmdk both read the model in every window and zeros at ``probes``."""
        with diskimg.open(path) as d, libvmdk([path, *chain]) as h:
            assert h.get_media_size() == d.size
            for lo, buf in self.windows:
                assert d.read(lo, len(buf)) == buf, f"diskimg differs in window {lo:#x}"
                theirs = h.read_buffer_at_offset(len(buf), lo)
                if theirs != buf:
                    bad = next(i for i in range(len(buf)) if theirs[i] != buf[i])
                    pytest.fail(f"libvmdk differs first at guest offset {lo + bad:#x}")
            for off in probes:
                assert d.read(off, 64 * KiB) == bytes(64 * KiB)
                assert h.read_buffer_at_offset(64 * KiB, off) == bytes(64 * KiB)


@pytest.mark.parametrize(("sub", "zeroed_grain"), [
    *((s, False) for s in SUBFORMATS), *((s, True) for s in SUBFORMATS if "Sparse" in s)])
def test_diskimg_written_vmdk_reads_identically(tmp_path: Path, sub: str,
                                                zeroed_grain: bool) -> None:
    two_gb = sub.startswith("twoGb")
    size = 2 * GiB + 3 * MiB if two_gb else 6 * MiB
    base = 2 * GiB - 1 * MiB if two_gb else 0      # writes straddle the extent boundary
    img = tmp_path / "d.vmdk"
    diskimg.create(img, "vmdk", size, options={"subformat": sub, "zeroed_grain": zeroed_grain})
    m = Model([(0, 1 * MiB), (base, size)] if two_gb else [(0, size)], seed=len(sub))
    with diskimg.open(img, "r+") as d:
        if sub == "streamOptimized":               # grains are appended; each written once
            m.write(d, 1000, 70000)
            m.write(d, base + 1 * MiB + 5, 1 * MiB)
            m.write(d, size - 10, 10)
        else:
            m.write(d, 1000, 70000)
            m.write(d, base + 4096, 2 * MiB)
            m.write(d, base + 1 * MiB + 100, 3)    # overwrite inside an allocated grain
            m.zero(d, base + 1 * MiB + 1000, 5000)  # part of a grain (see module docstring)
            m.write(d, size - 100, 100)
            m.write(d, 5, 1)
    with libvmdk([img]) as h:
        extents = [(e.filename, e.size) for e in h.extent_descriptors]
    if two_gb:
        assert [s for _, s in extents] == [2 * GiB, 3 * MiB]
        assert len({f for f, _ in extents}) == 2
    else:
        assert [s for _, s in extents] == [size]
    m.check(img, probes=(1 * GiB,) if two_gb else ())


def test_convert_to_stream_optimized(tmp_path: Path) -> None:
    """The one-pass streamOptimized writer (VMware's marker layout, footer, end-of-stream)."""
    size = 7 * MiB + 512
    rng = random.Random(17)
    src = bytearray(size)
    src[0 : 1 * MiB] = rng.randbytes(1 * MiB)
    src[5 * MiB : 5 * MiB + 500000] = b"hello" * 100000
    src[size - 412 : size - 409] = b"end"
    raw = tmp_path / "s.raw"
    raw.write_bytes(src)
    out = tmp_path / "o.vmdk"
    diskimg.convert(raw, out, "vmdk", options={"subformat": "streamOptimized",
                                               "adapter_type": "lsilogic"})
    m = Model([(0, size)], seed=0)
    m.windows[0][1][:] = src
    m.check(out)


def test_parent_chain(tmp_path: Path) -> None:
    """flat base <- sparse mid <- sparse top; partial-grain writes copy the rest of the grain
    from the parent; libvmdk sees the parentCID/parentFileNameHint links diskimg wrote."""
    size = 4 * MiB
    base, mid, top = (tmp_path / f"{n}.vmdk" for n in ("base", "mid", "top"))
    m = Model([(0, size)], seed=23)
    diskimg.create(base, "vmdk", size, options={"subformat": "monolithicFlat"})
    with diskimg.open(base, "r+") as d:
        m.write(d, 0, size)
    diskimg.create(mid, "vmdk", size, backing_file="base.vmdk", backing_fmt="vmdk")
    with diskimg.open(mid, "r+") as d:             # (a write changes mid's CID: write first)
        m.write(d, 5000, 3)
        m.write(d, 1 * MiB + 1, 200 * KiB)
    diskimg.create(top, "vmdk", size, backing_file="mid.vmdk", backing_fmt="vmdk")
    with diskimg.open(top, "r+") as d:
        m.write(d, 1 * MiB + 100 * KiB, 7)
        m.zero(d, 2 * MiB + 3, 70 * KiB)
        m.zero(d, 3 * MiB, 128 * KiB)
    with libvmdk([top]) as ht, libvmdk([mid]) as hm, libvmdk([base]) as hb:
        assert ht.get_parent_filename() == "mid.vmdk"
        assert hm.get_parent_filename() == "base.vmdk"
        assert ht.get_parent_content_identifier() == hm.get_content_identifier()
        assert hm.get_parent_content_identifier() == hb.get_content_identifier()
    m.check(top, chain=(mid, base))


@pytest.mark.qemu
@pytest.mark.parametrize("sub", SUBFORMATS)
def test_qemu_made_vmdk_reads_identically(tmp_path: Path, sub: str) -> None:
    """The reverse sanity check: both readers agree with qemu-img on qemu's own vmdks."""
    rng = random.Random(29)
    raw = tmp_path / "s.raw"
    src = bytearray(6 * MiB)
    src[100:300000] = rng.randbytes(299900)
    src[4 * MiB : 5 * MiB] = (rng.randbytes(4000) * 300)[: 1 * MiB]
    raw.write_bytes(src)
    img = tmp_path / "q.vmdk"
    QEMU.img("convert", "-O", "vmdk", "-o", f"subformat={sub}", raw, img)
    if sub != "streamOptimized":                   # qemu writes streamOptimized only by convert
        res = QEMU.io(img, "write -P 0x11 5000 70000", "write -P 0x22 5M 1", fmt="vmdk")
        assert "fail" not in res.stdout.lower(), res.stdout
    m = Model([(0, 6 * MiB)], seed=0)
    m.windows[0][1][:] = QEMU.raw_bytes(img)
    m.check(img)
