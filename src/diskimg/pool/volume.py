"""One volume of a dir pool: a regular file (or sub-directory) named by the pool.

Invariants: ``key`` and ``path`` are the absolute path (libvirt's dir backend);
every mutation runs under diskimg's exclusive per-volume lock and, when it writes the file,
QEMU's write lock too (:mod:`diskimg.pool.locking`); reads of the whole file (download,
clone source) hold the shared per-volume lock.  A refused operation changes no byte.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from diskimg import api
from diskimg.errors import ImageLockedError, PoolError
from diskimg.hostio import HostFile, all_zero, open_host_file
from diskimg.ops.common import ProgressFn
from diskimg.pool import locking, wipe
from diskimg.pool.create import CHUNK, CREATE_FORMATS
from diskimg.pool.paths import validate_volume_name
from diskimg.pool.probe import Probed, probe_volume
from diskimg.pool.xml import (
    BackingStore,
    Encryption,
    Permissions,
    Timestamps,
    VolumeDef,
    format_element,
)

if TYPE_CHECKING:
    from diskimg.pool.pool import Pool


@dataclass(frozen=True)
class VolumeInfo:
    """``virsh vol-info``: type (file, dir), capacity, allocation (and physical) in bytes."""

    type: str
    capacity: int
    allocation: int
    physical: int


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

    def _probe(self) -> Probed:
        p = probe_volume(self.path)
        if p is None:
            raise locking.not_found(self.name)
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
            raise locking.not_found(self.name) from None
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

    # --- locks ----------------------------------------------------------------------
    def _op_lock(self, exclusive: bool = True) -> contextlib.AbstractContextManager[int]:
        """diskimg's per-volume lock (:func:`locking.op_lock`) on this volume's file."""
        return locking.op_lock(self.path, self.name, exclusive)

    def _in_use(self, e: ImageLockedError, forcible: bool = True) -> ImageLockedError:
        """QEMU's lock refusal, naming this volume (:func:`locking.in_use`)."""
        return locking.in_use(e, self.path, self.name, self.pool.name, forcible)

    @contextlib.contextmanager
    def _locked(self, force: bool) -> Iterator[HostFile]:
        """Both locks: diskimg's exclusive per-volume lock, then QEMU's write lock bytes."""
        with self._op_lock(), locking.qemu_locked(self.path, self.name, self.pool.name,
                                                  force) as host:
            yield host

    def _is_dir(self) -> bool:
        return os.path.isdir(self.path) and not os.path.islink(self.path)

    # --- mutations ------------------------------------------------------------------
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
                raise locking.not_found(self.name) from None

    def wipe(self, algorithm: str = "zero", *, force: bool = False,
             secrets: Mapping[str, bytes] | None = None,
             progress: ProgressFn | None = None) -> None:
        """Overwrite the volume's data (``virsh vol-wipe``).

        ``zero`` writes zeros; ``random`` and scrub's pattern algorithms (nnsa, dod, bsi,
        gutmann, schneier, pfitzner7, pfitzner33) overwrite the whole host file with their
        passes (nnsa and dod read the last pass back); ``trim`` discards (punches holes).
        A non-raw volume's whole file, metadata included, is overwritten and then an empty
        image of the same format, capacity and options is created in it, so the volume stays
        usable (libvirt leaves a file of zeros that then probes as raw).  ``progress`` gets
        the percentage of the passes written (0 first, 100 last).
        """
        wipe.check_algorithm(algorithm)
        self.pool._require_active()
        if self._is_dir():
            raise PoolError("unsupported: wiping a volume of type 'dir'")
        with self._op_lock():
            d = self.definition()
            recreate = wipe.check_recreatable(d, self.path)
            with locking.qemu_locked(self.path, self.name, self.pool.name, force) as host:
                wipe.wipe_host(host, algorithm, progress)
                if recreate:  # made while ``host`` holds the lock: nobody opens it between
                    os.ftruncate(host.fd, 0)
                    wipe.recreate(self.path, d, secrets)

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
        if d.format == "raw" and d.encryption is not None:
            # a luks image: truncating it as raw bytes would cut the payload short (its
            # LUKS header comes first); resize it with its key (diskimg resize
            # --image-opts driver=luks,key-secret=...)
            raise PoolError("Operation not supported: resizing a LUKS-encrypted raw volume "
                            "needs its secret; use 'diskimg resize --object secret,... "
                            "--image-opts driver=luks,key-secret=...'")
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
                dev.resize(new, shrink=shrink)
        return new

    def _check_transfer(self, offset: int, length: int, what: str) -> None:
        """Refuse an upload/download (``what``: how the refusal names it) outside a started
        pool, with a negative range, or of a directory volume."""
        self.pool._require_active()
        if offset < 0 or length < 0:
            raise PoolError("invalid argument: offset and length must not be negative")
        if self._probe().type != "file":
            raise PoolError(f"unsupported: {what} a directory volume")

    def upload(self, src: BinaryIO, offset: int = 0, length: int = 0, *,
               sparse: bool = False, force: bool = False,
               progress: ProgressFn | None = None) -> int:
        """Write bytes from file object ``src`` into the volume file at ``offset``
        (``virsh vol-upload``); ``length`` 0 = until ``src`` ends.  Like libvirt, this works
        on the host file: uploading a qcow2 image makes the volume that image.  ``sparse``
        punches holes for zero blocks instead of writing them.  ``progress`` gets the
        percentage of ``length`` (else of what is left of ``src``, a regular file) written
        after each chunk, 0 first and 100 last.  Returns bytes written."""
        from diskimg.ops.chain import _progress_steps

        self._check_transfer(offset, length, "uploading into")
        written = 0
        step = _progress_steps(progress, length or _remaining(src))
        if progress is not None:
            progress(0.0)
        with self._locked(force) as host:
            while length == 0 or written < length:
                want = CHUNK if length == 0 else min(CHUNK, length - written)
                buf = src.read(want)
                if not buf:
                    break
                pos = offset + written
                if sparse and all_zero(buf):
                    end = pos + len(buf)
                    if os.fstat(host.fd).st_size < end:
                        os.ftruncate(host.fd, end)
                    if not host.punch_hole(pos, len(buf)):
                        host.pwrite(pos, buf)
                else:
                    host.pwrite(pos, buf)
                written += len(buf)
                step(written)
            host.flush()
        if progress is not None and not written:
            progress(100.0)
        return written

    def download(self, dst: BinaryIO, offset: int = 0, length: int = 0, *,
                 sparse: bool = False, progress: ProgressFn | None = None) -> int:
        """Copy the volume file's bytes from ``offset`` (``length`` 0 = to the end) into file
        object ``dst`` (``virsh vol-download``).  With ``sparse`` zero blocks become holes
        (``dst`` must then be seekable).  ``progress`` gets the percentage copied after
        each chunk, 0 first and 100 last.  Returns bytes copied."""
        from diskimg.ops.chain import _progress_steps

        self._check_transfer(offset, length, "downloading")
        if progress is not None:
            progress(0.0)
        copied = 0
        hole_end = None
        with self._op_lock(exclusive=False), \
                open_host_file(self.path, False, lock_mode=False) as host:
            size = host.size()
            end = size if length == 0 else min(size, offset + length)
            step = _progress_steps(progress, end - offset)
            pos = offset
            while pos < end:
                buf = host.pread(pos, min(CHUNK, end - pos))
                if not buf:
                    break
                if sparse and all_zero(buf):
                    dst.seek(len(buf), io.SEEK_CUR)
                    hole_end = dst.tell()
                else:
                    dst.write(buf)
                    hole_end = None
                pos += len(buf)
                copied += len(buf)
                step(copied)
        if hole_end is not None:
            dst.truncate(hole_end)
        dst.flush()
        if progress is not None and not copied:
            progress(100.0)
        return copied

    def clone(self, new_name: str, *, pool: Pool | None = None, format: str | None = None,
              **kw: Any) -> Volume:
        """Copy this volume to ``new_name`` (in ``pool``, default this pool), like
        ``virsh vol-clone``: same format (unless ``format``), capacity and permissions.
        ``kw`` as :meth:`Pool.create_volume_from` (``prealloc_metadata``, ``progress``)."""
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


def _remaining(src: BinaryIO) -> int:
    """Bytes left to read in ``src`` when it is a regular file, else 0 (unknown)."""
    try:
        st = os.fstat(src.fileno())
        return max(0, st.st_size - src.tell()) if stat.S_ISREG(st.st_mode) else 0
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return 0


__all__ = ["Volume", "VolumeInfo"]
