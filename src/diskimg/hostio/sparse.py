"""Sparse-file primitives: SEEK_DATA/SEEK_HOLE extents, hole punching, preallocation.

Hole punching uses one ``ctypes`` call to libc ``fallocate`` (the stdlib has no wrapper);
every function falls back to a portable equivalent when the filesystem says no.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # ctypes is loaded on the first fallocate call only
    from collections.abc import Iterator
    import ctypes

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 1 << 20
_libc: ctypes.CDLL | None = None
_have_fallocate = True


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Call libc fallocate; True on success, False when unsupported here."""
    global _libc, _have_fallocate
    if not _have_fallocate:
        return False
    import ctypes

    if _libc is None:
        try:
            # dlopen(NULL): libc's symbols without ctypes.util.find_library, which runs
            # ldconfig/gcc in subprocesses (hundreds of ms)
            _libc = ctypes.CDLL(None, use_errno=True)
            fn = _libc.fallocate
        except (OSError, AttributeError):
            _have_fallocate = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY):
        return False
    raise OSError(err, os.strerror(err))


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write explicit zero bytes over [offset, offset+length)."""
    buf = bytes(min(length, _ZERO_CHUNK))
    mv = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, mv[: min(len(buf), end - offset)], offset)
        offset += n


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) keeping the file size; reads return zeros.

    Returns True if the range is now a hole, False if zeros had to be written instead.
    """
    if length <= 0:
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return True
    write_zeros(fd, offset, length)
    return False


def zero_range(fd: int, offset: int, length: int, keep_size: bool = True) -> None:
    """Make [offset, offset+length) read as zeros, keeping it allocated where possible.

    With ``keep_size`` False the file grows to cover the range (as a write would)."""
    if length <= 0:
        return
    mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep_size else 0)
    if _fallocate(fd, mode, offset, length):
        return
    write_zeros(fd, offset, length)


def preallocate(fd: int, offset: int, length: int) -> None:
    """posix_fallocate the range (preallocation=falloc); zeros where unsupported."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        size = os.fstat(fd).st_size
        if offset + length > size:
            write_zeros(fd, max(offset, size), offset + length - max(offset, size))


def data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """Yield (start, length, is_data) runs covering [offset, offset+length).

    Uses SEEK_DATA/SEEK_HOLE; a filesystem without them reports everything as data.
    Bytes past the end of the file are reported as a hole.
    """
    end = offset + length
    size = os.fstat(fd).st_size
    pos = offset
    while pos < end:
        if pos >= size:
            yield (pos, end - pos, False)
            return
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                yield (pos, end - pos, False)
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield (pos, end - pos, True)
                return
            raise
        if data > pos:
            n = min(data, end) - pos
            yield (pos, n, False)
            pos += n
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                hole = size
            else:
                raise
        n = min(hole, end) - pos
        if n <= 0:  # defensive: never loop without progress
            n = min(end, size) - pos if size > pos else end - pos
        yield (pos, n, True)
        pos += n
