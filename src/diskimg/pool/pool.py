"""libvirt-compatible directory storage pools and their volumes, without libvirtd.

A :class:`Pool` is a directory; each regular file (or sub-directory) in it is a
:class:`Volume`.  Pool definitions are libvirt ``<pool>`` XML files kept by a
:class:`PoolRegistry` in a config directory (libvirt's layout: ``NAME.xml`` plus
``autostart/NAME.xml`` symlinks), so the registry can also read the definitions libvirt
keeps in ``/etc/libvirt/storage`` when pointed there.  Whether a pool is started is kept in
a separate state directory (never inside ``/etc/libvirt``).

The pool only maps names to files and calls diskimg's image API (create, open, convert);
formats are detected with :mod:`diskimg.probe`, never trusted from a file name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, ImageLockedError, PoolError
from diskimg.hostio import open_host_file
from diskimg.pool.xml import (
    CONFIG_WARNING,
    BackingStore,
    Encryption,
    Permissions,
    PoolDef,
    Timestamps,
    VolumeDef,
    format_element,
    parse_scaled,
    validate_pool_name,
    validate_volume_name,
)
from diskimg.probe import PROBE_SIZE, probe_bytes

LIBVIRT_SYSTEM_DIR = Path("/etc/libvirt/storage")
LIBVIRT_SYSTEM_STATE = Path("/run/libvirt/storage")
DEFAULT_VOLUME_MODE = 0o600
DEFAULT_POOL_MODE = 0o711
CREATE_FORMATS = ("raw", "qcow2", "vmdk")
_CHUNK = 1 << 20

#: libvirt's names for the foreign formats diskimg's probe recognises.
_LIBVIRT_FORMAT = {"vpc": "vpc", "vdi": "vdi", "bochs": "bochs", "cloop": "cloop",
                   "dmg": "dmg", "qcow": "qcow"}

#: virsh vol-wipe algorithms → list of passes ("random", or a byte pattern repeated);
#: the bool says whether the last pass is read back and verified (scrub's "verify").
_G = [bytes([b]) for b in (0x55, 0xAA)] + [
    bytes.fromhex(h) for h in ("924924", "492492", "249249")] + [
    bytes([b]) for b in range(0x00, 0x100, 0x11)] + [
    bytes.fromhex(h) for h in ("924924", "492492", "249249", "6db6db", "b6db6d", "db6db6")]
WIPE_ALGORITHMS: dict[str, tuple[list[bytes | str], bool]] = {
    "zero": ([b"\x00"], False),
    "nnsa": (["random", "random", b"\x00"], True),
    "dod": (["random", b"\x00", b"\xff"], True),
    "bsi": ([bytes([b]) for b in (0xFF, 0xFE, 0xFD, 0xFB, 0xF7, 0xEF, 0xDF, 0xBF, 0x7F)],
            False),
    "gutmann": (["random"] * 4 + _G + ["random"] * 4, False),
    "schneier": ([b"\x00", b"\xff"] + ["random"] * 5, False),
    "pfitzner7": (["random"] * 7, False),
    "pfitzner33": (["random"] * 33, False),
    "random": (["random"], False),
    "trim": ([], False),
}


# --- where definitions live -----------------------------------------------------------------

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
    """Where "pool is started" markers live: ``$DISKIMG_POOL_STATE_DIR``, else
    ``$XDG_STATE_HOME/diskimg/pool-state/<hash of the config dir>``."""
    if os.environ.get("DISKIMG_POOL_STATE_DIR"):
        return Path(os.environ["DISKIMG_POOL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "state")
    digest = hashlib.sha256(os.fsencode(os.path.abspath(config_dir))).hexdigest()[:16]
    return Path(base) / "diskimg" / "pool-state" / digest


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
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


# --- per-volume locks -----------------------------------------------------------------------

#: diskimg's per-volume lock: an OFD byte-range lock on this byte of the volume file itself,
#: outside QEMU's lock bytes (100-299), so it works across processes (and across hosts on
#: NFS/GlusterFS) without any extra file in the pool directory.  Exclusive while a volume is
#: created, filled, deleted, wiped, resized or uploaded to; shared while it is read whole
#: (clone/create-from source, download).
VOLUME_LOCK_BYTE = 300
#: Seconds to wait for another diskimg process's per-volume lock before giving up.
LOCK_TIMEOUT = 60.0
_FLOCK = struct.Struct("hhqqi4x")
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _lock_volume_fd(fd: int, exclusive: bool, name: str) -> None:
    """Take diskimg's per-volume lock on ``fd``, waiting up to :data:`LOCK_TIMEOUT` seconds
    (polling: OFD locks have no deadlock detection, so never block without a bound)."""
    arg = _FLOCK.pack(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, 0, VOLUME_LOCK_BYTE, 1, 0)
    deadline = time.monotonic() + LOCK_TIMEOUT
    delay = 0.001
    while True:
        try:
            fcntl.fcntl(fd, _OFD_SETLK, arg)
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return  # no byte-range locks on this filesystem: nothing to coordinate with
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise PoolError(f"storage volume '{name}' is busy: another diskimg process has "
                            f"held its lock for {LOCK_TIMEOUT:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _same_file(fd: int, path: str) -> bool:
    """True if ``path`` still names the file open as ``fd`` (not deleted or replaced)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _unlink_if_same(fd: int, path: str) -> None:
    """Remove ``path`` only if it is still the file we created (never someone else's)."""
    if _same_file(fd, path):
        with contextlib.suppress(OSError):
            os.unlink(path)


