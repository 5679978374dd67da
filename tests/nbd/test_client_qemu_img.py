"""diskimg commands on NBD exports as qemu-img 7.2 runs them: ``info`` (no allocated size,
no dirty flag for raw), writing onto an export without ``-n`` and qemu's legacy
``nbd:HOST:PORT`` / ``nbd:unix:PATH`` file names.  qemu-img on the same export is the
oracle; every test compares output text or bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemukit import Qemu

from tests.nbd.clientkit import cli, qemu_nbd_tcp
from tests.nbd.nbdtestlib import Serve, uri

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path, qemu: Qemu) -> Path:
    img = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "4M")
    qemu.io(img, "write -P 0x5a 0 1M", "write -P 0x11 3M 4096")
    return img


def _same_info(qemu: Qemu, name: str, *extra: str) -> None:
    for out in ("human", "json"):
        ours = cli("info", f"--output={out}", *extra, name).stdout
        theirs = qemu.img("info", f"--output={out}", *extra, name).stdout
        assert ours == theirs, (name, out)


def test_info_of_an_export_equals_qemu_img(image: Path, tmp_path: Path, qemu: Qemu,
                                           qemu_nbd: Serve) -> None:
    """raw over an export: ``disk size: unavailable``, no ``actual-size`` nor
    ``dirty-flag``; a qcow2 file served raw: its dirty flag, no ``actual-size``."""
    with qemu_nbd(image, "-r") as sock:
        _same_info(qemu, uri(sock))
        assert "disk size: unavailable" in cli("info", uri(sock)).stdout
    with qemu_nbd(image, "-r", fmt="raw") as sock:
        _same_info(qemu, uri(sock))
        _same_info(qemu, uri(sock), "-f", "qcow2")
    with qemu_nbd_tcp(image, "-r", "-x", "disk one") as url:
        _same_info(qemu, url + "disk%20one")
