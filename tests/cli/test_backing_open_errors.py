"""A backing file that will not open is reported in qemu-img's words: ``Could not open
'TOP': Could not open backing file: REASON``, and ``info --backing-chain`` names the
backing file itself.  diskimg adds the field and offset to a format error's reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import needs_qemu, qemu

pytestmark = [needs_qemu, pytest.mark.qemu]

FIELD = " (field 'cluster_bits' at 0x14)"


@pytest.fixture
def corrupt_chain(tmp_path: Path) -> Path:
    """``top.qcow2`` over ``sub/bad.qcow2``, whose header has cluster_bits 0."""
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.qcow2"
    assert qemu("create", "-q", "-f", "qcow2", "sub/bad.qcow2", "1M", cwd=tmp_path).rc == 0
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write(bytes(4))
    r = qemu("create", "-q", "-f", "qcow2", "-u", "-b", "sub/bad.qcow2", "-F", "qcow2",
             "top.qcow2", "1M", cwd=tmp_path)
    assert r.rc == 0, r.err
    return tmp_path


@pytest.mark.parametrize("args", [
    ["check", "top.qcow2"], ["map", "top.qcow2"], ["compare", "top.qcow2", "top.qcow2"],
    ["convert", "-O", "raw", "top.qcow2", "out.raw"], ["info", "--backing-chain", "top.qcow2"],
    ["rebase", "-u", "-b", "", "top.qcow2"],
])
def test_corrupt_backing_file_reported_like_qemu(di, corrupt_chain: Path,
                                                 args: list[str]) -> None:
    want = qemu(*args, cwd=corrupt_chain)
    got = di(*args, cwd=corrupt_chain)
    assert got.rc == want.rc
    if want.rc:
        assert "Unsupported cluster size: 2^0" in want.err
        assert got.err == want.err.rstrip("\n") + FIELD + "\n"
    else:
        assert got.err == want.err


def test_wrong_passphrase_for_backing_file_reported_like_qemu(di, tmp_path: Path) -> None:
    secrets = ["--object", "secret,id=s0,data=good", "--object", "secret,id=s1,data=bad"]
    r = qemu("create", "-q", *secrets, "-f", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "base.qcow2",
             "4M", cwd=tmp_path)
    assert r.rc == 0, r.err
    assert qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
                cwd=tmp_path).rc == 0
    args = [*secrets, "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=s1"]
    for cmd in (["convert", *args, "-O", "raw", "out.raw"], ["compare", *args, "top.qcow2"]):
        want = qemu(*cmd, cwd=tmp_path)
        got = di(*cmd, cwd=tmp_path)
        assert (got.rc, got.err) == (want.rc, want.err)
        assert "Could not open backing file: Invalid password" in got.err
