"""Stored pool definitions and which pools are started, in libvirt's file layout.

Invariants: a definition is ``config_dir/NAME.xml`` whose ``<name>`` is NAME (others are
reported in :attr:`PoolRegistry.errors`, never used); names and UUIDs are unique and no two
dir pools share a target directory; every file is written atomically
(:func:`diskimg.pool.paths.write_atomic`); "started" is a copy of the definition in
``state_dir``, never a file inside ``/etc/libvirt``.
"""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib
from pathlib import Path

from diskimg.errors import PoolError
from diskimg.pool.paths import (
    DIR_TYPES,
    LIBVIRT_SYSTEM_DIR,
    LIBVIRT_SYSTEM_STATE,
    default_config_dir,
    default_state_dir,
    validate_pool_name,
    validate_target_path,
    write_atomic,
)
from diskimg.pool.pool import Pool
from diskimg.pool.probe import probe_volume
from diskimg.pool.volume import Volume
from diskimg.pool.xml import CONFIG_WARNING, Permissions, PoolDef


class PoolRegistry:
    """Stored pool definitions: ``config_dir/NAME.xml`` (+ ``autostart/NAME.xml`` links), the
    layout of libvirt's ``/etc/libvirt/storage``; started pools are marked in ``state_dir``.

    ``config_dir`` defaults to :func:`default_config_dir` (``$DISKIMG_STORAGE_DIR``, else
    ``/etc/libvirt/storage`` for root, else ``$XDG_CONFIG_HOME/libvirt/storage``), so by
    default diskimg manages the pools libvirt has; the directory is only written to when
    you define, undefine or (un)autostart a pool.  ``state_dir`` defaults to
    :func:`default_state_dir`.  For libvirt's system directory a pool is also reported
    started when libvirtd has it running.  Both paths are made absolute.
    """

    def __init__(self, config_dir: str | os.PathLike[str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        self.config_dir = Path(os.path.abspath(config_dir if config_dir is not None
                                               else default_config_dir()))
        self.state_dir = Path(os.path.abspath(state_dir if state_dir is not None
                                              else default_state_dir(self.config_dir)))
        #: (file, message) for stored definitions that could not be read
        self.errors: list[tuple[Path, str]] = []

    def __repr__(self) -> str:
        return f"<PoolRegistry {str(self.config_dir)!r}>"

    def _config_file(self, name: str) -> Path:
        return self.config_dir / f"{name}.xml"

    def _state_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.xml"

    def _autostart_link(self, name: str) -> Path:
        return self.config_dir / "autostart" / f"{name}.xml"

    def _libvirt_state(self, name: str) -> Path | None:
        with contextlib.suppress(OSError):
            if self.config_dir.resolve() == LIBVIRT_SYSTEM_DIR.resolve():
                return LIBVIRT_SYSTEM_STATE / f"{name}.xml"
        return None

    def _is_active(self, name: str) -> bool:
        if self._state_file(name).exists():
            return True
        lv = self._libvirt_state(name)
        return lv is not None and lv.exists()

    def _set_active(self, pool: Pool, active: bool) -> None:
        f = self._state_file(pool.name)
        if active:
            write_atomic(f, pool.definition.to_xml())
        else:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    @staticmethod
    def _read(path: Path) -> PoolDef:
        try:
            text = path.read_bytes()
        except OSError as e:
            raise PoolError(f"cannot read '{path}': {e.strerror}") from None
        # libvirt's own files start with a comment; that is fine, a DTD is not
        return PoolDef.from_xml(text)

    def _stored(self) -> dict[str, tuple[PoolDef, bool]]:
        """name → (definition, persistent)."""
        self.errors = []
        found: dict[str, tuple[PoolDef, bool]] = {}
        for directory, persistent in ((self.config_dir, True), (self.state_dir, False)):
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for fn in names:
                if not fn.endswith(".xml") or fn.startswith("."):
                    continue
                name = fn[:-4]
                if name in found:
                    continue
                p = directory / fn
                if not p.is_file():
                    continue
                try:
                    d = self._read(p)
                except PoolError as e:
                    self.errors.append((p, str(e)))
                    continue
                if d.name != name:
                    self.errors.append((p, f"pool name '{d.name}' does not match file name"))
                    continue
                found[name] = (d, persistent)
        return found

    def pools(self) -> list[Pool]:
        """Every defined or started pool, sorted by name."""
        return [Pool(d, self) for _n, (d, _p) in sorted(self._stored().items())]

    def lookup(self, name_or_uuid: str) -> Pool:
        """A pool by name, else by UUID (virsh's lookup order)."""
        stored = self._stored()
        if name_or_uuid in stored:
            return Pool(stored[name_or_uuid][0], self)
        for d, _p in stored.values():
            if d.uuid and d.uuid.lower() == name_or_uuid.lower():
                return Pool(d, self)
        raise PoolError(f"Storage pool not found: no storage pool with matching name "
                        f"'{name_or_uuid}'")

    def _check_conflicts(self, d: PoolDef) -> PoolDef | None:
        stored = self._stored()
        old = stored.get(d.name)
        if old is not None:
            od = old[0]
            if d.uuid is not None and od.uuid is not None and d.uuid != od.uuid:
                raise PoolError(f"operation failed: pool '{d.name}' already exists with uuid "
                                f"{od.uuid}")
            if d.uuid is None and od.uuid is not None:
                d.uuid = od.uuid
        for name, (od, _p) in stored.items():
            if name == d.name:
                continue
            if d.uuid is not None and od.uuid == d.uuid:
                raise PoolError(f"operation failed: pool '{name}' is already defined with "
                                f"uuid {d.uuid}")
            if (d.target_path and od.target_path and d.type in DIR_TYPES
                    and os.path.normpath(od.target_path) == os.path.normpath(d.target_path)):
                raise PoolError(f"operation failed: Storage source conflict with pool: "
                                f"'{name}'")
        return old[0] if old else None

    def define_xml(self, xml: str | bytes | PoolDef) -> Pool:
        """Store a pool definition (``virsh pool-define``).  Re-defining a pool of the same
        name and UUID updates it; a started pool keeps running with its old definition."""
        d = xml if isinstance(xml, PoolDef) else PoolDef.from_xml(xml)
        validate_pool_name(d.name)
        validate_target_path(d.target_path)
        if d.target_path is not None and d.type in DIR_TYPES:
            if not os.path.isabs(d.target_path):
                raise PoolError(f"XML error: target path '{d.target_path}' is not absolute")
            d.target_path = os.path.normpath(d.target_path)
        self._check_conflicts(d)
        if d.uuid is None:
            d.uuid = str(uuidlib.uuid4())
        text = CONFIG_WARNING.format(name=d.name) + d.to_xml()
        write_atomic(self._config_file(d.name), text)
        return Pool(d, self)

    def define(self, name: str, target: str | os.PathLike[str], *, type: str = "dir",
               permissions: Permissions | None = None, uuid: str | None = None) -> Pool:
        """``virsh pool-define-as NAME dir --target PATH`` (:meth:`define_xml` checks the
        name and the target)."""
        return self.define_xml(PoolDef(name=name, type=type,
                                       target_path=os.path.abspath(os.fspath(target)),
                                       permissions=permissions, uuid=uuid))

    def create_xml(self, xml: str | bytes | PoolDef, *, build: bool = False) -> Pool:
        """Start a transient pool (``virsh pool-create``): no stored definition."""
        d = xml if isinstance(xml, PoolDef) else PoolDef.from_xml(xml)
        validate_pool_name(d.name)
        validate_target_path(d.target_path)
        if d.target_path is not None:
            d.target_path = os.path.normpath(os.path.abspath(d.target_path))
        old = self._check_conflicts(d)
        if old is not None:
            raise PoolError(f"operation failed: pool '{d.name}' already exists")
        if d.uuid is None:
            d.uuid = str(uuidlib.uuid4())
        pool = Pool(d, self)
        pool._require_dir_type()
        if build:
            pool.build()
        pool._check_dir()
        self._set_active(pool, True)
        return pool

    def _undefine(self, pool: Pool) -> None:
        f = self._config_file(pool.name)
        if pool.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{pool.name}' "
                            "is still active")
        if not f.exists():
            raise PoolError(f"Storage pool not found: no storage pool with matching name "
                            f"'{pool.name}'")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._autostart_link(pool.name))
        f.unlink()

    def find_volume(self, key_or_path: str) -> Volume:
        """A volume of any started dir pool by key or path (``vol-name``/``vol-pool``)."""
        p = os.path.normpath(os.path.abspath(key_or_path))
        parent, name = os.path.split(p)
        for pool in self.pools():
            if not pool.is_active() or pool.type not in DIR_TYPES:
                continue
            try:
                same = os.path.samefile(pool.path, parent)
            except OSError:
                same = False
            if ((same or os.path.normpath(pool.path) == parent)
                    and name and probe_volume(p) is not None):
                return Volume(pool, name)
        raise PoolError(f"Storage volume not found: no storage vol with matching path "
                        f"'{key_or_path}'")


__all__ = ["PoolRegistry"]
