"""``amend -o data_file=NEW`` and ``data_file_raw`` on qcow2 images with an external data
file, against qemu-img 7.2: the same accepted and refused option sets, the same messages,
the same qcow2 bytes afterwards (the header's data file name rewritten, the data file
untouched), a clean ``qemu-img check`` and the guest bytes read through the new name; a
refusal leaves the image byte-identical."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

from tests.cli.conftest import needs_qemu, run_module

pytestmark = [pytest.mark.qemu, needs_qemu]

LONG = "x" * 70000
NOSPACE = "Failed to update the image header: No space left on device"
NOT_SET = "data-file-raw cannot be set on existing images"
NO_DATA_FILE = "data-file can only be set for images that use an external data file"

CASES = [  # (create options, amend options, the data file name afterwards, error)
    ("data_file=z.raw", "data_file=new.raw", "new.raw", ""),
    ("data_file=z.raw,data_file_raw=on", "data_file=sub/new.raw,data_file_raw=off",
     "sub/new.raw", ""),
    ("data_file=z.raw,data_file_raw=on", "data_file_raw=on,data_file=n2.raw", "n2.raw", ""),
    ("data_file=z.raw", "data_file=new.raw,lazy_refcounts=on,size=4M", "new.raw", ""),
    ("data_file=z.raw", "data_file_raw=on", "", NOT_SET),
    ("compat=1.1", "data_file=", "", NO_DATA_FILE),
    ("data_file=z.raw", f"data_file={LONG}", "", NOSPACE),
]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize(("create", "amend", "new_name", "error"), CASES,
                         ids=[f"{c}->{a[:40]}" for c, a, _, _ in CASES])
def test_amend_data_file_matches_qemu(tmp_path: Path, create: str, amend: str,
                                      new_name: str, error: str) -> None:
    q, d = tmp_path / "q", tmp_path / "d"
    q.mkdir()
    QEMU.img("create", "-q", "-f", "qcow2", "-o", create, "a.qcow2", "1M", cwd=q)
    QEMU.io("a.qcow2", "write -P 9 0 64k", "write -P 3 512k 4k", cwd=q)
    shutil.copytree(q, d)
    data_before = {p.name: sha(p) for p in d.glob("*.raw")}
    before = sha(d / "a.qcow2")
    want = QEMU.img("amend", "-o", amend, "a.qcow2", ok=None, cwd=q)
    got = run_module("amend", "-o", amend, "a.qcow2", cwd=d)
    assert (got.rc, got.out, got.err.replace("diskimg:", "qemu-img:")) == (
        want.returncode, want.stdout, want.stderr)
    assert (got.rc, got.err) == ((1, f"diskimg: {error}\n") if error else (0, ""))
    data_after = {p.name: sha(p) for p in d.glob("*.raw")}
    assert data_after == {p.name: sha(p) for p in q.glob("*.raw")}  # as qemu left it
    if "size=" not in amend:
        assert data_after == data_before  # renaming does not touch the data file
    if error:
        assert sha(d / "a.qcow2") == before  # a refusal changes no byte
        return
    assert (d / "a.qcow2").read_bytes() == (q / "a.qcow2").read_bytes()
    if new_name != "z.raw":  # move the data file where the header now points
        (d / new_name).parent.mkdir(exist_ok=True)
        (d / "z.raw").rename(d / new_name)
    info = QEMU.info("a.qcow2", cwd=d)
    assert info["format-specific"]["data"]["data-file"] == new_name
    QEMU.check_clean("a.qcow2", cwd=d)
    # the guest bytes through the new name: the two writes, zeros around them
    QEMU.io("a.qcow2", "read -P 9 0 64k", "read -P 0 64k 448k", "read -P 3 512k 4k",
            "read -P 0 516k 508k", cwd=d)