# --- info records ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolInfo:
    """``virsh pool-info``: state is ``running`` or ``inactive``; sizes 0 when inactive."""

    state: str
    capacity: int
    allocation: int
    available: int


@dataclass(frozen=True)
class VolumeInfo:
    """``virsh vol-info``: type (file, dir), capacity, allocation (and physical) in bytes."""

    type: str
    capacity: int
    allocation: int
    physical: int


@dataclass
class _Probed:
    type: str
    format: str
    capacity: int
    allocation: int
    physical: int | None
    compat: str | None = None
    cluster_size: int | None = None
    features: list[str] | None = None
    encryption: str | None = None
    backing: str | None = None
    backing_format: str | None = None


def _iso_probe(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0x8001)
            return f.read(5) == b"CD001"
    except OSError:
        return False


def _vmdk_capacity(path: str, head: bytes) -> int | None:
    """Virtual size of a vmdk from its sparse header or descriptor (fallback when diskimg's
    vmdk driver cannot open it)."""
    if head[:4] == b"KDMV" and len(head) >= 20:
        return int.from_bytes(head[12:20], "little") * 512
    text = head.decode("latin-1", "replace")
    total = 0
    found = False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("RW", "RDONLY", "NOACCESS") and parts[1].isdigit():
            total += int(parts[1]) * 512
            found = True
    return total if found else None


