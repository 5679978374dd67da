"""diskimg.pool.paths: which names may become files, where files live, atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from diskimg.errors import PoolError
from diskimg.pool.paths import (
    default_state_dir,
    validate_pool_name,
    validate_volume_name,
    write_atomic,
)
from diskimg.pool.xml import PoolDef, VolumeDef


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/etc/passwd", "a\0b"])
def test_names_that_would_leave_the_directory_are_refused(name: str) -> None:
    with pytest.raises(PoolError, match="volume name"):
        validate_volume_name(name)
    with pytest.raises(PoolError, match="name"):
        validate_pool_name(name)


@pytest.mark.parametrize("name", ["a", "vm1.qcow2", "...", ".hidden", "a b", "é"])
def test_names_that_stay_in_the_directory_are_accepted(name: str) -> None:
    validate_volume_name(name)
    validate_pool_name(name)
    assert os.path.dirname(os.path.join("/pool", name)) == "/pool"


def test_the_xml_parsers_apply_the_same_rule() -> None:
    """One rule for names: the XML classes refuse what paths refuses, with its words."""
    with pytest.raises(PoolError, match="cannot contain '/'"):
        VolumeDef.from_xml("<volume><name>../x</name><capacity>1</capacity></volume>")
    with pytest.raises(PoolError, match="cannot contain '/'"):
        PoolDef.from_xml("<pool type='dir'><name>a/b</name></pool>")


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "p.xml"
    write_atomic(f, "first\n")
    write_atomic(f, "second\n", mode=0o640)
    assert f.read_bytes() == b"second\n"
    assert f.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o700
    assert os.listdir(tmp_path / "sub") == ["p.xml"]  # no temporary file left


def test_write_atomic_failure_leaves_the_old_file(tmp_path: Path) -> None:
    """A write that fails half-way (text that cannot be encoded) leaves the old bytes and
    no temporary file."""
    f = tmp_path / "p.xml"
    f.write_bytes(b"old definition\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(f, "new \udc80 definition\n")
    assert f.read_bytes() == b"old definition\n"
    assert os.listdir(tmp_path) == ["p.xml"]


def test_state_dir_is_keyed_by_the_config_dir(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISKIMG_POOL_STATE_DIR")
    monkeypatch.delenv("DISKIMG_STORAGE_DIR")  # else the state lives inside it
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    cfg = tmp_path / "cfg"
    digest = hashlib.sha256(os.fsencode(str(cfg))).hexdigest()[:16]
    assert default_state_dir(cfg) == tmp_path / "st" / "diskimg" / "pool-state" / digest
    assert default_state_dir(tmp_path / "other") != default_state_dir(cfg)
    monkeypatch.setenv("DISKIMG_POOL_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir(cfg) == tmp_path / "explicit"
