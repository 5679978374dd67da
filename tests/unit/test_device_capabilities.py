"""Declared capabilities of BlockDevice (issue 16 item 3): ``check()`` is a method of every
device returning the format-neutral CheckReport; a format without a checker (raw) raises
UnsupportedFeatureError from the base method, and ``supports_check`` /
``supports_check_repair`` say which formats check and repair, so no caller probes with
getattr.  A refusal leaves every byte of the image as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg.check_report import CheckReport
from diskimg.errors import UnsupportedFeatureError
from diskimg.qcow2.check import CheckResult
from diskimg.qcow2.image import Qcow2Image
from diskimg.raw import RawImage
from diskimg.vmdk.image import VmdkImage

SIZE = 1 << 20


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cli_check_refused(*args: str) -> None:
    """``diskimg check ARGS`` ends as qemu-img's does for a format it cannot check: 63."""
    r = subprocess.run([sys.executable, "-m", "diskimg", "check", *args],
                       capture_output=True, text=True)
    assert r.returncode == 63 and "does not support checks" in r.stderr


def test_declared_check_capabilities() -> None:
    assert (RawImage.supports_check, RawImage.supports_check_repair) == (False, False)
    assert (VmdkImage.supports_check, VmdkImage.supports_check_repair) == (True, False)
    assert (Qcow2Image.supports_check, Qcow2Image.supports_check_repair) == (True, True)
    assert CheckResult is CheckReport  # the old name is kept


def test_raw_check_raises_from_the_base_method_and_changes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    p.write_bytes(os.urandom(SIZE))
    before = _sha(p)
    with diskimg.open(p, format="raw") as img:
        with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
            img.check()
    with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
        diskimg.check(p, format="raw")
    _cli_check_refused("-f", "raw", str(p))
    assert _sha(p) == before


def test_vmdk_check_reports_but_refuses_repair(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    diskimg.create(p, "vmdk", SIZE)
    with diskimg.open(p, "r+") as img:
        img.write(4096, b"\xa5" * 65536)
    before = _sha(p)
    res = diskimg.check(p)
    assert isinstance(res, CheckReport) and res.format == "vmdk"
    assert res.exit_code == 0 and res.summary_lines() == ["No errors were found on the image."]
    with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
        diskimg.check(p, repair="leaks")
    _cli_check_refused("-r", "all", str(p))
    assert _sha(p) == before


def test_qcow2_check_returns_a_check_report(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    diskimg.create(p, "qcow2", SIZE)
    before = _sha(p)
    with diskimg.open(p) as img:
        res = img.check()
    assert isinstance(res, CheckReport) and res.format == "qcow2" and res.exit_code == 0
    assert _sha(p) == before


def test_backing_name_is_declared_on_every_device(tmp_path: Path) -> None:
    """api's opener and the commit/rebase chain read ``backing_file_name()`` of any device;
    raw declares none, qcow2 and vmdk return the name they store."""
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(SIZE))
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", SIZE, backing_file="d.raw", backing_fmt="raw")
    before = (_sha(p), _sha(top))
    with diskimg.open(p, format="raw") as img:
        assert img.backing_file_name() == (None, None)
        img.backing_attached()  # the default hook does nothing
    with diskimg.open(top) as img:
        assert img.backing_file_name() == ("d.raw", "raw")
        assert img.backing is not None and img.backing.backing_file_name() == (None, None)
    assert (_sha(p), _sha(top)) == before
