"""diskimg's NBD client against diskimg's own server (``diskimg nbd``), with qemu-nbd
serving the same image as the oracle; TLS (``nbds+unix://``) against both servers; the
qemu metadata contexts asked for by name.  Every test compares bytes or whole answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg
from diskimg.nbd import protocol as p
from diskimg.nbd.client import NbdClient
from tests.nbd.clientkit import cli
from tests.nbd.nbdtestlib import Serve, uri

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 6 * MiB


@pytest.fixture
def image(tmp_path: Path, qemu: Qemu) -> Path:
    """A qcow2 over a backing file: data in both, zeroed clusters, unallocated ranges."""
    base, img = tmp_path / "base.qcow2", tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu.io(base, "write -P 0x41 0 1M", "write -P 0x42 4M 64k")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", img)
    qemu.io(img, "write -P 0x43 512k 1M", "write -z 4M 64k", f"write -P 0x44 {SIZE - 4096} 4096")
    return img


def test_bytes_map_and_contexts_equal_qemu_nbd(image: Path, qemu: Qemu, diskimg_nbd: Serve,
                                               qemu_nbd: Serve) -> None:
    want = qemu.raw_bytes(image)
    contexts = (p.BASE_ALLOCATION, p.QEMU_ALLOCATION_DEPTH)
    with diskimg_nbd(image, "-r", "-A") as ours, qemu_nbd(image, "-r", "-A") as theirs:
        with diskimg.open(uri(ours)) as dev:
            assert dev.read(0, SIZE) == want
        ours_map = json.loads(cli("map", "--output=json", uri(ours)).stdout)
        assert ours_map == qemu.map(uri(theirs))
        with NbdClient(uri(ours), contexts=contexts) as a, \
                NbdClient(uri(theirs), contexts=contexts) as b:
            assert set(a.contexts) == set(b.contexts) == set(contexts)
            for ctx in contexts:
                assert _walk(a, ctx) == _walk(b, ctx), ctx


def _walk(cl: NbdClient, ctx: str) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of ``ctx`` over the whole export, equal runs merged."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < cl.size:
        for n, flags in cl.block_status(pos, cl.size - pos, ctx):
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + n, flags)
            else:
                out.append((pos, n, flags))
            pos += n
    return out


def test_writes_and_convert_onto_diskimg_nbd(image: Path, tmp_path: Path, qemu: Qemu,
                                             diskimg_nbd: Serve) -> None:
    """diskimg convert -n onto diskimg nbd serving a qcow2, then writes and zeroes
    through the client: qemu-img compares the image with a model."""
    dst = tmp_path / "dst.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", dst, str(SIZE))
    qemu.io(dst, "write -P 0xee 0 6M")  # stale everywhere: zeros must be written too
    model = bytearray(qemu.raw_bytes(image))
    with diskimg_nbd(dst) as sock:
        cli("convert", "-n", "-O", "raw", str(image), uri(sock))
        with diskimg.open(uri(sock), "r+", format="raw") as dev:
            dev.write(777, b"\x99" * 100000)
            model[777:100777] = b"\x99" * 100000
            dev.write_zeroes(2 * MiB + 5, 70000, may_unmap=True)
            model[2 * MiB + 5:2 * MiB + 70005] = bytes(70000)
            dev.flush()
            assert dev.read(0, SIZE) == model
    m = tmp_path / "model.raw"
    m.write_bytes(model)
    assert qemu.compare(m, dst, "-f", "raw", "-F", "qcow2") == 0
    qemu.check_clean(dst)


def test_tls_against_diskimg_nbd_and_qemu_nbd(image: Path, creds: Path,
                                              qemu: Qemu, diskimg_nbd: Serve,
                                              qemu_nbd: Serve) -> None:
    want = qemu.raw_bytes(image)
    obj = f"tls-creds-x509,id=tls0,dir={creds},endpoint=server"
    with diskimg_nbd(image, "-r", "--tls-creds", str(creds)) as ours, \
            qemu_nbd(image, "-r", "--object", obj, "--tls-creds", "tls0") as theirs:
        for sock in (ours, theirs):
            u = f"nbds+unix:///?socket={sock}&tls-certificates={creds}"
            with diskimg.open(u) as dev:
                assert dev.read(0, SIZE) == want
            # the same server without TLS: refused by the server, nothing read
            with pytest.raises(diskimg.DiskImgError, match="TLS required"):
                diskimg.open(uri(sock))
