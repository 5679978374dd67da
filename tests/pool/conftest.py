"""Every pool test runs with its own config, state and home directories.

The default definition directory is libvirt's (``/etc/libvirt/storage`` for root,
``~/.config/libvirt/storage`` otherwise), so a test that forgot ``--config-dir`` would write
into the machine's real libvirt configuration.  This autouse fixture points
``DISKIMG_STORAGE_DIR``, ``DISKIMG_POOL_STATE_DIR``, ``HOME`` and the XDG directories into
the test's ``tmp_path`` and, after the test, checks nothing appeared in the real places.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_REAL = [Path("/etc/libvirt/storage"),
         Path(os.path.expanduser("~")) / ".config" / "libvirt" / "storage",
         Path(os.path.expanduser("~")) / ".local" / "state" / "diskimg"]


def _listing(paths: list[Path]) -> dict[Path, list[str]]:
    return {p: sorted(os.listdir(p)) if p.is_dir() else [] for p in paths}


@pytest.fixture(autouse=True)
def isolated_pool_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point every default pool location into ``tmp_path / "env"``; yield that directory."""
    before = _listing(_REAL)
    env = tmp_path / "env"
    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(env / "storage"))
    monkeypatch.setenv("DISKIMG_POOL_STATE_DIR", str(env / "state"))
    monkeypatch.setenv("HOME", str(env / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(env / "home" / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(env / "home" / ".local" / "state"))
    yield env
    assert _listing(_REAL) == before, "a pool test wrote into the real libvirt/diskimg dirs"
