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


@pytest.mark.parametrize(("create", "amend"), CASES)
def test_amend_progress_matches_qemu(tmp_path: Path, create: str, amend: str) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", "1M", cwd=tmp_path)
    QEMU.io("q.qcow2", "write -P 7 64k 128k", cwd=tmp_path)
    shutil.copyfile(tmp_path / "q.qcow2", tmp_path / "d.qcow2")
    before = hashlib.sha256((tmp_path / "d.qcow2").read_bytes()).hexdigest()
    want = QEMU.img("amend", "-p", "-o", amend, "q.qcow2", ok=None, cwd=tmp_path, text=False)
    got = run_module("amend", "-p", "-o", amend, "d.qcow2", cwd=tmp_path)
    assert got.out.encode() == want.stdout
    assert (got.rc, got.err.replace("diskimg:", "qemu-img:")) == (
        want.returncode, want.stderr.decode())
    after = hashlib.sha256((tmp_path / "d.qcow2").read_bytes()).hexdigest()
    if want.returncode:
        assert after == before  # a refusal changes no byte
    info_q, info_d = QEMU.info(tmp_path / "q.qcow2"), QEMU.info(tmp_path / "d.qcow2")
    for info in (info_q, info_d):
        info.pop("filename")
        info.pop("actual-size")
    assert info_d == info_q
    QEMU.check_clean(tmp_path / "d.qcow2")
    assert QEMU.compare(tmp_path / "q.qcow2", tmp_path / "d.qcow2") == 0
