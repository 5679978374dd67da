"""``diskimg nbd`` against real NBD peers: qemu-img, qemu-io, nbdinfo, nbdcopy and
python3-libnbd as clients, and qemu-nbd serving the same image as the oracle.  Every
test compares bytes (every byte of the export or of the image afterwards, with qemu-img
reading it), or the peers' whole answers against qemu-nbd's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemukit import Qemu

from tests.nbd.nbdtestlib import Serve, needs_nbd_tools, uri

pytestmark = [pytest.mark.qemu, needs_nbd_tools]

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def chain(tmp_path: Path, qemu: Qemu) -> tuple[Path, Path]:
    """base.qcow2 (data, an allocated zero range, bitmap b0 dirty at 8 MiB) under
    top.qcow2 (its own data, a zeroed range over base data, bitmap b1)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", base, str(SIZE))
    qemu.io(base, "write -P 0x11 0 1M", "write -z 2M 1M", "write -P 0x12 5M 300k")
    qemu.img("bitmap", "--add", base, "b0")
    qemu.io(base, "write -P 0x22 8M 64k", "write -P 0x23 20M 1M")
    qemu.img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu.img("bitmap", "--add", top, "b1")
    qemu.io(top, "write -P 0x33 9M 64k", "write -z 0 64k", "write -P 0x34 31M 1M")
    return base, top


def _nbdinfo(qemu: Qemu, *args: str) -> Any:
    return json.loads(qemu.run(["nbdinfo", "--json", *args]).stdout)


def _map_text(qemu: Qemu, ctx: str | None, u: str) -> str:
    return str(qemu.run(["nbdinfo", f"--map={ctx}" if ctx else "--map", u]).stdout)


@pytest.mark.parametrize("which,args", [
    ("base", []), ("top", ["-A"]), ("base", ["-B", "b0", "-A"]), ("top", ["-B", "b1"])],
    ids=["plain", "depth", "bitmap-depth", "chain-bitmap"])
def test_maps_equal_qemu_nbd(chain: tuple[Path, Path], qemu: Qemu, diskimg_nbd: Serve,
                             qemu_nbd: Serve, which: str, args: list[str]) -> None:
    img = chain[0] if which == "base" else chain[1]
    contexts: list[str | None] = [None]
    if "-A" in args:
        contexts.append("qemu:allocation-depth")
    if "-B" in args:
        contexts.append(f"qemu:dirty-bitmap:{args[args.index('-B') + 1]}")
    answers = []
    for serve in (diskimg_nbd, qemu_nbd):
        with serve(img, "-r", *args) as sock:
            u = uri(sock)
            listing = _nbdinfo(qemu, "--list", u)
            for e in listing["exports"]:
                del e["uri"]
            answers.append((qemu.map(u), [_map_text(qemu, c, u) for c in contexts],
                            listing))
    ours, theirs = answers
    assert ours[0] == theirs[0]           # qemu-img map --output=json of the export
    assert ours[1] == theirs[1]           # nbdinfo --map of every context
    assert ours[2] == theirs[2]           # nbdinfo --list --json: contexts, flags, sizes
    assert ours[2]["exports"][0]["contexts"][1:] == contexts[1:]
    assert any(line.split()[2] == "1" for line in ours[1][-1].splitlines()) or not \
        ("-B" in args or "-A" in args)  # the context has something to say


@pytest.mark.parametrize("args", [[], ["-e", "2", "-D", "a disk", "-x", "vol"]],
                         ids=["default", "shared-named"])
def test_nbdinfo_json_equals_qemu_nbd_writable(tmp_path: Path, qemu: Qemu,
                                               diskimg_nbd: Serve, qemu_nbd: Serve,
                                               args: list[str]) -> None:
    img = tmp_path / "w.qcow2"
    qemu.img("create", "-f", "qcow2", img, "16M")
    qemu.io(img, "write -P 0x41 0 1M")
    name = args[args.index("-x") + 1] if "-x" in args else ""
    got = []
    for serve in (diskimg_nbd, qemu_nbd):
        with serve(img, *args) as sock:
            got.append(_nbdinfo(qemu, uri(sock, name)))
    for g in got:
        for e in g["exports"]:
            del e["uri"]
    assert got[0] == got[1]
    e = got[0]["exports"][0]
    assert e["export-size"] == 16 * MiB and not e["is_read_only"] and e["can_zero"]
    assert e["can_multi_conn"] == ("-e" in args)


