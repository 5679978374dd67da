"""``DISKIMG_STORAGE_DIR`` alone isolates all pool state: definitions, autostart links and
the "started" markers.  With it set (and no ``--config-dir``/``--state-dir``/
``DISKIMG_POOL_STATE_DIR``), nothing is written under ``HOME``, the XDG directories or the
temporary directory, and two settings never see each other's pools or started state."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from diskimg.pool import default_state_dir
from diskimg.pool.cli import main


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: files with their bytes, directories and links as None."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file()
                                             and not p.is_symlink() else None)
    return out


def _virsh(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(args), stdout=out, stderr=err)
    assert (rc, err.getvalue()) == (0, ""), (args, out.getvalue(), err.getvalue())
    return out.getvalue()


@pytest.fixture
def only_storage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, XDG_* and TMPDIR point at empty directories; DISKIMG_POOL_STATE_DIR unset."""
    empty = tmp_path / "empty"
    for sub in ("home", "config", "state", "data", "cache", "runtime", "tmp"):
        (empty / sub).mkdir(parents=True)
    monkeypatch.delenv("DISKIMG_POOL_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(empty / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(empty / "state"))
    monkeypatch.setenv("XDG_DATA_HOME", str(empty / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(empty / "runtime"))
    monkeypatch.setenv("TMPDIR", str(empty / "tmp"))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return empty


def test_storage_dir_holds_every_pool_file(tmp_path: Path, only_storage_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    storage = tmp_path / "storage"
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(storage))
    target = tmp_path / "images"
    _virsh("pool-define-as", "p1", "dir", "--target", str(target))
    _virsh("pool-build", "p1")
    _virsh("pool-start", "p1")
    _virsh("pool-autostart", "p1")
    _virsh("vol-create-as", "p1", "a.qcow2", "1M", "--format", "qcow2")
    _virsh("vol-create-as", "p1", "b.vmdk", "1M", "--format", "vmdk")
    assert _virsh("-q", "pool-list", "--name").split() == ["p1"]  # started, seen as started
    assert _virsh("-q", "vol-list", "p1").split()[::2] == ["a.qcow2", "b.vmdk"]

    assert _tree(only_storage_dir) == {s: None for s in (
        "home", "config", "state", "data", "cache", "runtime", "tmp")}
    assert sorted(os.listdir(tmp_path)) == ["empty", "images", "storage"]
    tree = _tree(storage)
    assert sorted(tree) == ["autostart", "autostart/p1.xml", "p1.xml", "run", "run/p1.xml"]
    assert b"<name>p1</name>" in (tree["run/p1.xml"] or b"")
    assert os.readlink(storage / "autostart" / "p1.xml") == str(storage / "p1.xml")
    assert sorted(os.listdir(target)) == ["a.qcow2", "b.vmdk"]

    # pool-destroy removes the marker from the same place and nowhere else
    _virsh("pool-destroy", "p1")
    assert sorted(_tree(storage)) == ["autostart", "autostart/p1.xml", "p1.xml", "run"]
    assert _virsh("-q", "pool-list", "--name").split() == []


def test_two_storage_dirs_are_independent(tmp_path: Path, only_storage_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(a))
    _virsh("pool-define-as", "p", "dir", "--target", str(tmp_path / "ta"))
    _virsh("pool-build", "p")
    _virsh("pool-start", "p")
    _virsh("vol-create-as", "p", "only-a.raw", "64K")

    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(b))
    assert _virsh("-q", "pool-list", "--all", "--name").split() == []  # b knows no pool
    _virsh("pool-define-as", "p", "dir", "--target", str(tmp_path / "tb"))
    _virsh("pool-build", "p")
    # same name, defined in b: b's copy is inactive although a's is started
    assert _virsh("-q", "pool-list", "--all").split() == ["p", "inactive", "no"]
    _virsh("pool-start", "p")
    assert _virsh("-q", "vol-list", "p").split() == []
    _virsh("pool-destroy", "p")

    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(a))
    assert _virsh("-q", "pool-list", "--all").split() == ["p", "active", "no"]
    assert _virsh("-q", "vol-list", "p").split()[0] == "only-a.raw"
    assert _tree(only_storage_dir) == {s: None for s in (
        "home", "config", "state", "data", "cache", "runtime", "tmp")}


def test_state_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DISKIMG_POOL_STATE_DIR`` first; then inside ``DISKIMG_STORAGE_DIR`` (``run/`` for its
    own pools, ``run/<hash>`` for another ``--config-dir``); never inside /etc/libvirt."""
    monkeypatch.setenv("DISKIMG_POOL_STATE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(tmp_path / "s"))
    assert default_state_dir(tmp_path / "s") == tmp_path / "explicit"
    monkeypatch.delenv("DISKIMG_POOL_STATE_DIR")
    assert default_state_dir(tmp_path / "s") == tmp_path / "s" / "run"
    other = tmp_path / "other"
    digest = hashlib.sha256(os.fsencode(str(other))).hexdigest()[:16]
    assert default_state_dir(other) == tmp_path / "s" / "run" / digest
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", "/etc/libvirt/storage")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert str(default_state_dir(Path("/etc/libvirt/storage"))).startswith(
        str(tmp_path / "xdg"))
