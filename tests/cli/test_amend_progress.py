"""Golden test of ``amend -p``: diskimg prints qemu-img 7.2's progress lines byte for byte
(``    (0.00/100%)\\r``, the driver's own lines for an upgrade or a downgrade, the final 100
and the newline, also when the amend is refused) and leaves the same image."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import needs_qemu, run_module

pytestmark = [pytest.mark.qemu, needs_qemu]

CASES = [  # (create options, amend options)
    ("compat=1.1", "compat=0.10"),  # downgrade: 0, 100, 100
    ("compat=0.10", "compat=1.1"),  # upgrade: 0, 0, 50, 100, 100
    ("compat=0.10", "lazy_refcounts=on"),  # refused by the driver: 0, 100, newline
    ("compat=1.1", "foo=1"),  # refused while parsing: the newline only
]


def amend_both(d: Path, amend: str) -> tuple[int, bytes]:
    """``amend -p -o AMEND`` by qemu-img on ``d/q.qcow2`` and by diskimg on a copy,
    ``d/d.qcow2``: the same stdout bytes, exit code and message, and a refusal changes no
    byte.  Returns qemu-img's exit code and stdout."""
    shutil.copyfile(d / "q.qcow2", d / "d.qcow2")
    before = hashlib.sha256((d / "d.qcow2").read_bytes()).hexdigest()
    want = QEMU.img("amend", "-p", "-o", amend, "q.qcow2", ok=None, cwd=d, text=False)
    got = run_module("amend", "-p", "-o", amend, "d.qcow2", cwd=d)
    assert got.out.encode() == want.stdout
    assert (got.rc, got.err.replace("diskimg:", "qemu-img:")) == (
        want.returncode, want.stderr.decode())
    if want.returncode:
        assert hashlib.sha256((d / "d.qcow2").read_bytes()).hexdigest() == before
    return want.returncode, bytes(want.stdout)


@pytest.mark.parametrize(("create", "amend"), CASES)
def test_amend_progress_matches_qemu(tmp_path: Path, create: str, amend: str) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", "1M", cwd=tmp_path)
    QEMU.io("q.qcow2", "write -P 7 64k 128k", cwd=tmp_path)
    amend_both(tmp_path, amend)
    info_q, info_d = QEMU.info(tmp_path / "q.qcow2"), QEMU.info(tmp_path / "d.qcow2")
    for info in (info_q, info_d):
        info.pop("filename")
        info.pop("actual-size")
    assert info_d == info_q
    QEMU.check_clean(tmp_path / "d.qcow2")
    assert QEMU.compare(tmp_path / "q.qcow2", tmp_path / "d.qcow2") == 0


# (create options, size, qemu-io commands, snapshot?, amend options): the refcount-width
# walks (allocation walks until nothing is allocated, then the write walk, one line per
# point), the per-L1-entry lines of a downgrade, and both combined with a version change
WALKS = [  # (qemu's walks visit every entry of a refcount table: small clusters keep it fast)
    ("compat=0.10,cluster_size=4096", "4M", ["write -P 7 64k 1M"], False,
     "compat=1.1,refcount_bits=8"),
    # the new blocks and table land where another walk is needed unless the new table
    # covers only the blocks in use (qemu's rule)
    ("cluster_size=512", "8M", ["write -P 7 0 3M", "write -P 8 6M 100k"], False,
     "refcount_bits=32"),
    # a refcount of 2 does not fit 1 bit: qemu stops in its first walk
    ("cluster_size=4096", "4M", ["write -P 7 0 1M"], True, "refcount_bits=1"),
    ("compat=1.1", "2G", ["write -P 7 0 1M", "write -z 1G 1M"], True, "compat=0.10"),
    ("cluster_size=4096,refcount_bits=8", "4M", ["write -P 7 0 1M"], True,
     "refcount_bits=16,compat=0.10"),
]


@pytest.mark.parametrize(("create", "size", "io", "snap", "amend"), WALKS,
                         ids=[w[-1] for w in WALKS])
def test_amend_walk_progress_matches_qemu(tmp_path: Path, create: str, size: str,
                                          io: list[str], snap: bool, amend: str) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", size, cwd=tmp_path)
    if io:
        QEMU.io("q.qcow2", *io, cwd=tmp_path)
    if snap:
        QEMU.img("snapshot", "-c", "s1", "q.qcow2", cwd=tmp_path)
    rc, out = amend_both(tmp_path, amend)
    lines = out.decode().split("\r")
    assert len(lines) >= 4 and lines[-1] == "\n"  # the steps printed more than 0 and 100
    if rc == 0:  # the amend was made
        QEMU.check_clean(tmp_path / "d.qcow2")
        data = QEMU.info(tmp_path / "d.qcow2")["format-specific"]["data"]
        for opt in amend.split(","):
            key, value = opt.split("=")
            assert str(data[key.replace("_", "-")]) == value
    assert QEMU.compare(tmp_path / "q.qcow2", tmp_path / "d.qcow2") == 0
