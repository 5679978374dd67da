"""Where pool files live, and which names may become files.

Invariants: a pool name is a file name (``NAME.xml``) and a volume name is a single entry of
the pool directory: neither contains ``/`` or NUL nor is empty, ``.`` or ``..``, so
``os.path.join(pool_dir, name)`` never leaves the pool directory.  Definitions are written
atomically (temporary file, fsync, rename): a reader sees the old or the new text, never a
mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from diskimg.errors import PoolError, UsageError
from diskimg.hostio import path_name

LIBVIRT_SYSTEM_DIR = Path("/etc/libvirt/storage")
LIBVIRT_SYSTEM_STATE = Path("/run/libvirt/storage")
#: the pool types whose target is a directory of volume files
DIR_TYPES = ("dir", "fs", "netfs")


def _usable(text: str, xml: bool = True) -> bool:
    """Whether ``text`` can be a file name (:func:`~diskimg.hostio.path_name`'s rule: no
    NUL, a byte for every character) and, with ``xml``, text in a definition (UTF-8: no
    surrogate at all).  Only a Python caller can pass a name that fails."""
    try:
        path_name(text)
        if xml:
            text.encode("utf-8")
    except (UsageError, UnicodeEncodeError):
        return False
    return True


def _shown(text: str) -> str:
    """``text`` for a message (a surrogate as its escape)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validate_pool_name(name: str, *, file_name: bool = True) -> None:
    """A pool name is XML text, not empty, and (``file_name``: a pool that is defined)
    becomes a file name (NAME.xml): no '/', NUL, '.' or '..'.  ``file_name=False``: the XML
    text alone (``--print-xml``, which virsh prints without asking libvirt)."""
    if file_name and "/" in name:
        raise PoolError(f"XML error: name {_shown(name)} cannot contain '/'")
    if not name or (file_name and name in (".", "..")) or not _usable(name):
        raise PoolError(f"XML error: invalid pool name '{_shown(name)}'")


def validate_volume_name(name: str) -> None:
    """Refuse names that would leave the pool directory (libvirt's rule plus . and ..), or
    that no file can have.  (A file whose name is not UTF-8 is a volume, as libvirt lists
    it.)"""
    if "/" in name:
        raise PoolError(f"Requested operation is not valid: volume name '{_shown(name)}' "
                        "cannot contain '/'")
    if not name or name in (".", "..") or not _usable(name, xml=False):
        raise PoolError("Requested operation is not valid: invalid volume name "
                        f"'{_shown(name)}'")


def validate_target_path(path: str | None) -> None:
    """A pool's target directory is written into its definition: XML text, a file name."""
    if path is not None and not _usable(path):
        raise PoolError(f"XML error: invalid target path '{_shown(path)}'")


def default_config_dir() -> Path:
    """Where pool definitions live, in libvirt's places: ``$DISKIMG_STORAGE_DIR`` if set,
    else ``/etc/libvirt/storage`` for root (``qemu:///system``), else
    ``$XDG_CONFIG_HOME/libvirt/storage`` (``~/.config/libvirt/storage``, ``qemu:///session``).
    ``--config-dir`` / ``PoolRegistry(config_dir)`` override all of these."""
    if os.environ.get("DISKIMG_STORAGE_DIR"):
        return Path(os.environ["DISKIMG_STORAGE_DIR"])
    if os.geteuid() == 0:
        return LIBVIRT_SYSTEM_DIR
    return libvirt_session_dir()


def libvirt_session_dir() -> Path:
    """libvirt's per-user (``qemu:///session``) pool directory:
    ``$XDG_CONFIG_HOME/libvirt/storage``, ``~/.config/libvirt/storage`` by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "libvirt" / "storage"


def default_state_dir(config_dir: Path) -> Path:
    """Where "pool is started" markers live: ``$DISKIMG_POOL_STATE_DIR``; else, when
    ``$DISKIMG_STORAGE_DIR`` is set, inside it (``run/`` for that directory's own pools,
    ``run/<hash of the config dir>`` for a ``--config-dir`` elsewhere), so that one setting
    holds all pool state; else ``$XDG_STATE_HOME/diskimg/pool-state/<hash of the config
    dir>``."""
    if os.environ.get("DISKIMG_POOL_STATE_DIR"):
        return Path(os.environ["DISKIMG_POOL_STATE_DIR"])
    config = os.path.abspath(config_dir)
    digest = hashlib.sha256(os.fsencode(config)).hexdigest()[:16]
    storage = os.environ.get("DISKIMG_STORAGE_DIR")
    if storage and not _is_libvirt_system_dir(storage):  # never write inside /etc/libvirt
        run = Path(os.path.abspath(storage)) / "run"
        return run if config == os.path.abspath(storage) else run / digest
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "state")
    return Path(base) / "diskimg" / "pool-state" / digest


def _is_libvirt_system_dir(path: str) -> bool:
    try:
        return Path(path).resolve() == LIBVIRT_SYSTEM_DIR.resolve()
    except OSError:
        return False


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` (UTF-8, ``mode``) in one rename after an fsync; the
    parent directory is created (0700) if missing.  On failure ``path`` is unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = [
    "DIR_TYPES",
    "LIBVIRT_SYSTEM_DIR",
    "LIBVIRT_SYSTEM_STATE",
    "default_config_dir",
    "default_state_dir",
    "libvirt_session_dir",
    "validate_pool_name",
    "validate_volume_name",
    "write_atomic",
]