def test_qemu_img_convert_from_and_to_the_export(chain: tuple[Path, Path], tmp_path: Path,
                                                 qemu: Qemu, diskimg_nbd: Serve) -> None:
    _, top = chain
    want = qemu.raw_bytes(top)
    out = tmp_path / "out.qcow2"
    with diskimg_nbd(top, "-r") as sock:
        qemu.img("convert", "-O", "qcow2", uri(sock), out)
    assert qemu.raw_bytes(out) == want
    assert qemu.compare(top, out) == 0
    # and into a writable export of an empty qcow2
    target = tmp_path / "target.qcow2"
    qemu.img("create", "-f", "qcow2", target, str(SIZE))
    with diskimg_nbd(target) as sock:
        qemu.img("convert", "-n", "-O", "raw", top, uri(sock))
    assert qemu.raw_bytes(target) == want
    qemu.check_clean(target)


def test_qemu_io_write_then_read_back(tmp_path: Path, qemu: Qemu, diskimg_nbd: Serve) -> None:
    img = tmp_path / "io.qcow2"
    qemu.img("create", "-f", "qcow2", img, "8M")
    qemu.io(img, "write -P 0x61 0 2M")
    before = qemu.raw_bytes(img)
    with diskimg_nbd(img) as sock:
        u = uri(sock)
        qemu.io(u, "write -P 0x5a 1M 64k", "write -z 3M 1M", "write -P 0x5b 7M 4097",
                "read -P 0x5a 1M 64k", "read -P 0 3M 1M", "read -P 0x5b 7M 4097",
                "read -P 0x61 0 1M", "flush", fmt="raw")
        # a write with FUA, and a zero write that must not punch a hole (NO_HOLE)
        qemu.io(u, "write -f -P 0x5c 5M 512", "write -z -u 6M 64k", "read -P 0x5c 5M 512",
                fmt="raw")
    want = bytearray(before)
    want[MiB:MiB + 65536] = b"\x5a" * 65536
    want[3 * MiB:4 * MiB] = bytes(MiB)
    want[7 * MiB:7 * MiB + 4097] = b"\x5b" * 4097
    want[5 * MiB:5 * MiB + 512] = b"\x5c" * 512
    want[6 * MiB:6 * MiB + 65536] = bytes(65536)
    assert qemu.raw_bytes(img) == bytes(want)
    qemu.check_clean(img)


def test_nbdcopy_both_ways(chain: tuple[Path, Path], tmp_path: Path, qemu: Qemu,
                           diskimg_nbd: Serve) -> None:
    _, top = chain
    want = qemu.raw_bytes(top)
    out = tmp_path / "out.raw"
    with diskimg_nbd(top, "-r", "-e", "4") as sock:      # multi-conn: nbdcopy uses 4
        qemu.run(["nbdcopy", uri(sock), str(out)])
    assert out.read_bytes() == want
    src = tmp_path / "src.raw"
    src.write_bytes(want)
    target = tmp_path / "t.qcow2"
    qemu.img("create", "-f", "qcow2", target, str(SIZE))
    with diskimg_nbd(target, "-e", "4") as sock:
        qemu.run(["nbdcopy", str(src), uri(sock)])
    assert qemu.raw_bytes(target) == want
    qemu.check_clean(target)


LIBNBD_SCRIPT = r"""
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
out = {"size": h.get_size(), "structured": h.get_structured_replies_negotiated(),
       "meta": h.can_meta_context("base:allocation")}
h.pwrite(b"\xa5" * 8192, 4096)
h.pwrite(b"\xa6" * 512, 100000, nbd.CMD_FLAG_FUA)
h.zero(65536, 1 << 20)          # (count, offset): 64 KiB at 1 MiB
h.flush()
out["read"] = h.pread(8192, 4096).hex()
out["read2"] = h.pread(512, 100000).hex()
ext = []
def cb(metacontext, offset, entries, err):
    ext.append((metacontext, offset, list(entries)))
h.block_status(2 << 20, 2 << 20, cb)
out["extents"] = ext
try:
    h.pread(512, h.get_size())
except nbd.Error as e:
    out["past_end_errno"] = e.errno
h.shutdown()
print(json.dumps(out))
"""


@pytest.mark.skipif(subprocess.run(["/usr/bin/python3", "-c", "import nbd"],
                                   capture_output=True).returncode != 0,
                    reason="python3-libnbd absent")
