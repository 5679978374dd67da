"""QEMU-compatible image locking with OFD byte-range locks.

QEMU marks "I hold permission i" with a shared lock on byte ``100 + i`` and "I do not let
others have permission i" with a shared lock on byte ``200 + i``.  Taking permission i
conflicts with anybody's lock on ``200 + i``; refusing permission j conflicts with anybody's
lock on ``100 + j``.  Locks belong to the open file description, so one fd per image.
"""

from __future__ import annotations

import fcntl
import sys

from diskimg.errors import ImageLockedError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200

_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)

#: (held permissions, permissions refused to others) for a read-only and a writable open.
READ_ONLY_PERMS = ({PERM_CONSISTENT_READ}, {PERM_WRITE, PERM_RESIZE})
READ_WRITE_PERMS = ({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE}, {PERM_WRITE, PERM_RESIZE})


def _flock(ltype: int, start: int, length: int) -> bytes:
    """The ``struct flock`` of one lock at ``start`` (``SEEK_SET``, pid 0), as
    ``struct.pack("hhqqi4x", ltype, 0, start, length, 0)`` lays it out (native order and
    alignment: ``l_type``, ``l_whence``, 4 bytes of padding, ``l_start``, ``l_len``,
    ``l_pid``, 4 bytes of padding), made without the struct module (start-up)."""
    order = sys.byteorder
    return b"".join((ltype.to_bytes(2, order, signed=True), bytes(6),
                     start.to_bytes(8, order, signed=True),
                     length.to_bytes(8, order, signed=True), bytes(8)))


def _fcntl(fd: int, cmd: int, ltype: int, byte: int) -> int:
    res = fcntl.fcntl(fd, cmd, _flock(ltype, byte, 1))
    return int.from_bytes(res[:2], sys.byteorder, signed=True)  # l_type


def _unsupported(e: OSError) -> bool:
    """Whether ``e`` says the file system has no OFD locks (nothing to honour then)."""
    import errno  # only a failed lock call gets here (start-up)

    return e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _held_by_other(fd: int, byte: int) -> bool:
    try:
        return _fcntl(fd, _GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
    except OSError as e:
        if _unsupported(e):
            return False  # no OFD locks on this filesystem: nothing to honour
        raise


def acquire(fd: int, name: str, held: set[int], refused: set[int]) -> None:
    """Check for conflicts, then take QEMU's lock bytes for ``held``/``refused`` permissions.

    Raises :class:`ImageLockedError` with qemu-img's wording when another process conflicts.
    """
    for perm in sorted(held):
        if _held_by_other(fd, LOCK_BASE_SHARED + perm):
            raise ImageLockedError(
                f'Failed to get "{PERM_NAMES[perm]}" lock\n'
                f"Is another process using the image [{name}]?"
            )
    for perm in sorted(refused):
        if _held_by_other(fd, LOCK_BASE_PERM + perm):
            raise ImageLockedError(
                f'Failed to get shared "{PERM_NAMES[perm]}" lock\n'
                f"Is another process using the image [{name}]?"
            )
    try:
        for perm in held:
            _fcntl(fd, _SETLK, fcntl.F_RDLCK, LOCK_BASE_PERM + perm)
        for perm in refused:
            _fcntl(fd, _SETLK, fcntl.F_RDLCK, LOCK_BASE_SHARED + perm)
    except OSError as e:
        import errno

        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(
                f"Failed to lock byte range\nIs another process using the image [{name}]?"
            ) from e
        if not _unsupported(e):
            raise


def release(fd: int) -> None:
    """Drop every lock byte this fd holds."""
    try:
        fcntl.fcntl(fd, _SETLK, _flock(fcntl.F_UNLCK, LOCK_BASE_PERM, 200))
    except OSError:
        pass
