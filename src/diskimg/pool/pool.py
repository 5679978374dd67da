"""A libvirt ``dir`` storage pool: a directory whose entries are volumes.

Invariants: volume operations need the pool started (:meth:`Pool._require_active`) and of a
directory type; a volume name is reserved with an exclusive create (``O_EXCL``) and stays
under diskimg's per-volume lock until the volume is complete; a creation that fails leaves
nothing behind (the file is removed only while it is still the one this call created).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskimg import api
from diskimg.errors import ImageLockedError, PoolError
from diskimg.ops.common import ProgressFn
from diskimg.pool import create, locking
from diskimg.pool.paths import DIR_TYPES, validate_volume_name
from diskimg.pool.probe import probe_volume
from diskimg.pool.scale import parse_scaled
from diskimg.pool.volume import Volume
from diskimg.pool.xml import Permissions, PoolDef, VolumeDef

if TYPE_CHECKING:
    from diskimg.pool.registry import PoolRegistry

DEFAULT_POOL_MODE = 0o711


@dataclass(frozen=True)
class PoolInfo:
    """``virsh pool-info``: state is ``running`` or ``inactive``; sizes 0 when inactive."""

    state: str
    capacity: int
    allocation: int
    available: int


class Pool:
    """A ``dir`` storage pool.  Get one from a :class:`PoolRegistry`, or use
    :meth:`Pool.open_dir` for a directory without any stored definition."""

    def __init__(self, definition: PoolDef, registry: PoolRegistry | None = None) -> None:
        self.definition = definition
        self.registry = registry

    @classmethod
    def open_dir(cls, path: str | os.PathLike[str], name: str | None = None) -> Pool:
        """An always-active, unregistered pool over an existing directory."""
        p = os.path.abspath(os.fspath(path))
        if not os.path.isdir(p):
            raise PoolError(f"cannot open directory '{p}': "
                            f"{os.strerror(errno.ENOTDIR if os.path.exists(p) else errno.ENOENT)}")
        return cls(PoolDef(name=name or os.path.basename(p.rstrip("/")) or "root",
                           target_path=p))

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} {self.path!r}>"

    @property
    def name(self) -> str:
        """The pool's name (from its definition; unique within a registry)."""
        return self.definition.name

    @property
    def uuid(self) -> str | None:
        """The pool's UUID string from its definition, or None if it has none."""
        return self.definition.uuid

    @property
    def type(self) -> str:
        """The libvirt pool type (``dir``; other types can be defined but not started)."""
        return self.definition.type

    @property
    def path(self) -> str:
        """The target directory; raises :class:`PoolError` if the definition has none."""
        if self.definition.target_path is None:
            raise PoolError(f"pool '{self.name}' has no target path")
        return self.definition.target_path

    # --- state ----------------------------------------------------------------------
    def is_active(self) -> bool:
        """Whether the pool is started (a pool opened without a registry always is)."""
        return True if self.registry is None else self.registry._is_active(self.name)

    def is_persistent(self) -> bool:
        """Whether a definition ``NAME.xml`` is stored in the registry (False without one)."""
        return False if self.registry is None else self.registry._config_file(
            self.name).exists()

    @property
    def autostart(self) -> bool:
        """Whether the registry holds an ``autostart/NAME.xml`` link for this pool."""
        return False if self.registry is None else os.path.lexists(
            self.registry._autostart_link(self.name))

    def set_autostart(self, enabled: bool = True) -> None:
        """Create or remove ``autostart/NAME.xml`` beside the definition (libvirt's flag; with
        no daemon a started pool simply stays started)."""
        reg = self._reg()
        if not self.is_persistent():
            raise PoolError("cannot set autostart for transient pool")
        link = reg._autostart_link(self.name)
        if enabled:
            link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.path.lexists(link):
                os.symlink(reg._config_file(self.name), link)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)

    def _reg(self) -> PoolRegistry:
        if self.registry is None:
            raise PoolError(f"pool '{self.name}' is not defined in a registry")
        return self.registry

    def _require_dir_type(self) -> None:
        if self.type not in DIR_TYPES:
            raise PoolError(f"Operation not supported: pool '{self.name}' has type "
                            f"'{self.type}'; diskimg manages 'dir' pools only")

    def _require_active(self) -> None:
        if not self.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{self.name}' "
                            "is not active")
        self._require_dir_type()

    def build(self, *, overwrite: bool = False, no_overwrite: bool = False) -> None:
        """Create the target directory (parents too) with the defined permissions (mode
        0711 by default); an existing directory gets the defined mode/owner/group."""
        self._require_dir_type()
        if self.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{self.name}' "
                            "is already active")
        p = self.path
        perms = self.definition.permissions or Permissions()
        existed = os.path.isdir(p)
        if os.path.exists(p) and not existed:
            raise PoolError(f"cannot create path '{p}': Not a directory")
        try:
            if not existed:
                os.makedirs(os.path.dirname(p) or "/", exist_ok=True)
                os.mkdir(p, 0o700)
                os.chmod(p, perms.mode if perms.mode is not None else DEFAULT_POOL_MODE)
            elif perms.mode is not None:
                os.chmod(p, perms.mode)
            if (perms.owner not in (None, -1)) or (perms.group not in (None, -1)):
                os.chown(p, -1 if perms.owner is None else perms.owner,
                         -1 if perms.group is None else perms.group)
        except OSError as e:
            raise PoolError(f"cannot create path '{p}': {e.strerror}") from None

    def start(self, *, build: bool = False) -> None:
        """Mark the pool started (``virsh pool-start``); the directory must exist."""
        reg = self._reg()
        self._require_dir_type()
        if self.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{self.name}' "
                            "is already active")
        if build:
            self.build()
        self._check_dir()
        reg._set_active(self, True)

    def _check_dir(self) -> None:
        p = self.path
        if not os.path.isdir(p):
            why = "Not a directory" if os.path.exists(p) else "No such file or directory"
            raise PoolError(f"cannot open directory '{p}': {why}")

    def destroy(self) -> None:
        """Stop the pool (``virsh pool-destroy``); files are untouched."""
        reg = self._reg()
        if not self.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{self.name}' "
                            "is not active")
        reg._set_active(self, False)

    def refresh(self) -> None:
        """Re-scan (there is no cache: this checks the directory is readable)."""
        self._require_active()
        self._check_dir()

    def delete(self) -> None:
        """Remove the (empty) pool directory (``virsh pool-delete``); pool must be stopped."""
        self._require_dir_type()
        if self.is_active():
            raise PoolError(f"Requested operation is not valid: storage pool '{self.name}' "
                            "is still active")
        try:
            os.rmdir(self.path)
        except OSError as e:
            raise PoolError(f"failed to remove pool '{self.path}': {e.strerror}") from None

    def undefine(self) -> None:
        """Remove the stored definition and autostart link (the pool must be stopped, as
        libvirt 9 requires); the directory and its files are untouched."""
        self._reg()._undefine(self)

    def info(self) -> PoolInfo:
        """``virsh pool-info``: state plus capacity, allocation and available bytes of the
        file system holding the pool (statvfs, libvirt's arithmetic); all 0 when inactive.
        Raises :class:`PoolError` if the directory cannot be examined."""
        if not self.is_active():
            return PoolInfo("inactive", 0, 0, 0)
        try:
            sv = os.statvfs(self.path)
        except OSError as e:
            raise PoolError(f"cannot statvfs path '{self.path}': {e.strerror}") from None
        cap = sv.f_frsize * sv.f_blocks
        # libvirt's arithmetic: available counts the root-reserved blocks too (f_bfree)
        return PoolInfo("running", cap, sv.f_frsize * (sv.f_blocks - sv.f_bfree),
                        sv.f_frsize * sv.f_bfree)

    def to_xml(self, *, inactive: bool = False) -> str:
        """Pool XML as ``virsh pool-dumpxml`` prints it: sizes from statvfs and the target
        directory's actual permissions while started, the stored definition otherwise."""
        if inactive or not self.is_active():
            return self.definition.to_xml()
        i = self.info()
        perms = self.definition.permissions
        try:
            st = os.stat(self.path)
            perms = Permissions(st.st_mode & 0o777, st.st_uid, st.st_gid,
                                perms.label if perms else None)
        except OSError:
            pass
        return self.definition.to_xml(capacity=i.capacity, allocation=i.allocation,
                                      available=i.available, permissions=perms)

    # --- volumes --------------------------------------------------------------------
    def volumes(self) -> list[Volume]:
        """The pool's volumes sorted by name: regular files (any format, non-images as raw,
        like libvirt), symlinks to them and sub-directories; FIFOs, sockets, devices and
        dangling links are skipped."""
        self._require_active()
        self._check_dir()
        return [Volume(self, name) for name in sorted(os.listdir(self.path))
                if probe_volume(os.path.join(self.path, name)) is not None]

    def volume(self, name: str) -> Volume:
        """The existing volume ``name`` (``virsh vol-*`` lookup by name).

        Raises :class:`PoolError` if the pool is not started, the name is invalid (a path,
        ``.``/``..``) or no such volume exists."""
        self._require_active()
        v = Volume(self, name)
        if probe_volume(v.path) is None:
            raise locking.not_found(name)
        return v

    def _reserve(self, name: str, mode: int) -> tuple[str, int]:
        """Create the volume file exclusively (O_EXCL: two processes cannot both create it)
        and take diskimg's per-volume lock on it; returns (path, locking fd)."""
        validate_volume_name(name)
        self._require_active()
        path = os.path.join(self.path, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, mode)
        except FileExistsError:
            raise PoolError(f"storage volume '{name}' exists already") from None
        except OSError as e:
            raise PoolError(f"cannot create volume '{path}': {e.strerror}") from None
        try:
            locking.lock_volume_fd(fd, True, name)
            if not locking.same_file(fd, path):
                raise PoolError(f"storage volume '{name}' was deleted by another process "
                                "while it was being created")
        except BaseException:
            os.close(fd)
            raise
        return path, fd

    def _backing_path(self, backing: Volume | str) -> str:
        if isinstance(backing, Volume):
            return backing.path
        if "/" not in backing:
            return self.volume(backing).path
        return os.path.abspath(backing)

    def create_volume(self, name: str, capacity: int | str, format: str = "raw", *,
                      allocation: int | str | None = None,
                      backing: Volume | str | None = None, backing_format: str | None = None,
                      options: Mapping[str, Any] | None = None,
                      permissions: Permissions | None = None,
                      encryption: str | None = None, secret: bytes | None = None,
                      prealloc_metadata: bool = False,
                      _fill: Callable[[str], None] | None = None) -> Volume:
        """Create a volume (``virsh vol-create-as``) as libvirt's dir backend does.

        ``capacity``/``allocation`` are bytes or libvirt scaled strings (``10G``, ``1KB``).
        raw: a file of ``capacity`` bytes whose first ``allocation`` bytes (default: all) are
        allocated.  qcow2: compat 0.10 unless ``options`` say otherwise (libvirt's default),
        ``prealloc_metadata`` → preallocation=metadata (falloc when allocation ≥ capacity),
        ``backing`` (a volume, a volume name in this pool, or a path) with its format probed
        when not given, ``encryption="luks"`` with ``secret`` (a raw volume with it is a
        ``luks`` image, as libvirt has qemu-img create it).  vmdk via diskimg's vmdk
        driver.  Permissions default to mode 0600 and the caller's owner and group.  The
        name is reserved with an exclusive create and the volume stays under diskimg's
        per-volume lock until it is complete (``_fill``, internal, copies data in under
        that lock); on failure nothing is left behind.
        """
        cap = parse_scaled(capacity) if isinstance(capacity, str) else int(capacity)
        alloc = (cap if allocation is None else
                 parse_scaled(allocation) if isinstance(allocation, str) else int(allocation))
        if cap < 0 or alloc < 0:
            raise PoolError("invalid argument: negative size")
        if format not in create.CREATE_FORMATS:
            raise PoolError(f"Operation not supported: diskimg cannot create '{format}' "
                            f"volumes (raw, qcow2, vmdk)")
        if backing is not None and format == "raw":
            raise PoolError("Operation not supported: backing storage not supported for raw "
                            "volumes")
        if encryption is not None:
            if format not in ("qcow2", "raw") or encryption not in ("luks", "default"):
                raise PoolError("Operation not supported: only qcow2 and raw volumes with "
                                "LUKS encryption can be created")
            if not secret:
                raise PoolError("invalid argument: an encrypted volume needs a secret")
        perms = permissions or Permissions()
        mode = perms.mode if perms.mode is not None else create.DEFAULT_VOLUME_MODE
        bpath = bfmt = None
        if backing is not None:
            bpath = self._backing_path(backing)
            bfmt = backing_format
            if bfmt is None:
                bp = probe_volume(bpath)
                if bp is None:
                    raise PoolError(f"Storage volume not found: backing store '{bpath}' "
                                    "does not exist")
                bfmt = bp.format
        path, fd = self._reserve(name, mode)
        try:
            if format == "raw" and encryption is None:
                create.create_raw(path, cap, alloc)
            elif format == "raw":
                # libvirt: qemu-img create -f luks, a LUKS header before the raw payload
                api.create(path, "luks", -(-cap // 1024) * 1024,
                           options={"key-secret": "sec0"},
                           secrets={"sec0": secret})  # type: ignore[dict-item]
            else:
                opts = dict(options or {})
                secrets: dict[str, bytes] = {}
                size_arg = -(-cap // 1024) * 1024  # libvirt passes "%lluK", rounded up
                if format == "qcow2":
                    opts.setdefault("compat", "0.10")
                    if prealloc_metadata:
                        opts.setdefault("preallocation",
                                        "metadata" if alloc < cap else "falloc")
                    if encryption is not None:
                        opts["encrypt.format"] = "luks"
                        opts["encrypt.key-secret"] = "sec0"
                        secrets["sec0"] = secret  # type: ignore[assignment]
                api.create(path, format, size_arg, backing_file=bpath, backing_fmt=bfmt,
                           options=opts, secrets=secrets)
            if _fill is not None:
                _fill(path)
            os.chmod(path, mode)
            if perms.owner not in (None, -1) or perms.group not in (None, -1):
                os.chown(path, -1 if perms.owner is None else perms.owner,
                         -1 if perms.group is None else perms.group)
        except BaseException as e:
            locking.unlink_if_same(fd, path)
            if isinstance(e, OSError):
                raise PoolError(f"cannot create volume '{path}': {e.strerror or e}") from e
            raise
        finally:
            os.close(fd)
        return Volume(self, name)

    def create_volume_xml(self, xml: str | bytes | VolumeDef, *,
                          secrets: Mapping[str, bytes] | None = None,
                          prealloc_metadata: bool = False) -> Volume:
        """Create a volume from libvirt volume XML (``virsh vol-create``).  qcow2 compat is
        0.10 when absent, 1.1 when ``<features>`` is present (libvirt's rule); clusterSize,
        lazy_refcounts and backingStore are honoured; ``secrets`` maps the secret UUIDs of
        ``<encryption>`` to passphrases."""
        vd = xml if isinstance(xml, VolumeDef) else VolumeDef.from_xml(xml)
        fmt, kw = create.def_args(vd, secrets)
        return self.create_volume(vd.name, vd.capacity or 0, fmt,
                                  prealloc_metadata=prealloc_metadata, **kw)

    def create_volume_from(self, xml: str | bytes | VolumeDef, source: Volume, *,
                           secrets: Mapping[str, bytes] | None = None,
                           prealloc_metadata: bool = False,
                           progress: ProgressFn | None = None) -> Volume:
        """Create a volume from XML and fill it with ``source``'s guest data, converting
        between formats (``virsh vol-create-from``); the new capacity is at least the
        source's.  Backing chains are flattened into the copy.  ``progress`` gets the
        copy's percentages as :func:`diskimg.convert` reports them."""
        vd = xml if isinstance(xml, VolumeDef) else VolumeDef.from_xml(xml)
        with source._op_lock(exclusive=False):  # the source stays whole while it is copied
            src = source.definition()
            if src.type != "file":
                raise PoolError("unsupported: copying a directory volume")
            if src.encryption is not None:
                raise PoolError("unsupported: copying from an encrypted volume")
            fmt, kw = create.def_args(vd, secrets)
            kw.pop("backing", None)
            kw.pop("backing_format", None)
            kw["allocation"] = 0
            cap = max(vd.capacity or 0, src.capacity or 0)
            secret = kw.get("secret")
            # read with QEMU's read lock, as libvirt's qemu-img convert does: the disk of a
            # running VM is refused before the new volume is made, not copied half-written
            try:
                sdev = api.open(source.path, "r", src.format or "raw")
            except ImageLockedError as e:
                raise source._in_use(e, forcible=False) from None

            def fill(path: str) -> None:
                create.copy_guest_data(sdev, path, fmt, secret, progress)

            with sdev:
                return self.create_volume(vd.name, cap, fmt,
                                          prealloc_metadata=prealloc_metadata, _fill=fill,
                                          **kw)

    def clone_volume(self, source: Volume | str, new_name: str, **kw: Any) -> Volume:
        """Copy ``source`` (a volume of any pool, or a name in this one) into this pool as
        ``new_name``, like ``virsh vol-clone --pool``; ``kw`` as :meth:`Volume.clone`.
        Raises :class:`PoolError` if ``new_name`` exists or the source is encrypted."""
        src = source if isinstance(source, Volume) else self.volume(source)
        return src.clone(new_name, pool=self, **kw)


__all__ = ["DEFAULT_POOL_MODE", "Pool", "PoolInfo"]
