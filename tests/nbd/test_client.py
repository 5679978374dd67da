"""diskimg's NBD client against qemu-nbd: ``diskimg.open("nbd://...")`` and
``nbd+unix://`` read every byte of the export, map it as qemu-img maps the same URL,
write through it (qemu-img compares the image with a model afterwards), and every command
takes the URL as source or target.  Every test compares bytes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg
from diskimg.errors import BackingChainError, DiskImgError, UsageError
from diskimg.policy import OpenPolicy
from tests.nbd.clientkit import cli, qemu_nbd_tcp
from tests.nbd.nbdtestlib import Serve, uri

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 3 * MiB + 3 * 512  # the last cluster of the qcow2 is a partial one


@pytest.fixture
def image(tmp_path: Path, qemu: Qemu) -> Path:
    """A qcow2 with data at 0, a zeroed cluster, unallocated ranges and data in its
    last, partial cluster."""
    img = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu.io(img, "write -P 0x5a 0 65536", "write -P 0x11 70000 5000", "write -z 1M 64k",
            f"write -P 0xc3 {SIZE - 1536} 1536")
    return img


def test_every_byte_over_unix_and_tcp(image: Path, qemu: Qemu, qemu_nbd: Serve) -> None:
    want = qemu.raw_bytes(image)
    assert len(want) == SIZE
    with qemu_nbd(image, "-r") as sock:
        with diskimg.open(uri(sock)) as dev:
            assert (dev.format, dev.size, dev.read_only) == ("raw", SIZE, True)
            assert dev.read(0, SIZE) == want
            # offset 0, odd offsets and lengths, the last partial cluster
            for off, n in ((0, 1), (1, 4095), (69999, 5003), (SIZE - 1536, 1536),
                           (SIZE - 7, 7), (MiB - 3, 64 * KiB + 6)):
                assert dev.read(off, n) == want[off:off + n], (off, n)
    with qemu_nbd_tcp(image, "-r") as url:
        with diskimg.open(url) as dev:
            assert hashlib.sha256(dev.read(0, SIZE)).digest() == \
                hashlib.sha256(want).digest()
            assert dev.read(SIZE - 1536, 1536) == b"\xc3" * 1536


def test_map_equals_qemu_img_map_of_the_same_url(image: Path, tmp_path: Path, qemu: Qemu,
                                                 qemu_nbd: Serve) -> None:
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x77" * 8192)
        f.seek(3 * MiB + 4096)
        f.write(b"\x01" * 512)
    # allocated zeros (qemu-nbd: ZERO without HOLE) next to zero clusters (HOLE|ZERO)
    prealloc = tmp_path / "prealloc.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", prealloc, "2M")
    qemu.io(prealloc, "write -z 0 64k", "write -P 3 128k 64k")
    for path, fmt in ((image, "qcow2"), (sparse, "raw"), (prealloc, "qcow2")):
        with qemu_nbd(path, "-r", fmt=fmt) as sock:
            u = uri(sock)
            ours = json.loads(cli("map", "--output=json", u).stdout)
            theirs = qemu.map(u)
            assert ours == theirs, (path, ours, theirs)
            assert cli("map", u).stdout == qemu.img("map", u).stdout


def test_writes_through_the_client_equal_a_model(tmp_path: Path, qemu: Qemu,
                                                 qemu_nbd: Serve) -> None:
    """Unaligned writes, zeroes (allocated and not), discards and a flush through
    ``diskimg.open(url, "r+")``; qemu-img then compares the image with a model."""
    img = tmp_path / "t.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, str(2 * MiB))
    qemu.io(img, "write -P 0x33 0 2M")
    model = bytearray(b"\x33" * (2 * MiB))
    with qemu_nbd(img) as sock:
        with diskimg.open(uri(sock), "r+", format="raw") as dev:
            assert not dev.read_only
            for off, data in ((0, b"\x01" * 512), (1000, os.urandom(3000)),
                              (MiB - 1, b"\xfe" * 70000), (2 * MiB - 5, b"END!!")):
                dev.write(off, data)
                model[off:off + len(data)] = data
            dev.write_zeroes(300 * KiB, 200 * KiB + 7, may_unmap=True)
            model[300 * KiB:500 * KiB + 7] = bytes(200 * KiB + 7)
            dev.write_zeroes(1500 * KiB + 3, 10, may_unmap=False)
            model[1500 * KiB + 3:1500 * KiB + 13] = bytes(10)
            dev.discard(1600 * KiB, 64 * KiB)
            model[1600 * KiB:1664 * KiB] = bytes(64 * KiB)  # raw discard reads as zeros
            dev.flush()
            assert dev.read(0, 2 * MiB) == model
    want = tmp_path / "model.raw"
    want.write_bytes(model)
    assert qemu.compare(want, img, "-f", "raw", "-F", "qcow2") == 0
    qemu.check_clean(img)


def test_convert_from_and_to_the_export(image: Path, tmp_path: Path, qemu: Qemu,
                                        qemu_nbd: Serve) -> None:
    out = tmp_path / "out.qcow2"
    with qemu_nbd(image, "-r") as sock:
        cli("convert", "-O", "qcow2", uri(sock), str(out))
    assert qemu.compare(image, out) == 0
    assert qemu.raw_bytes(out) == qemu.raw_bytes(image)
    # onto an export (-n: the export is the target as it is)
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.write(b"\xee" * SIZE)  # stale bytes everywhere: zeros must be written too
    with qemu_nbd(target, fmt="raw") as sock:
        # qcow2 onto an export: refused before anything is written (qemu-img formats
        # it; without -n raw is written onto it as qemu-img does: test_client_qemu_img)
        r = cli("convert", "-O", "qcow2", str(image), uri(sock), ok=1)
        assert "Cannot create a qcow2 image on the NBD export" in r.stderr
        assert target.read_bytes() == b"\xee" * SIZE
        cli("convert", "-n", "-O", "raw", str(image), uri(sock))
    assert target.read_bytes() == qemu.raw_bytes(image)


def test_compare_checksum_dd_info_check_take_the_url(image: Path, tmp_path: Path,
                                                     qemu: Qemu, qemu_nbd: Serve) -> None:
    raw = tmp_path / "same.raw"
    raw.write_bytes(qemu.raw_bytes(image))
    with qemu_nbd(image, "-r") as sock:
        u = uri(sock)
        assert "Images are identical." in cli("compare", u, str(raw)).stdout
        assert cli("checksum", u).stdout.split()[0] == \
            cli("checksum", str(raw)).stdout.split()[0]
        dd_out = tmp_path / "dd.raw"
        cli("dd", f"if={u}", f"of={dd_out}", "bs=64k", "-O", "raw")
        assert dd_out.read_bytes() == raw.read_bytes()
        info = json.loads(cli("info", "--output=json", u).stdout)
        theirs = qemu.info(u)
        assert (info["format"], info["virtual-size"], info["filename"]) == \
            ("raw", SIZE, theirs["filename"])
        # raw has nothing to check: refused as qemu-img refuses it
        r = cli("check", u, ok=63)
        assert "does not support checks" in r.stderr


def test_qcow2_file_served_raw_opens_with_format_qcow2(image: Path, tmp_path: Path,
                                                       qemu: Qemu, qemu_nbd: Serve) -> None:
    """qemu-nbd -f raw serves the qcow2 file's own bytes: ``-f qcow2`` reads the image
    inside; its check is clean; a backing name inside such an image is refused."""
    want = qemu.raw_bytes(image)
    with qemu_nbd(image, "-r", fmt="raw") as sock:
        with diskimg.open(uri(sock), format="qcow2") as dev:
            assert dev.read(0, SIZE) == want
        with diskimg.open(uri(sock)) as dev:
            assert dev.format == "qcow2"  # probed too
        assert "No errors were found" in cli("check", "-f", "qcow2", uri(sock)).stdout
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", image.name, "-F", "qcow2", top)
    before = hashlib.sha256(top.read_bytes()).hexdigest()
    with qemu_nbd(top, "-r", fmt="raw") as sock:
        with pytest.raises(BackingChainError, match="NBD names are not followed"):
            diskimg.open(uri(sock), format="qcow2")
        with diskimg.open(uri(sock), format="qcow2", backing=False) as dev:
            assert dev.read(0, 4096) == bytes(4096)
    assert hashlib.sha256(top.read_bytes()).hexdigest() == before


def test_read_only_export_and_policy(image: Path, qemu_nbd: Serve) -> None:
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with qemu_nbd(image, "-r") as sock:
        with pytest.raises(UsageError, match="the NBD export is read-only"):
            diskimg.open(uri(sock), "r+")
        with pytest.raises(BackingChainError, match="untrusted open policy opens no NBD"):
            diskimg.open(uri(sock), untrusted=True)
        pol = OpenPolicy(untrusted=True, allow_nbd=True)
        with diskimg.open(uri(sock), policy=pol) as dev:
            assert dev.read(0, 2) == b"\x5a\x5a"
        with pytest.raises(DiskImgError, match="no such export"):
            diskimg.open(uri(sock, "nosuch"))
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_threads_sharing_one_connection_read_the_right_bytes(image: Path, qemu: Qemu,
                                                             qemu_nbd: Serve) -> None:
    """One device (one connection) read from 4 threads at once, 40 random ranges each
    (odd offsets and lengths), and its block status asked for meanwhile: every byte
    equals qemu's."""
    want = qemu.raw_bytes(image)
    errors: list[BaseException] = []
    with qemu_nbd(image, "-r") as sock, diskimg.open(uri(sock)) as dev:
        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(40):
                    off = rnd.randrange(SIZE)
                    n = rnd.randrange(1, min(300 * KiB, SIZE - off) + 1)
                    assert dev.read(off, n) == want[off:off + n], (off, n)
                    dev.block_status(rnd.randrange(SIZE), 64 * KiB)
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors


def test_qcow2_over_a_writable_export_cannot_grow_it(tmp_path: Path, qemu: Qemu,
                                                     qemu_nbd: Serve) -> None:
    """A qcow2 file served raw, opened r+ with -f qcow2: rewriting an allocated cluster
    works; a write that needs a new cluster past the export's end is refused (an export
    cannot grow) and leaves the image clean, the rewrite in place."""
    img = tmp_path / "w.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "8M")
    qemu.io(img, "write -P 1 0 64k")
    size = img.stat().st_size
    with qemu_nbd(img, fmt="raw") as sock:
        with diskimg.open(uri(sock), "r+", format="qcow2") as dev:
            dev.write(0, b"x" * 512)
            with pytest.raises(UsageError, match="an export cannot grow"):
                dev.write(4 * MiB, b"y" * 65536)
    assert img.stat().st_size == size
    qemu.check_clean(img)
    data = qemu.raw_bytes(img)
    assert data[:512] == b"x" * 512 and data[512:65536] == b"\x01" * (65536 - 512)
    assert data[65536:] == bytes(8 * MiB - 65536)
