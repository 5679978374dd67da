"""``--progress`` on the long volume jobs (vol-upload, vol-download, vol-clone,
vol-create-from, vol-wipe): ``convert -p``'s ``    (NN.NN/100%)\\r`` lines on stdout while
the job runs, rising, from 0.00 to 100.00, then a newline; nothing with ``-q``.  The bytes
the job moves are checked too, and the library's ``progress=`` callbacks get the same
percentages."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diskimg import api
from diskimg.cli.progress import Progress
from diskimg.pool.cli import main

MIB = 1 << 20
LINE = re.compile(r" {4}\((\d+\.\d\d)/100%\)\r")


def virsh(base: list[str], *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    rc = main([*base, *args], stdout=out, stderr=err,
              progress_line=lambda o: Progress(True, out=o))  # as `diskimg virsh` does
    assert (rc, err.getvalue()) == (0, ""), (args, out.getvalue(), err.getvalue())
    return out.getvalue()


def progress_values(out: str) -> tuple[list[float], str]:
    """The values of the progress lines at the start of ``out`` (which must be followed by
    a newline), and the rest of ``out``."""
    values = []
    pos = 0
    while m := LINE.match(out, pos):
        values.append(float(m.group(1)))
        pos = m.end()
    assert out[pos] == "\n", out
    assert values[0] == 0.0 and values[-1] == 100.0, values
    assert values == sorted(values) and len(set(values)) == len(values), values
    return values, out[pos + 1:]


def guest_hash(path: Path) -> str:
    with api.open(path, "r") as dev:
        return hashlib.sha256(dev.read(0, dev.size)).hexdigest()


@pytest.fixture
def pool(tmp_path: Path) -> tuple[list[str], Path]:
    base = ["--config-dir", str(tmp_path / "cfg"), "--state-dir", str(tmp_path / "state")]
    virsh(base, "pool-define-as", "p", "dir", "--target", str(tmp_path / "img"))
    virsh(base, "pool-build", "p")
    virsh(base, "pool-start", "p")
    return base, tmp_path / "img"


def test_upload_download_progress(pool: tuple[list[str], Path], tmp_path: Path) -> None:
    base, img = pool
    data = random.Random(7).randbytes(5 * MIB)
    (tmp_path / "up.bin").write_bytes(data)
    virsh(base, "vol-create-as", "p", "a.raw", "5M")
    values, rest = progress_values(virsh(base, "vol-upload", "a.raw", str(tmp_path / "up.bin"),
                                         "p", "--progress"))
    assert values == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0] and rest == "\n"
    assert (img / "a.raw").read_bytes() == data

    values, rest = progress_values(virsh(base, "vol-download", "a.raw",
                                         str(tmp_path / "down.bin"), "p", "--progress"))
    assert values == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0] and rest == "\n"
    assert (tmp_path / "down.bin").read_bytes() == data
    # a part of the volume: the percentages are of the part
    values, _ = progress_values(virsh(base, "vol-download", "a.raw", str(tmp_path / "part"),
                                      "p", "--offset", str(MIB), "--length", str(2 * MIB),
                                      "--progress"))
    assert values == [0.0, 50.0, 100.0]
    assert (tmp_path / "part").read_bytes() == data[MIB:3 * MIB]
    # -q: no progress lines, the same bytes
    assert virsh(base, "-q", "vol-upload", "a.raw", str(tmp_path / "down.bin"), "p",
                 "--progress") == ""
    assert (img / "a.raw").read_bytes() == data


def test_clone_and_create_from_progress(pool: tuple[list[str], Path],
                                        tmp_path: Path) -> None:
    base, img = pool
    virsh(base, "vol-create-as", "p", "src.qcow2", "8M", "--format", "qcow2")
    with api.open(img / "src.qcow2", "r+") as dev:
        dev.write(MIB, random.Random(8).randbytes(3 * MIB))
        dev.write(6 * MIB, b"\x5a" * 4096)
    values, rest = progress_values(virsh(base, "vol-clone", "src.qcow2", "copy.qcow2",
                                         "--pool", "p", "--progress"))
    assert len(values) >= 3 and rest == "Vol copy.qcow2 cloned from src.qcow2\n\n"
    assert guest_hash(img / "copy.qcow2") == guest_hash(img / "src.qcow2")

    xml = tmp_path / "v.xml"
    xml.write_text("<volume><name>flat.raw</name><capacity>8388608</capacity>"
                   "<target><format type='raw'/></target></volume>")
    values, rest = progress_values(virsh(base, "vol-create-from", "p", str(xml), "src.qcow2",
                                         "--inputpool", "p", "--progress"))
    assert rest == "Vol flat.raw created from input vol src.qcow2\n\n"
    assert guest_hash(img / "flat.raw") == guest_hash(img / "src.qcow2")


def test_wipe_progress_counts_every_pass(pool: tuple[list[str], Path]) -> None:
    base, img = pool
    virsh(base, "vol-create-as", "p", "w.raw", "3M")  # allocated: every pass is written
    (img / "w.raw").write_bytes(b"\x77" * (3 * MIB))
    values, rest = progress_values(virsh(base, "vol-wipe", "w.raw", "p", "--algorithm",
                                         "nnsa", "--progress"))
    # three passes over three 1 MiB chunks: nine steps
    assert [round(v) for v in values] == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert rest == "Vol w.raw wiped\n\n"
    assert (img / "w.raw").read_bytes() == bytes(3 * MIB)  # nnsa's last pass: zeros
    values, _ = progress_values(virsh(base, "vol-wipe", "w.raw", "p", "--algorithm", "trim",
                                      "--progress"))
    assert values == [0.0, 100.0]


def test_library_progress_callbacks(pool: tuple[list[str], Path], tmp_path: Path) -> None:
    from diskimg.pool import PoolRegistry

    base, img = pool
    reg = PoolRegistry(base[1], base[3])
    p = reg.lookup("p")
    vol = p.create_volume("lib.raw", 4 * MIB)
    data = random.Random(9).randbytes(4 * MIB)
    got: list[float] = []
    with io.BytesIO(data) as src:
        assert vol.upload(src, length=4 * MIB, progress=got.append) == 4 * MIB
    assert got == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert (img / "lib.raw").read_bytes() == data
    got.clear()
    with open(tmp_path / "lib.out", "wb") as dst:
        vol.download(dst, progress=got.append)
    assert got == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert (tmp_path / "lib.out").read_bytes() == data
    got.clear()
    vol.wipe("zero", progress=got.append)
    assert got == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert (img / "lib.raw").read_bytes() == bytes(4 * MIB)


def test_diskimg_virsh_prints_progress(pool: tuple[list[str], Path], tmp_path: Path) -> None:
    """The ``diskimg virsh`` command line hands its printer to the pool commands."""
    base, img = pool
    data = random.Random(5).randbytes(2 * MIB)
    (tmp_path / "up.bin").write_bytes(data)
    virsh(base, "vol-create-as", "p", "s.raw", "2M")
    p = subprocess.run([sys.executable, "-m", "diskimg", "virsh", *base, "vol-upload", "s.raw",
                        str(tmp_path / "up.bin"), "p", "--progress"], capture_output=True,
                       timeout=60, env=dict(os.environ))  # bytes: keep the "\r"
    assert (p.returncode, p.stderr) == (0, b"")
    values, rest = progress_values(p.stdout.decode())
    assert values == [0.0, 50.0, 100.0] and rest == "\n"
    assert (img / "s.raw").read_bytes() == data
