"""Images over any bytes (issue 18 item 1): ``diskimg.open(file_object)``.

qemu makes the images; diskimg reads them through a ``BytesIO`` (and a plain open file)
and every byte is compared with qemu-img's raw conversion of the same file, at offsets
that cross cluster boundaries, 0 and the last partial cluster.  Writes go through a
writable file object; the bytes are then written to disk for ``qemu-img check`` and
``qemu-img compare``.  Hostile images through a BytesIO end in DiskImgError.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import os
import random
import threading
from pathlib import Path

import pytest

import diskimg
from qemukit import Qemu
from diskimg.errors import BackingChainError, DiskImgError, UnsupportedFeatureError, UsageError
from diskimg.hostio.fileobj import FileObjectHost
from diskimg.policy import OpenPolicy

CS = 65536
#: not a whole number of clusters: the last cluster is partial
SIZE = 3 * CS + 5 * 512

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def _fill(qemu: Qemu, path: Path, fmt: str) -> None:
    """Patterns at 0, across a cluster boundary and in the last partial cluster."""
    qemu.io(path, "write -P 0x11 0 4096", f"write -P 0x22 {CS - 1024} 3072",
            f"write -P 0x33 {SIZE - 1536} 1536", "write -z 8192 4096", fmt=fmt)


def _image(qemu, tmp_path: Path, fmt: str, opts: str = "") -> Path:
    p = tmp_path / f"img.{fmt}"
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    qemu.img(*args, p, SIZE)
    _fill(qemu, p, fmt)
    return p


OFFSETS = [0, 1, 511, 4095, 4096, CS - 1025, CS - 1, CS, CS + 1, 2 * CS - 7,
           SIZE - 1536, SIZE - 513, SIZE - 1]
CASES = [("qcow2", ""), ("qcow2", "cluster_size=4096"), ("raw", ""),
         ("vmdk", "subformat=monolithicSparse")]


@pytest.mark.qemu
@pytest.mark.parametrize(("fmt", "opts"), CASES)
def test_bytesio_reads_every_byte_as_qemu(qemu: Qemu, tmp_path: Path, fmt: str,
                                          opts: str) -> None:
    p = _image(qemu, tmp_path, fmt, opts)
    want = qemu.raw_bytes(p, fmt)
    assert len(want) == SIZE
    data = p.read_bytes()
    with diskimg.open(io.BytesIO(data)) as img:       # probed, as a path would be
        assert img.format == fmt and img.size == SIZE and img.read_only
        assert img.read(0, SIZE) == want
        for off in OFFSETS:
            for n in (1, 512, 4097, SIZE - off):
                n = min(n, SIZE - off)
                assert img.read(off, n) == want[off:off + n], (off, n)
        got = [(e.start, e.length, e.data, e.zero) for e in img.map()]
        if fmt == "raw":                              # a file object has no holes
            assert got == [(0, SIZE, True, False)]
        else:                                         # map for map with the file on disk
            with diskimg.open(p, format=fmt) as local:
                assert got == [(e.start, e.length, e.data, e.zero) for e in local.map()]
    assert p.read_bytes() == data


@pytest.mark.qemu
def test_stream_optimized_vmdk_and_compressed_qcow2(qemu: Qemu, tmp_path: Path) -> None:
    src = _image(qemu, tmp_path, "raw")
    want = src.read_bytes()
    for fmt, extra in (("vmdk", ["-o", "subformat=streamOptimized"]), ("qcow2", ["-c"])):
        out = tmp_path / f"c.{fmt}"
        qemu.img("convert", "-f", "raw", "-O", fmt, *extra, src, out)
        with diskimg.open(io.BytesIO(out.read_bytes()), format=fmt) as img:
            assert img.read(0, SIZE) == want
            assert img.read(SIZE - 1536, 1536) == b"\x33" * 1536


@pytest.mark.qemu
def test_open_file_object_reads_and_threads_share_it(qemu: Qemu, tmp_path: Path) -> None:
    p = _image(qemu, tmp_path, "qcow2")
    want = qemu.raw_bytes(p, "qcow2")
    errors: list[BaseException] = []
    with open(p, "rb") as f, diskimg.open(f) as img:
        assert img.filename == str(p)                 # the file object's own name

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(150):
                    off = rnd.randrange(SIZE)
                    n = rnd.randrange(1, min(3 * 4096, SIZE - off) + 1)
                    assert img.read(off, n) == want[off:off + n]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


@pytest.mark.qemu
@pytest.mark.parametrize(("fmt", "opts"), [c for c in CASES if c[1] != "cluster_size=4096"])
def test_writes_through_a_writable_file_object(qemu: Qemu, tmp_path: Path, fmt: str,
                                               opts: str) -> None:
    p = _image(qemu, tmp_path, fmt, opts)
    want = bytearray(qemu.raw_bytes(p, fmt))
    buf = io.BytesIO(p.read_bytes())
    writes = [(0, b"\xa5" * 700), (CS - 3, os.urandom(9000)), (SIZE - 100, b"\x5a" * 100),
              (2 * CS, bytes(4096))]
    with diskimg.open(buf, "r+", fmt) as img:
        for off, d in writes:
            img.write(off, d)
            want[off:off + len(d)] = d
        img.write_zeroes(3 * 4096, 4096)
        want[3 * 4096:4 * 4096] = bytes(4096)
        assert img.read(0, SIZE) == want
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(buf.getvalue())
    if fmt != "raw":
        qemu.check_clean(out)
    ref = tmp_path / "want.raw"
    ref.write_bytes(want)
    assert qemu.compare(out, ref) == 0              # every guest byte, read by qemu


@pytest.mark.qemu
def test_writes_through_an_open_file(qemu: Qemu, tmp_path: Path) -> None:
    p = _image(qemu, tmp_path, "qcow2")
    want = bytearray(qemu.raw_bytes(p, "qcow2"))
    with open(p, "r+b") as f, diskimg.open(f, "r+") as img:
        img.write(CS + 5, b"hello" * 1000)
        want[CS + 5:CS + 5005] = b"hello" * 1000
    qemu.check_clean(p)
    assert qemu.raw_bytes(p, "qcow2") == bytes(want)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.qemu
def test_read_only_object_refuses_r_plus_and_writes(qemu: Qemu, tmp_path: Path) -> None:
    p = _image(qemu, tmp_path, "qcow2")
    before = _sha(p)
    with open(p, "rb") as f:
        with pytest.raises(UsageError, match="not writable"):
            diskimg.open(f, "r+")
        with diskimg.open(f) as img, pytest.raises(UsageError, match="read-only"):
            img.write(0, b"x")
    buf = io.BytesIO(p.read_bytes())
    with diskimg.open(buf) as img, pytest.raises(UsageError, match="read-only"):
        img.write(0, b"x")                            # a writable object opened "r"
    assert buf.getvalue() == p.read_bytes() and _sha(p) == before


@pytest.mark.qemu
def test_backing_file_only_as_far_as_the_policy_allows(qemu: Qemu, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    base = _image(qemu, tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, cwd=tmp_path)
    qemu.io(top, f"write -P 0x77 {CS} 512")
    want = qemu.raw_bytes(top, "qcow2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackingChainError, match="'img.qcow2' named by '<BytesIO>'.*"
                       "allow_local_backing"):
        diskimg.open(io.BytesIO(top.read_bytes()))
    with diskimg.open(io.BytesIO(top.read_bytes()), backing=False) as img:
        assert img.read(CS, 512) == b"\x77" * 512 and img.read(0, 4) == bytes(4)
    pol = OpenPolicy(allow_local_backing=True)
    with diskimg.open(io.BytesIO(top.read_bytes()), policy=pol) as img:
        assert img.read(0, SIZE) == want
    with open(top, "rb") as f, diskimg.open(f, policy=pol) as img:  # relative to its name
        monkeypatch.chdir("/")
        assert img.read(0, SIZE) == want


@pytest.mark.qemu
def test_data_file_and_vmdk_extents_are_refused(qemu: Qemu, tmp_path: Path) -> None:
    q = tmp_path / "d.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", q, SIZE)
    with pytest.raises(BackingChainError, match="data file"):
        diskimg.open(io.BytesIO(q.read_bytes()))
    v = tmp_path / "v.vmdk"
    qemu.img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", v, SIZE)
    with pytest.raises(UnsupportedFeatureError, match="names separate extent files"):
        diskimg.open(io.BytesIO(v.read_bytes()))


class _Failing(io.BytesIO):
    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.tell() >= CS:
            raise OSError(5, "Input/output error")
        return super().readinto(buf)


@pytest.mark.qemu
def test_errors_of_the_object_name_it_and_the_offset(qemu: Qemu, tmp_path: Path) -> None:
    p = _image(qemu, tmp_path, "raw")
    with diskimg.open(_Failing(p.read_bytes()), format="raw") as img:
        assert img.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(DiskImgError, match=r"Could not read '<_Failing>' at offset "
                           r"0x10000: .*Input/output error"):
            img.read(CS, 10)
    h = FileObjectHost(io.BytesIO(b"abc"), name="mine")
    h.close()
    with pytest.raises(DiskImgError, match="closed file 'mine'"):
        h.pread(0, 1)


def _hostile() -> list[tuple[str, bytes]]:
    """Synthetic hostile headers, then the corpus's malformed images when present."""
    import struct

    hdr = bytearray(104)
    hdr[0:4] = b"QFI\xfb"
    struct.pack_into(">IQIIQIIQQII", hdr, 4, 3, 0, 0, 16, 1 << 40, 0, 2048, 1 << 60, 0x10000,
                     1, 0)
    struct.pack_into(">QQQII", hdr, 72, 0, 0, 0, 4, 104)
    out = [("qcow2-l1-past-end", bytes(hdr)), ("qcow2-truncated", bytes(hdr[:40])),
           ("vmdk-truncated", b"KDMV\x01\0\0\0" + bytes(20)),
           ("descriptor-no-extents", b"# Disk DescriptorFile\nversion=1\n"
                                     b"createType=\"monolithicSparse\"\n# Extent description\n")]
    for name in ("qemu-iotests/afl5.img.bz2", "qemu-iotests/afl9.vmdk.bz2",
                 "qemu-iotests/iotest-version3.vmdk.bz2"):
        f = CORPUS / name
        if f.exists():
            out.append((name, bz2.decompress(f.read_bytes())))
    return out


@pytest.mark.parametrize(("name", "data"), _hostile(), ids=[n for n, _ in _hostile()])
def test_hostile_images_through_bytesio_end_in_diskimgerror(name: str, data: bytes) -> None:
    buf = io.BytesIO(data)
    try:
        with diskimg.open(buf) as img:
            for off in range(0, img.size, max(1, img.size // 64)):
                img.read(off, min(65536, img.size - off))
            list(img.map())
    except DiskImgError:
        pass                                          # the expected end: no traceback
    assert buf.getvalue() == data


def test_what_is_not_a_binary_seekable_file_object_is_refused_by_name(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello")
    r, w = os.pipe()
    with open(text) as t, open(r, "rb") as pipe:
        for obj, msg in ((t, f"'{text}' is a text file: open it in binary mode"),
                         (b"QFI\xfb", "'<bytes>' is not a binary file object"),
                         (pipe, "'<BufferedReader>' is not seekable: an image needs random "
                                "access")):
            with pytest.raises(UsageError, match=msg):
                diskimg.open(obj)  # type: ignore[arg-type]
    os.close(w)
    assert text.read_text() == "hello"
