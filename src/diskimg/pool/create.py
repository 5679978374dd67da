"""Making a volume file: the formats the pool can create, raw files with libvirt's
allocation, the image options a ``<volume>`` definition asks for, and filling a new volume
with another image's guest data.

Invariant: nothing here picks a file name or takes a lock; the caller (:class:`Pool`) has
reserved the name with an exclusive create and holds the volume's lock while these run.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, PoolError
from diskimg.ops.common import ProgressFn
from diskimg.pool.xml import VolumeDef

#: the formats a pool volume can be created in (and re-created in after a wipe)
CREATE_FORMATS = ("raw", "qcow2", "vmdk")
DEFAULT_VOLUME_MODE = 0o600
#: bytes per read/write of a volume's data (upload, download, wipe passes, raw fill)
CHUNK = 1 << 20


def check_can_create(fmt: str) -> None:
    """Refuse early (before destroying anything) when diskimg cannot create ``fmt``."""
    if fmt in ("raw", "qcow2"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            api.create(os.path.join(tmp, "probe"), fmt, 1 << 20)
        except DiskImgError as e:
            raise PoolError(f"unsupported: diskimg cannot create {fmt} images here: {e}") from e


def qcow2_options(vd: VolumeDef) -> dict[str, Any]:
    """The qcow2 creation options of ``vd``: compat 0.10 unless given, 1.1 when
    ``<features>`` is present (libvirt's rule), lazy_refcounts and cluster size."""
    opts: dict[str, Any] = {"compat": vd.compat or ("1.1" if vd.features is not None
                                                    else "0.10")}
    if vd.features and "lazy_refcounts" in vd.features:
        opts["lazy_refcounts"] = "on"
    if vd.cluster_size:
        opts["cluster_size"] = vd.cluster_size
    return opts


def def_args(vd: VolumeDef, secrets: Mapping[str, bytes] | None) -> tuple[str, dict[str, Any]]:
    """(format, keyword arguments of :meth:`Pool.create_volume`) for the definition ``vd``;
    ``secrets`` maps ``<encryption>`` secret UUIDs to passphrases."""
    fmt = vd.format or "raw"
    if vd.capacity is None:
        raise PoolError("XML error: missing capacity element")
    kw: dict[str, Any] = {"allocation": vd.allocation, "permissions": vd.permissions}
    opts: dict[str, Any] = {}
    if fmt == "qcow2":
        opts = qcow2_options(vd)
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


def create_raw(path: str, capacity: int, allocation: int) -> None:
    """Make the existing empty file ``path`` a raw volume of ``capacity`` bytes whose first
    ``allocation`` bytes are allocated (fallocate, else written zeros)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        alloc = min(allocation, capacity)
        if alloc:
            try:
                os.posix_fallocate(fd, 0, alloc)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zero = bytes(min(CHUNK, alloc))
                pos = 0
                while pos < alloc:
                    pos += os.pwrite(fd, zero[: alloc - pos], pos)
        os.ftruncate(fd, capacity)
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_guest_data(src: BlockDevice, dst: str, dst_fmt: str, secret: bytes | None,
                    progress: ProgressFn | None = None) -> None:
    """Copy the guest bytes of the open image ``src`` into the existing image ``dst``
    (``progress``: :func:`diskimg.convert`'s percentages)."""
    from diskimg.ops.convert import convert

    if secret and dst_fmt == "raw":
        dst_fmt = "luks"  # an encrypted raw volume (Pool.create_volume)
    key = "key-secret" if dst_fmt == "luks" else "encrypt.key-secret"
    opts = {key: "sec0"} if secret else None
    secrets = {"sec0": secret} if secret else None
    convert(src, dst, dst_fmt, target_exists=True, secrets=secrets, target_options=opts,
            progress=progress)


__all__ = [
    "CHUNK",
    "CREATE_FORMATS",
    "DEFAULT_VOLUME_MODE",
    "check_can_create",
    "copy_guest_data",
    "create_raw",
    "def_args",
    "qcow2_options",
]
