"""The two locks a pool operation takes on a volume file, and the words for a refusal.

1. diskimg's per-volume lock: an OFD byte-range lock on :data:`VOLUME_LOCK_BYTE` of the
   volume file itself, outside QEMU's lock bytes (100-299), so it works across processes
   (and across hosts on NFS/GlusterFS) with no extra file in the pool directory.  Exclusive
   while a volume is created, filled, deleted, wiped, resized or uploaded to; shared while
   it is read whole (clone/create-from source, download).  Waits are bounded
   (:data:`LOCK_TIMEOUT`): OFD locks have no deadlock detection.
2. QEMU's write lock bytes, through :func:`diskimg.hostio.open_host_file`, so the disk of a
   running VM is refused (:class:`ImageLockedError` naming the volume) unless forced.

Invariant: after the wait for lock 1 the name must still refer to the locked file, else
the operation reports "not found" and touches nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator

from diskimg.errors import ImageLockedError, PoolError
from diskimg.hostio import HostFile, open_host_file
from diskimg.hostio.lock import _SETLK, _fcntl

VOLUME_LOCK_BYTE = 300
#: Seconds to wait for another diskimg process's per-volume lock before giving up.
LOCK_TIMEOUT = 60.0


def not_found(name: str) -> PoolError:
    """libvirt's wording for a volume name that names nothing."""
    return PoolError(f"Storage volume not found: no storage vol with matching name '{name}'")


def lock_volume_fd(fd: int, exclusive: bool, name: str) -> None:
    """Take diskimg's per-volume lock on ``fd``, waiting up to :data:`LOCK_TIMEOUT` seconds
    (polling: OFD locks have no deadlock detection, so never block without a bound)."""
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    deadline = time.monotonic() + LOCK_TIMEOUT
    delay = 0.001
    while True:
        try:
            _fcntl(fd, _SETLK, ltype, VOLUME_LOCK_BYTE)
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


def same_file(fd: int, path: str) -> bool:
    """True if ``path`` still names the file open as ``fd`` (not deleted or replaced)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def unlink_if_same(fd: int, path: str) -> None:
    """Remove ``path`` only if it is still the file we created (never someone else's)."""
    if same_file(fd, path):
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def op_lock(path: str, name: str, exclusive: bool = True) -> Iterator[int]:
    """Hold diskimg's per-volume lock on the regular file ``path`` (volume ``name``); after
    the wait, the name must still refer to the same file (else "not found").  Yields the
    locking fd, which is open read-write when ``exclusive``."""
    flags = (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise not_found(name) from None
    except OSError as e:
        raise PoolError(f"cannot open volume '{name}': {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PoolError(f"volume '{name}' is not a regular file")
        lock_volume_fd(fd, exclusive, name)
        if not same_file(fd, path):
            raise not_found(name)
        yield fd
    finally:
        os.close(fd)


def in_use(e: ImageLockedError, path: str, name: str, pool: str,
           forcible: bool = True) -> ImageLockedError:
    """QEMU's lock refusal for volume ``name`` of ``pool``: a line naming the volume (and,
    if ``forcible``, the way out), then qemu-img's own two lines, which libvirt relays when
    its qemu-img call is refused."""
    why = str(e) or "Failed to get \"write\" lock"
    if not why.startswith("Could not open '"):
        why = f"Could not open '{path}': {why}"
    way_out = "; force=True (virsh option --force) overrides" if forcible else ""
    return ImageLockedError(
        f"storage volume '{name}' in pool '{pool}' is in use by another "
        f"process{way_out}\n{why}")


@contextlib.contextmanager
def qemu_locked(path: str, name: str, pool: str, force: bool) -> Iterator[HostFile]:
    """Hold QEMU's write lock bytes on ``path`` (so a running VM's image is not touched);
    refused with :func:`in_use`'s error unless ``force``."""
    try:
        host = open_host_file(path, True, lock_mode=not force)
    except ImageLockedError as e:
        raise in_use(e, path, name, pool) from None
    try:
        yield host
    finally:
        host.close()


__all__ = [
    "LOCK_TIMEOUT",
    "VOLUME_LOCK_BYTE",
    "in_use",
    "lock_volume_fd",
    "not_found",
    "op_lock",
    "qemu_locked",
    "same_file",
    "unlink_if_same",
]