def probe_volume(path: str) -> _Probed | None:
    """What libvirt's refresh learns about one directory entry; None = not a volume."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # dangling symlink, vanished, unreadable directory entry
    if stat.S_ISDIR(st.st_mode):
        return _Probed("dir", "dir", 0, 0, None)
    if not stat.S_ISREG(st.st_mode):
        return None  # FIFOs, sockets and devices are never opened
    physical = st.st_size
    allocation = st.st_blocks * 512
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_SIZE)
    except OSError:
        return None  # libvirt skips files it cannot open
    fmt = probe_bytes(head)
    if fmt not in ("qcow2", "vmdk", "raw"):
        return _Probed("file", _LIBVIRT_FORMAT.get(fmt, "raw"), physical, allocation, physical)
    if fmt == "raw":
        p = _Probed("file", "iso" if _iso_probe(path) else "raw", physical, allocation,
                    physical)
        if head[:6] == b"LUKS\xba\xbe":
            p.encryption = "luks"
        return p
    p = _Probed("file", fmt, physical, allocation, physical)
    try:
        with api.open(path, "r", fmt, backing=False, force_share=True) as dev:
            info = dev.info()
    except Exception:
        if fmt == "vmdk":
            cap = _vmdk_capacity(path, head)
            if cap is not None:
                p.capacity = cap
        return p
    p.capacity = info.virtual_size
    if fmt == "qcow2":
        p.cluster_size = info.cluster_size
        data = (info.format_specific or {}).get("data", {})
        if data.get("compat") == "1.1":
            p.compat = "1.1"
            p.features = ["lazy_refcounts"] if data.get("lazy-refcounts") else []
        enc = data.get("encrypt")
        if info.encrypted:
            p.encryption = "luks" if (enc or {}).get("format") == "luks" else "qcow"
    if info.backing_filename:
        full = info.full_backing_filename or info.backing_filename
        p.backing = os.path.normpath(os.path.join(os.path.dirname(path), full))
        p.backing_format = info.backing_filename_format
    return p


# --- volumes --------------------------------------------------------------------------------

class Volume:
    """One volume (a file or directory) of a pool.  ``key`` and ``path`` are the absolute
    path, as libvirt's dir backend uses."""

    def __init__(self, pool: Pool, name: str) -> None:
        validate_volume_name(name)
        self.pool = pool
        self.name = name
        self.path = os.path.join(pool.path, name)

    def __repr__(self) -> str:
        return f"<Volume {self.name!r} in pool {self.pool.name!r}>"

    @property
    def key(self) -> str:
        """libvirt's volume key: the absolute path, as the dir backend uses."""
        return self.path

    def _probe(self) -> _Probed:
        p = probe_volume(self.path)
        if p is None:
            raise PoolError(f"Storage volume not found: no storage vol with matching name "
                            f"'{self.name}'")
        return p

    @property
    def format(self) -> str:
        """Detected format (raw, qcow2, vmdk, dir, iso, ...)."""
        return self._probe().format

    def info(self) -> VolumeInfo:
        """``virsh vol-info``: type, capacity (virtual size), allocation (host bytes in
        use) and physical size, all in bytes.  Raises :class:`PoolError` if the volume is
        gone."""
        p = self._probe()
        return VolumeInfo(p.type, p.capacity, p.allocation,
                          p.physical if p.physical is not None else 0)

    def definition(self) -> VolumeDef:
        """The volume as a :class:`VolumeDef` filled from the file (what vol-dumpxml prints)."""
        p = self._probe()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._not_found() from None
        v = VolumeDef(name=self.name, type=p.type, key=self.key, capacity=p.capacity,
                      allocation=p.allocation, physical=p.physical, path=self.path,
                      format=p.format,
                      permissions=Permissions(st.st_mode & 0o7777 if p.type == "dir"
                                              else st.st_mode & 0o777, st.st_uid, st.st_gid),
                      timestamps=Timestamps.from_stat(st))
        if p.encryption:
            v.encryption = Encryption(p.encryption)  # the secret's UUID is not in the file
        v.compat = p.compat
        v.cluster_size = p.cluster_size
        v.features = p.features
        if p.backing:
            b = BackingStore(p.backing, p.backing_format)
            try:
                bst = os.stat(p.backing)
            except OSError:
                pass
            else:
                b.permissions = Permissions(bst.st_mode & 0o777, bst.st_uid, bst.st_gid)
                b.timestamps = Timestamps.from_stat(bst)
                if b.format is None:
                    bp = probe_volume(p.backing)
                    b.format = bp.format if bp else None
            v.backing = b
        return v

    def to_xml(self) -> str:
        """Volume XML as ``virsh vol-dumpxml`` prints it for a dir pool (libvirt 9)."""
        return format_element(self.definition().to_element())

    # --- mutations ------------------------------------------------------------------
    def _not_found(self) -> PoolError:
        return PoolError(f"Storage volume not found: no storage vol with matching name "
                         f"'{self.name}'")

    @contextlib.contextmanager
    def _op_lock(self, exclusive: bool = True) -> Iterator[int]:
        """Hold diskimg's per-volume lock (see :data:`VOLUME_LOCK_BYTE`) on the volume file;
        after the wait, the name must still refer to the same file (else "not found").
        Yields the locking fd, which is open read-write when ``exclusive``."""
        flags = (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise self._not_found() from None
        except OSError as e:
            raise PoolError(f"cannot open volume '{self.name}': {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PoolError(f"volume '{self.name}' is not a regular file")
            _lock_volume_fd(fd, exclusive, self.name)
            if not _same_file(fd, self.path):
                raise self._not_found()
            yield fd
        finally:
            os.close(fd)

    def _in_use(self, e: ImageLockedError, forcible: bool = True) -> ImageLockedError:
        """QEMU's lock refusal: a line naming the volume (and, if ``forcible``, the way
        out), then qemu-img's own two lines, which libvirt relays when its qemu-img call is
        refused."""
        why = str(e) or "Failed to get \"write\" lock"
        if not why.startswith("Could not open '"):
            why = f"Could not open '{self.path}': {why}"
        way_out = "; force=True (virsh option --force) overrides" if forcible else ""
        return ImageLockedError(
            f"storage volume '{self.name}' in pool '{self.pool.name}' is in use by another "
            f"process{way_out}\n{why}")

    @contextlib.contextmanager
    def _qemu_locked(self, force: bool) -> Iterator[Any]:
        """Hold QEMU's write lock bytes (so a running VM's image is not touched); refused
        with :class:`ImageLockedError` naming the volume unless ``force``."""
        try:
            host = open_host_file(self.path, True, lock_mode=not force)
        except ImageLockedError as e:
            raise self._in_use(e) from None
        try:
            yield host
        finally:
            host.close()

    @contextlib.contextmanager
    def _locked(self, force: bool) -> Iterator[Any]:
        """Both locks: diskimg's exclusive per-volume lock, then QEMU's write lock bytes."""
        with self._op_lock(), self._qemu_locked(force) as host:
            yield host

    def _is_dir(self) -> bool:
        return os.path.isdir(self.path) and not os.path.islink(self.path)

    def delete(self, *, force: bool = False) -> None:
        """Remove the volume file (or empty directory).  Waits for other diskimg processes
        working on it; refused while another process (QEMU) holds the image's lock, unless
        ``force``."""
        self.pool._require_active()
        self._probe()
        if self._is_dir():
            try:
                os.rmdir(self.path)
            except OSError as e:
                raise PoolError(f"cannot remove directory '{self.path}': {e.strerror}") from None
            return
        with self._locked(force):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                raise self._not_found() from None

    def wipe(self, algorithm: str = "zero", *, force: bool = False,
             secrets: Mapping[str, bytes] | None = None) -> None:
        """Overwrite the volume's data (``virsh vol-wipe``).

        ``zero`` writes zeros; ``random`` and scrub's pattern algorithms (nnsa, dod, bsi,
        gutmann, schneier, pfitzner7, pfitzner33) overwrite the whole host file with their
        passes (nnsa and dod read the last pass back); ``trim`` discards (punches holes).
        A non-raw volume's whole file, metadata included, is overwritten and then an empty
        image of the same format, capacity and options is created in it, so the volume stays
        usable (libvirt leaves a file of zeros that then probes as raw).
        """
        if algorithm not in WIPE_ALGORITHMS:
            raise PoolError(f"Unsupported wipe algorithm '{algorithm}'; choose one of "
                            f"{', '.join(WIPE_ALGORITHMS)}")
        self.pool._require_active()
        if self._is_dir():
            raise PoolError("unsupported: wiping a volume of type 'dir'")
        with self._op_lock():
            self._wipe(algorithm, force, secrets)

    def _wipe(self, algorithm: str, force: bool, secrets: Mapping[str, bytes] | None) -> None:
        d = self.definition()
        recreate = d.format != "raw"
        if recreate:
            if d.format not in CREATE_FORMATS:
                raise PoolError(f"unsupported: cannot re-create a '{d.format}' volume after "
                                "wiping it")
            if d.encryption is not None:
                raise PoolError("unsupported: wiping an encrypted volume would need its "
                                "secret to re-create it; delete and re-create it instead")
            _check_can_create(d.format)
        passes, verify = WIPE_ALGORITHMS[algorithm]
        with self._qemu_locked(force) as host:
            size = os.fstat(host.fd).st_size
            if algorithm == "trim":
                if not host.punch_hole(0, size):
                    _overwrite(host.fd, size, b"\x00")
                passes = []
            elif algorithm == "zero" and os.fstat(host.fd).st_blocks * 512 < size:
                # libvirt's way for a sparse file: drop every block, keep the size
                os.ftruncate(host.fd, 0)
                os.ftruncate(host.fd, size)
                passes = []
            for i, pattern in enumerate(passes):
                _overwrite(host.fd, size, pattern,
                           verify=verify and i == len(passes) - 1)
            if recreate:
                os.ftruncate(host.fd, 0)
        if recreate:
            opts: dict[str, Any] = {}
            if d.format == "qcow2":
                opts["compat"] = d.compat or "0.10"
                if d.cluster_size:
                    opts["cluster_size"] = d.cluster_size
                if d.features and "lazy_refcounts" in d.features:
                    opts["lazy_refcounts"] = "on"
            b = d.backing
            api.create(self.path, d.format or "raw", d.capacity,
                       backing_file=b.path if b else None,
                       backing_fmt=(b.format or "raw") if b else None,
                       unsafe=b is not None, options=opts, secrets=secrets)

    def resize(self, capacity: int, *, delta: bool = False, shrink: bool = False,
               allocate: bool = False, force: bool = False) -> int:
        """Change the capacity (``virsh vol-resize``); returns the new capacity.

        With ``delta`` the value is added (or with ``shrink`` subtracted).  Shrinking needs
        ``shrink`` and, as in libvirt, cannot go below the current allocation.  ``allocate``
        (raw only) preallocates the new space.
        """
        self.pool._require_active()
        with self._op_lock():
            return self._resize(capacity, delta, shrink, allocate, force)

    def _resize(self, capacity: int, delta: bool, shrink: bool, allocate: bool,
                force: bool) -> int:
        d = self.definition()
        cur = d.capacity or 0
        new = (cur - capacity if shrink else cur + capacity) if delta else capacity
        if new < 0:
            raise PoolError("invalid argument: can't shrink capacity below 0")
        if new < cur and not shrink:
            raise PoolError("invalid argument: Can't shrink capacity below current capacity "
                            "unless shrink flag explicitly specified")
        if shrink and new < (d.allocation or 0):
            raise PoolError("invalid argument: can't shrink capacity below existing "
                            "allocation")
        if allocate:
            if d.format != "raw":
                raise PoolError("Operation not supported: preallocate is only supported "
                                "for raw type volume")
            if new - cur > self.pool.info().available:
                raise PoolError("Not enough space left in storage pool")
        if d.format not in CREATE_FORMATS:
            raise PoolError(f"Operation not supported: resizing a '{d.format}' volume")
        if force and d.format == "raw":
            with open(self.path, "r+b") as f:
                os.ftruncate(f.fileno(), new)
            return new
        try:
            dev = api.open(self.path, "r+", d.format, backing=False, force_share=force)
        except ImageLockedError as e:
            raise self._in_use(e) from None
        with dev:
            if d.format == "raw":
                dev.resize(new, preallocation="falloc" if allocate else "off")
            else:
                fn = getattr(dev, "resize", None)
                if fn is None:
                    raise PoolError(f"Operation not supported: resizing a '{d.format}' "
                                    "volume")
                fn(new, shrink=shrink)
        return new

    def upload(self, src: BinaryIO, offset: int = 0, length: int = 0, *,
               sparse: bool = False, force: bool = False) -> int:
        """Write bytes from file object ``src`` into the volume file at ``offset``
        (``virsh vol-upload``); ``length`` 0 = until ``src`` ends.  Like libvirt, this works
        on the host file: uploading a qcow2 image makes the volume that image.  ``sparse``
        punches holes for zero blocks instead of writing them.  Returns bytes written."""
        self.pool._require_active()
        if offset < 0 or length < 0:
            raise PoolError("invalid argument: offset and length must not be negative")
        if self._probe().type != "file":
            raise PoolError("unsupported: uploading into a directory volume")
        written = 0
        with self._locked(force) as host:
            while length == 0 or written < length:
                want = _CHUNK if length == 0 else min(_CHUNK, length - written)
                buf = src.read(want)
                if not buf:
                    break
                pos = offset + written
                if sparse and _is_zero(buf):
                    end = pos + len(buf)
                    if os.fstat(host.fd).st_size < end:
                        os.ftruncate(host.fd, end)
                    if not host.punch_hole(pos, len(buf)):
                        host.pwrite(pos, buf)
                else:
                    host.pwrite(pos, buf)
                written += len(buf)
            host.flush()
        return written

    def download(self, dst: BinaryIO, offset: int = 0, length: int = 0, *,
                 sparse: bool = False) -> int:
        """Copy the volume file's bytes from ``offset`` (``length`` 0 = to the end) into file
        object ``dst`` (``virsh vol-download``).  With ``sparse`` zero blocks become holes
        (``dst`` must then be seekable).  Returns bytes copied."""
        self.pool._require_active()
        if offset < 0 or length < 0:
            raise PoolError("invalid argument: offset and length must not be negative")
        if self._probe().type != "file":
            raise PoolError("unsupported: downloading a directory volume")
        copied = 0
        hole_end = None
        with self._op_lock(exclusive=False), \
                open_host_file(self.path, False, lock_mode=False) as host:
            size = host.size()
            end = size if length == 0 else min(size, offset + length)
            pos = offset
            while pos < end:
                buf = host.pread(pos, min(_CHUNK, end - pos))
                if not buf:
                    break
                if sparse and _is_zero(buf):
                    dst.seek(len(buf), io.SEEK_CUR)
                    hole_end = dst.tell()
                else:
                    dst.write(buf)
                    hole_end = None
                pos += len(buf)
                copied += len(buf)
        if hole_end is not None:
            dst.truncate(hole_end)
        dst.flush()
        return copied

    def clone(self, new_name: str, *, pool: Pool | None = None, format: str | None = None,
              **kw: Any) -> Volume:
        """Copy this volume to ``new_name`` (in ``pool``, default this pool), like
        ``virsh vol-clone``: same format (unless ``format``), capacity and permissions."""
        target = pool or self.pool
        with self._op_lock(exclusive=False):
            d = self.definition()
            if d.encryption is not None:
                raise PoolError("unsupported: cloning encrypted volumes")
            nd = VolumeDef(name=new_name, capacity=d.capacity, allocation=0,
                           format=format or d.format,
                           permissions=Permissions(d.permissions.mode if d.permissions
                                                   else None))
            if nd.format == "qcow2" and d.format == "qcow2":
                nd.compat = d.compat
                nd.cluster_size = d.cluster_size
                nd.features = d.features
            return target.create_volume_from(nd, self, **kw)


_ZEROS = bytes(_CHUNK)


def _is_zero(buf: bytes) -> bool:
    """True if ``buf`` (at most one chunk) is all zero bytes; a memcmp, not a Python loop."""
    return buf == _ZEROS[: len(buf)]


def _check_can_create(fmt: str) -> None:
    """Refuse early (before destroying anything) when diskimg cannot create ``fmt``."""
    if fmt in ("raw", "qcow2"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            api.create(os.path.join(tmp, "probe"), fmt, 1 << 20)
        except DiskImgError as e:
            raise PoolError(f"unsupported: diskimg cannot create {fmt} images here: {e}") from e


def _overwrite(fd: int, size: int, pattern: bytes | str, verify: bool = False) -> None:
    """One wipe pass over [0, size): random bytes or ``pattern`` repeated from offset 0."""
    if isinstance(pattern, bytes):
        unit = len(pattern)
        chunk = pattern * ((_CHUNK // unit) or 1)
        chunk = chunk[: len(chunk) - len(chunk) % unit]
    pos = 0
    last_random: list[bytes] = []
    while pos < size:
        n = min(size - pos, _CHUNK)
        if pattern == "random":
            buf = os.urandom(n)
            if verify:
                last_random.append(buf)
        else:
            buf = chunk[:n]
        mv = memoryview(buf)
        done = 0
        while done < n:
            done += os.pwrite(fd, mv[done:], pos + done)
        pos += n
    os.fsync(fd)
    if verify:
        pos = 0
        idx = 0
        while pos < size:
            n = min(size - pos, _CHUNK)
            want = last_random[idx] if pattern == "random" else chunk[:n]
            if os.pread(fd, n, pos) != want:
                raise PoolError(f"wipe verification failed at offset {pos}")
            pos += n
            idx += 1


# --- pools ----------------------------------------------------------------------------------

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
        if self.type not in ("dir", "fs", "netfs"):
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
            raise PoolError(f"Storage volume not found: no storage vol with matching name "
                            f"'{name}'")
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
            _lock_volume_fd(fd, True, name)
            if not _same_file(fd, path):
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
        when not given, ``encryption="luks"`` with ``secret``.  vmdk via diskimg's vmdk
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
        if format not in CREATE_FORMATS:
            raise PoolError(f"Operation not supported: diskimg cannot create '{format}' "
                            f"volumes (raw, qcow2, vmdk)")
        if backing is not None and format == "raw":
            raise PoolError("Operation not supported: backing storage not supported for raw "
                            "volumes")
        if encryption is not None:
            if format != "qcow2" or encryption not in ("luks", "default"):
                raise PoolError("Operation not supported: only qcow2 volumes with LUKS "
                                "encryption can be created")
            if not secret:
                raise PoolError("invalid argument: an encrypted volume needs a secret")
        perms = permissions or Permissions()
        mode = perms.mode if perms.mode is not None else DEFAULT_VOLUME_MODE
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
            if format == "raw":
                _create_raw(path, cap, alloc)
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
            _unlink_if_same(fd, path)
            if isinstance(e, OSError):
                raise PoolError(f"cannot create volume '{path}': {e.strerror or e}") from e
            raise
        finally:
            os.close(fd)
        return Volume(self, name)

    def _def_args(self, vd: VolumeDef,
                  secrets: Mapping[str, bytes] | None) -> tuple[str, dict[str, Any]]:
        fmt = vd.format or "raw"
        if vd.capacity is None:
            raise PoolError("XML error: missing capacity element")
        kw: dict[str, Any] = {"allocation": vd.allocation, "permissions": vd.permissions}
        opts: dict[str, Any] = {}
        if fmt == "qcow2":
            compat = vd.compat or ("1.1" if vd.features is not None else "0.10")
            opts["compat"] = compat
            if vd.features and "lazy_refcounts" in vd.features:
                opts["lazy_refcounts"] = "on"
            if vd.cluster_size:
                opts["cluster_size"] = vd.cluster_size
        elif vd.features is not None or vd.compat is not None or vd.cluster_size:
            raise PoolError(f"Operation not supported: compat, clusterSize and features "
                            f"need format qcow2, not '{fmt}'")
        kw["options"] = opts
        if vd.encryption is not None:
            if vd.encryption.secret_uuid is None:
                raise PoolError("XML error: missing encryption secret uuid")
            pw = (secrets or {}).get(vd.encryption.secret_uuid)
            if pw is None:
                raise PoolError(f"Secret not found: no secret with matching uuid "
                                f"'{vd.encryption.secret_uuid}'")
            kw["encryption"] = vd.encryption.format
            kw["secret"] = pw
        if vd.backing is not None:
            kw["backing"] = vd.backing.path
            kw["backing_format"] = vd.backing.format
        return fmt, kw

    def create_volume_xml(self, xml: str | bytes | VolumeDef, *,
                          secrets: Mapping[str, bytes] | None = None,
                          prealloc_metadata: bool = False) -> Volume:
        """Create a volume from libvirt volume XML (``virsh vol-create``).  qcow2 compat is
        0.10 when absent, 1.1 when ``<features>`` is present (libvirt's rule); clusterSize,
        lazy_refcounts and backingStore are honoured; ``secrets`` maps the secret UUIDs of
        ``<encryption>`` to passphrases."""
        vd = xml if isinstance(xml, VolumeDef) else VolumeDef.from_xml(xml)
        fmt, kw = self._def_args(vd, secrets)
        return self.create_volume(vd.name, vd.capacity or 0, fmt,
                                  prealloc_metadata=prealloc_metadata, **kw)

    def create_volume_from(self, xml: str | bytes | VolumeDef, source: Volume, *,
                           secrets: Mapping[str, bytes] | None = None,
                           prealloc_metadata: bool = False) -> Volume:
        """Create a volume from XML and fill it with ``source``'s guest data, converting
        between formats (``virsh vol-create-from``); the new capacity is at least the
        source's.  Backing chains are flattened into the copy."""
        vd = xml if isinstance(xml, VolumeDef) else VolumeDef.from_xml(xml)
        with source._op_lock(exclusive=False):  # the source stays whole while it is copied
            src = source.definition()
            if src.type != "file":
                raise PoolError("unsupported: copying a directory volume")
            if src.encryption is not None:
                raise PoolError("unsupported: copying from an encrypted volume")
            fmt, kw = self._def_args(vd, secrets)
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
                _copy_guest_data(sdev, path, fmt, secret)

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


def _create_raw(path: str, capacity: int, allocation: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        alloc = min(allocation, capacity)
        if alloc:
            try:
                os.posix_fallocate(fd, 0, alloc)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zero = bytes(min(_CHUNK, alloc))
                pos = 0
                while pos < alloc:
                    pos += os.pwrite(fd, zero[: alloc - pos], pos)
        os.ftruncate(fd, capacity)
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_guest_data(src: BlockDevice, dst: str, dst_fmt: str, secret: bytes | None) -> None:
    """Copy the guest bytes of the open image ``src`` into the existing image ``dst``."""
    from diskimg.operations import convert

    opts = {"encrypt.key-secret": "sec0"} if secret else None
    secrets = {"sec0": secret} if secret else None
    convert(src, dst, dst_fmt, target_exists=True, secrets=secrets, target_options=opts)


# --- the registry ---------------------------------------------------------------------------

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
            _write_atomic(f, pool.definition.to_xml())
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
            if (d.target_path and od.target_path and d.type in ("dir", "fs", "netfs")
                    and os.path.normpath(od.target_path) == os.path.normpath(d.target_path)):
                raise PoolError(f"operation failed: Storage source conflict with pool: "
                                f"'{name}'")
        return old[0] if old else None

    def define_xml(self, xml: str | bytes | PoolDef) -> Pool:
        """Store a pool definition (``virsh pool-define``).  Re-defining a pool of the same
        name and UUID updates it; a started pool keeps running with its old definition."""
        d = xml if isinstance(xml, PoolDef) else PoolDef.from_xml(xml)
        if d.target_path is not None and d.type in ("dir", "fs", "netfs"):
            if not os.path.isabs(d.target_path):
                raise PoolError(f"XML error: target path '{d.target_path}' is not absolute")
            d.target_path = os.path.normpath(d.target_path)
        self._check_conflicts(d)
        if d.uuid is None:
            import uuid as uuidlib

            d.uuid = str(uuidlib.uuid4())
        text = CONFIG_WARNING.format(name=d.name) + d.to_xml()
        _write_atomic(self._config_file(d.name), text)
        return Pool(d, self)

    def define(self, name: str, target: str | os.PathLike[str], *, type: str = "dir",
               permissions: Permissions | None = None, uuid: str | None = None) -> Pool:
        """``virsh pool-define-as NAME dir --target PATH``."""
        validate_pool_name(name)
        return self.define_xml(PoolDef(name=name, type=type,
                                       target_path=os.path.abspath(os.fspath(target)),
                                       permissions=permissions, uuid=uuid))

    def create_xml(self, xml: str | bytes | PoolDef, *, build: bool = False) -> Pool:
        """Start a transient pool (``virsh pool-create``): no stored definition."""
        d = xml if isinstance(xml, PoolDef) else PoolDef.from_xml(xml)
        if d.target_path is not None:
            d.target_path = os.path.normpath(os.path.abspath(d.target_path))
        old = self._check_conflicts(d)
        if old is not None:
            raise PoolError(f"operation failed: pool '{d.name}' already exists")
        if d.uuid is None:
            import uuid as uuidlib

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
            if not pool.is_active() or pool.type not in ("dir", "fs", "netfs"):
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


__all__ = [
    "WIPE_ALGORITHMS",
    "Pool",
    "PoolInfo",
    "PoolRegistry",
    "Volume",
    "VolumeInfo",
    "default_config_dir",
    "default_state_dir",
    "libvirt_session_dir",
    "probe_volume",
]