def test_python3_libnbd(tmp_path: Path, qemu: Qemu, diskimg_nbd: Serve) -> None:
    img = tmp_path / "l.qcow2"
    qemu.img("create", "-f", "qcow2", img, "4M")
    qemu.io(img, "write -P 0x77 0 2M")
    before = qemu.raw_bytes(img)
    with diskimg_nbd(img) as sock:
        res = subprocess.run(["/usr/bin/python3", "-c", LIBNBD_SCRIPT, uri(sock)],
                             capture_output=True, text=True, timeout=60, env={})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["size"] == 4 * MiB and out["structured"] and out["meta"]
    assert bytes.fromhex(out["read"]) == b"\xa5" * 8192
    assert bytes.fromhex(out["read2"]) == b"\xa6" * 512
    # 2M..4M was never written: one hole+zero extent (base:allocation flags 3)
    assert out["extents"] == [["base:allocation", 2 * MiB, [2 * MiB, 3]]]
    assert out["past_end_errno"] in (22, "EINVAL")
    want = bytearray(before)
    want[MiB:MiB + 65536] = bytes(65536)
    want[4096:4096 + 8192] = b"\xa5" * 8192
    want[100000:100512] = b"\xa6" * 512
    assert qemu.raw_bytes(img) == bytes(want)


def test_not_persistent_exits_after_the_last_client_and_unlocks(
        tmp_path: Path, qemu: Qemu, sockdir: Path) -> None:
    img = tmp_path / "n.qcow2"
    qemu.img("create", "-f", "qcow2", img, "1M")
    sock = str(sockdir / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "diskimg", "nbd", "-k", sock, str(img)],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        # the lock is held while serving: qemu-io cannot open the image for writing
        r = qemu.io(img, "write 0 512", ok=None)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr)
        qemu.io(uri(sock), "write -P 0x99 0 512", fmt="raw")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not os.path.exists(sock)
    qemu.io(img, "read -P 0x99 0 512", "write 512 512")   # unlocked, data there


def test_fork_returns_once_listening(tmp_path: Path, qemu: Qemu, sockdir: Path) -> None:
    img = tmp_path / "f.qcow2"
    qemu.img("create", "-f", "qcow2", img, "1M")
    qemu.io(img, "write -P 0x42 0 4k")
    sock, pidfile = str(sockdir / "f.sock"), tmp_path / "pid"
    res = subprocess.run([sys.executable, "-m", "diskimg", "nbd", "--fork", "-t", "-r",
                          "--pid-file", str(pidfile), "-k", sock, str(img)],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    pid = int(pidfile.read_text())
    try:
        out = tmp_path / "out.raw"
        qemu.run(["nbdcopy", uri(sock), str(out)])     # no wait: it listens already
        assert out.read_bytes() == qemu.raw_bytes(img)
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(500):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
    assert not pidfile.exists() and not os.path.exists(sock)
    # an image that cannot open: the parent reports the failure, exit 1
    bad = subprocess.run([sys.executable, "-m", "diskimg", "nbd", "--fork", "-k",
                          str(sockdir / "g.sock"), str(tmp_path / "missing.qcow2")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "missing.qcow2" in bad.stderr


def test_encrypted_image_with_object_and_image_opts(tmp_path: Path, qemu: Qemu,
                                                    diskimg_nbd: Serve,
                                                    qemu_nbd: Serve) -> None:
    """--object secret and --image-opts, as qemu-nbd takes them: the export is the
    decrypted disk, with qemu-nbd's 512-byte minimum block size."""
    import diskimg

    img = tmp_path / "enc.qcow2"
    # made by diskimg: qemu-img's LUKS create times PBKDF2 and is slow on a loaded host
    diskimg.create(img, "qcow2", 4 * MiB, secrets={"s0": b"hunter2"},
                   options={"encrypt.format": "luks", "encrypt.key-secret": "s0",
                            "encrypt.iter-time": 10})
    want = bytearray(4 * MiB)
    want[:MiB] = b"\x71" * MiB
    want[3 * MiB:3 * MiB + 4097] = b"\x72" * 4097
    with diskimg.open(img, "r+", secrets={"s0": b"hunter2"},
                      options={"encrypt.key-secret": "s0"}) as dev:
        dev.write(0, want[:MiB])
        dev.write(3 * MiB, want[3 * MiB:3 * MiB + 4097])
    obj = "secret,id=s0,data=hunter2"
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=s0"
    got = []
    for serve in (diskimg_nbd, qemu_nbd):
        with serve(opts, "-r", "--object", obj, "--image-opts", fmt=None) as sock:
            got.append((_nbdinfo(qemu, uri(sock)), _map_text(qemu, None, uri(sock))))
            out = tmp_path / "out.raw"
            qemu.run(["nbdcopy", uri(sock), str(out)])
            assert out.read_bytes() == bytes(want)
    for info, _ in got:
        del info["exports"][0]["uri"]
    assert got[0] == got[1]
    assert got[0][0]["exports"][0]["block_size_minimum"] == 512
