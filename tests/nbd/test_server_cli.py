"""``diskimg nbd``'s command line: refusals (which change nothing and release the image),
TCP listening (127.0.0.1 by default), ``--discard``, and the accepted-but-unused
``--cache``/``--aio``."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemukit import Qemu

from diskimg.nbd.server import listen_tcp
from tests.nbd.nbdtestlib import Serve, needs_nbd_tools, reap, uri

MiB = 1 << 20


@pytest.mark.qemu
def test_refusals_change_nothing_and_unlock(tmp_path: Path, qemu: Qemu, sockdir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal comes before the server listens, so the CLI runs in-process."""
    from diskimg.cli.main import main

    img = tmp_path / "r.qcow2"
    qemu.img("create", "-f", "qcow2", img, "1M")
    qemu.io(img, "write -P 0x5e 0 64k")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    sock = str(sockdir / "r.sock")
    cases = [
        (["-B", "nope", "-k", sock, str(img)], "Bitmap 'nope' is not found"),
        (["-e", "x", str(img)], "Invalid shared device number 'x'"),
        (["-e", "-1", str(img)], "Invalid shared device number '-1'"),
        (["--discard=foo", str(img)], "Invalid discard mode `foo'"),
        (["--cache=bogus", str(img)], "Invalid cache mode 'bogus'"),
        (["--aio=bogus", str(img)], "Invalid aio mode 'bogus'"),
        (["-U", str(img)], "--share requires read-only mode"),
        (["--tls-creds", str(tmp_path / "none"), str(img)],
         "No TLS credentials with id"),
        (["-p", "99999", str(img)], "Invalid port number '99999'"),
        ([str(img), str(img)], "Expecting one image file name"),
        (["-k", sock, str(tmp_path / "missing.qcow2")], "missing.qcow2"),
    ]
    for args, msg in cases:
        code = main(["nbd", *args])
        err = capsys.readouterr().err
        assert code == 1 and msg in err, (args, err)
        assert not Path(sock).exists()
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    qemu.io(img, "read -P 0x5e 0 64k", "write 64k 512")   # not locked any more


@pytest.mark.qemu
def test_a_bitmap_name_that_is_not_utf8_is_refused_before_listening(
        tmp_path: Path, qemu: Qemu, sockdir: Path) -> None:
    """qemu-img stores any bytes as a bitmap name; NBD context names are UTF-8, so ``-B``
    of such a bitmap is refused by name (it used to be "not found"), changing nothing."""
    img = tmp_path / "u.qcow2"
    qemu.img("create", "-f", "qcow2", img, "1M")
    odd = os.fsdecode(b"a\xffb")  # what the command line gives for these bytes
    qemu.img("bitmap", "--add", img, odd)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    sock = sockdir / "u.sock"
    res = subprocess.run([sys.executable, "-m", "diskimg", "nbd", "-B", odd, "-k", sock, img],
                         capture_output=True, timeout=60, check=False)
    assert res.returncode == 1
    assert b"Bitmap 'a\xffb' cannot be exported: its name is not UTF-8" in res.stderr
    assert not sock.exists()
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


@pytest.mark.qemu
def test_shared_0_serves_any_number_of_clients_as_qemu_nbd(
        tmp_path: Path, qemu: Qemu, diskimg_nbd: Serve, qemu_nbd: Serve) -> None:
    """``-e 0``: no limit on clients at once, and NBD_FLAG_CAN_MULTI_CONN (qemu-nbd 7.2);
    every client reads the image's bytes."""
    from diskimg.nbd import protocol as p
    from diskimg.nbd.client import NbdClient

    img = tmp_path / "e.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    qemu.io(img, "write -P 0x6b 4k 8k")
    want = qemu.raw_bytes(img)
    for serve in (diskimg_nbd, qemu_nbd):
        with serve(img, "-r", "-e", "0") as sock:
            clients = [NbdClient(uri(sock), timeout=10) for _ in range(6)]
            try:
                for c in clients:
                    assert c.flags & p.NBD_FLAG_CAN_MULTI_CONN
                    buf = bytearray(len(want))
                    c.read_into(0, memoryview(buf))
                    assert buf == want
            finally:
                for c in clients:
                    c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_default_address_is_loopback() -> None:
    listeners = listen_tcp(port=0)
    try:
        assert [s.getsockname()[0] for s in listeners] == ["127.0.0.1"]
    finally:
        for s in listeners:
            s.close()


@pytest.mark.qemu
@needs_nbd_tools
def test_tcp_with_bind_port_cache_aio(tmp_path: Path, qemu: Qemu) -> None:
    img = tmp_path / "t.raw"
    img.write_bytes(bytes(range(256)) * 4096)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diskimg", "nbd", "-f", "raw", "-r",
                             "-b", "127.0.0.1", "-p", str(port), "--cache=none",
                             "--aio=native", "-x", "d", str(img)],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        # that probe was the server's one client: without -t it exits after it, as
        # qemu-nbd does; so start over for the real client
        assert proc.wait(timeout=20) == 0
        proc = subprocess.Popen([sys.executable, "-m", "diskimg", "nbd", "-f", "raw", "-r",
                                 "-b", "127.0.0.1", "-p", str(port), "-x", "d", str(img)],
                                stderr=subprocess.PIPE)
        out = tmp_path / "o.raw"
        for _ in range(500):
            r = qemu.run(["nbdcopy", f"nbd://127.0.0.1:{port}/d", str(out)], ok=None)
            if r.returncode == 0:
                break
            time.sleep(0.05)
        assert out.read_bytes() == img.read_bytes()
        assert proc.wait(timeout=20) == 0
    finally:
        reap(proc)


@pytest.mark.qemu
@needs_nbd_tools
@pytest.mark.parametrize("mode", ["ignore", "unmap"])
def test_discard_modes(tmp_path: Path, qemu: Qemu, inproc_nbd: Any, mode: str) -> None:
    img = tmp_path / "d.qcow2"
    qemu.img("create", "-f", "qcow2", img, "4M")
    qemu.io(img, "write -P 0x6d 0 4M")
    before = qemu.raw_bytes(img)
    served = inproc_nbd(img, "qcow2", discard=mode)    # what --discard=MODE builds
    qemu.io(uri(served.sock), "discard 1M 2M", fmt="raw")
    served.stop()
    data = qemu.raw_bytes(img)
    if mode == "ignore":       # TRIM accepted, nothing changed
        assert data == before
        assert all(e["data"] for e in qemu.map(img))
    else:                      # the clusters are gone and read as zeros
        assert data == before[:MiB] + bytes(2 * MiB) + before[3 * MiB:]
        assert [(e["start"], e["length"], e["data"]) for e in qemu.map(img)] == [
            (0, MiB, True), (MiB, 2 * MiB, False), (3 * MiB, MiB, True)]
    qemu.check_clean(img)
