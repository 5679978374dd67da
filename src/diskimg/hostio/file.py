"""HostFile: one open host file with positional I/O and sparse-file helpers, and QEMU's
image locking (its lock bytes on the file).

Formats never call ``os`` directly; they get a HostFile.  A HostFile owns its fd and, when
locking was asked for, QEMU's lock bytes on it (released on close).
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys

from diskimg.errors import ClosedImageError, DiskImgError, ImageLockedError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

# The kernel's copy from the page cache (x86 ``rep movsb``) is slower when the destination
# address lies 1-31 bytes past the source's position in its page (4K aliasing).  Buffers
# from malloc (bytearray, bytes) sit 16 bytes into a page, so a large read into one at a
# page-aligned file offset goes _FAST_SKEW - skew bytes further on, where the copy is fast,
# and is moved down in place by one memmove.  Measured here (1 MiB reads from tmpfs, us
# per MiB): direct at skew 16 148-155, at 8 357; at 0 (page-aligned) 99, at 32 92, at
# 33-63 74-84; moved from skew 48 (a 32-byte memmove) 98 in all, from 0 129.  Read straight
# in at skew 16: the bench's 256 MiB sparse vmdk into a bytearray 1.08x libvmdk, not 0.97x.
_BOUNCE_MIN = 64 << 10       # smaller reads go straight to the caller's buffer
_SLOW_SKEW = 32              # skews (address - offset) mod _PAGE in [1, 32) are slow
_FAST_SKEW = 48              # where a read at a slow skew is made instead
_PAGE = 4096
_ALIGN = 64


def aligned_buffer(n: int, fill: bool = False) -> mmap.mmap:
    """A writable, page-aligned buffer of ``n`` zero bytes (private anonymous memory).

    ``readinto`` fills one straight from the kernel.  A large ``bytearray`` starts 16
    bytes past a page boundary, where the kernel's copy from page-aligned file data is
    slower (4K aliasing), so large reads into it land 32 bytes further on and are moved
    down in place: one more copy.

    ``fill``: the caller will fill the whole buffer, so its pages are made now, in one
    system call (``MAP_POPULATE``, Linux), instead of by a page fault per 4 KiB page in
    the middle of the reads that fill it (a 256 MiB convert: 2048 faults fewer)."""
    import mmap  # a shared library: not loaded by a command that reads no data (start-up)

    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if fill:
        try:
            flags |= mmap.MAP_POPULATE
        except AttributeError:  # pragma: no cover - not Linux
            pass
    return mmap.mmap(-1, max(1, n), flags=flags)


_ZERO_BYTES = bytes(1 << 20)
_ZEROS = memoryview(_ZERO_BYTES)


def zero_fill(buf: memoryview) -> None:
    """Set ``buf`` (writable) to zeros without allocating: a large one with one libc
    ``memset`` (:mod:`diskimg.hostio.cmem`: half the time of a copy from a zero buffer,
    which reads as much as it writes), a small one (or where ctypes is missing) by
    copying from one shared zero buffer."""
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    n = buf.nbytes
    if n >= _MEMSET_MIN:
        try:
            _cmem().memset_zero(buf, n)
            return
        except (ImportError, TypeError, ValueError):  # pragma: no cover - no ctypes here
            pass
    z = len(_ZEROS)
    for p in range(0, n, z):
        k = min(z, n - p)
        buf[p : p + k] = _ZEROS[:k]


_MEMSET_MIN = 64 << 10


def _cmem() -> Any:
    """:mod:`diskimg.hostio.cmem` (``_ctypes``), imported by the first large read that
    needs it (ImportError where there is no ``_ctypes``)."""
    from diskimg.hostio import cmem

    return cmem


def all_zero(buf: bytes | bytearray | memoryview) -> bool:
    """Whether ``buf`` (any bytes-like object) holds only zero bytes: the one zero test of
    the project.  A non-zero first byte answers at once; otherwise the buffer is compared a
    MiB at a time against one shared zero ``bytes`` with ``bytes.startswith``, which takes
    any buffer and is a memcmp: no copy of ``buf`` (a slice of a bytearray or an mmap
    copies, and memoryview equality runs item by item)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    n = mv.nbytes
    if n == 0:
        return True
    if mv[0]:
        return False
    z = len(_ZERO_BYTES)
    if n <= z:
        return _ZERO_BYTES.startswith(mv)
    return all(_ZERO_BYTES.startswith(mv[p : p + z]) for p in range(0, n, z))


def trailing_zeros(buf: bytes | bytearray | memoryview) -> int:
    """How many zero bytes ``buf`` ends with (``len(buf)`` when it holds nothing else)."""
    return zero_run(memoryview(buf).cast("B"), tail=True)


def zero_run(mv: memoryview, tail: bool = False, word: int = 1) -> int:
    """How many zero bytes byte view ``mv`` starts (``tail``: ends) with, in whole ``word``s
    (0 at once when the first or last word is not): a binary search with :func:`all_zero`
    (memcmp, ~len(mv) bytes; rstrip tests byte by byte: 64 KiB, one entry: 15 us vs 250)."""
    n = len(mv)
    if not n or any(mv[n - word :] if tail else mv[:word]):
        return 0
    if all_zero(mv):
        return n - n % word
    lo, hi = 0, n  # the run is at least lo bytes long and shorter than hi
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if all_zero(mv[n - mid : n - lo] if tail else mv[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo - lo % word


def _page_offset(buf: memoryview) -> int:
    """Where ``buf`` (writable) starts in its page.  A view of the whole of an ``mmap``
    (an :func:`aligned_buffer` read whole) starts on a page: told without the address (so
    without loading ``_ctypes``: a small convert's one read).  Without ``_ctypes``: 0 (the
    read is made straight, at whatever skew)."""
    mm = sys.modules.get("mmap")
    if mm is not None and isinstance(buf.obj, mm.mmap) and buf.c_contiguous \
            and buf.nbytes == len(buf.obj):
        return 0
    try:
        address: int = _cmem().address(buf)
    except ImportError:  # pragma: no cover - no ctypes here
        return 0
    return address % _PAGE


INT64_MAX = (1 << 63) - 1


def path_name(path: str | os.PathLike[str]) -> str:
    """``str(pathlib.Path(path))`` without importing pathlib (start-up, issue 20): the
    name with repeated slashes, ``.`` components and a trailing slash dropped (a leading
    ``//`` kept), as pathlib prints it and as diskimg's messages name the file.  Every local
    name diskimg opens, creates or resolves passes here: one the host cannot take (a NUL
    byte, a surrogate that stands for no byte; only a Python caller's) is a UsageError."""
    name = os.fspath(path)
    if not isinstance(name, str):  # pathlib's own refusal (bytes)
        from pathlib import Path

        return str(Path(path))
    try:
        nul: bool | None = b"\0" in os.fsencode(name)
    except UnicodeEncodeError:
        nul = None
    if nul is not False:
        raise UsageError(f"{name!r} is not a file name: it holds " + ("a NUL byte" if nul
                         else "a surrogate that stands for no byte"), path=name, field="path")
    root = ""
    if name.startswith("/"):
        root = "//" if name.startswith("//") and not name.startswith("///") else "/"
    return root + "/".join(x for x in name.split("/") if x and x != ".") or "."


# --- QEMU's lock bytes (OFD byte-range locks) -----------------------------------------
# QEMU marks "I hold permission i" with a shared lock on byte ``100 + i`` and "I do not let
# others have permission i" with a shared lock on byte ``200 + i``.  Taking permission i
# conflicts with anybody's lock on ``200 + i``; refusing permission j conflicts with
# anybody's lock on ``100 + j``.  Locks belong to the open file description, so one fd
# per image.  (They live here, with the fd they lock, and not in a module of their own:
# every open takes them, and each module on that path costs start-up, issue 20;
# :mod:`diskimg.hostio.lock` re-exports them.)

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


class HostFile:
    """A host file opened for positional I/O.  Offsets and lengths are in bytes."""

    local = True

    def __init__(self, fd: int, path: str | os.PathLike[str], writable: bool) -> None:
        self._fd = fd
        #: the file's name as ``str(pathlib.Path(path))`` gives it (:func:`path_name`)
        self.name = path_name(path)
        self._path: Path | None = None
        self.writable = writable
        #: False: :meth:`flush` does not sync (qemu's ``cache=unsafe``, qemu-img convert's
        #: default for its target); the data still reaches the page cache in order
        self.sync = True
        #: whether this file holds QEMU's lock bytes (the files an image names -- a data
        #: file -- are then locked too, as qemu locks every file of an image)
        self.locked = False

    @property
    def path(self) -> Path:
        """The file's name as a :class:`pathlib.Path` (pathlib is imported when a caller
        first asks: opening and reading an image needs only :attr:`name`)."""
        if self._path is None:
            from pathlib import Path

            self._path = Path(self.name)
        return self._path

    @property
    def fd(self) -> int:
        """The open fd.  After :meth:`close` the number may already belong to another
        file, so every use raises :class:`ClosedImageError` instead (the number is -1)."""
        if self._fd < 0:
            raise ClosedImageError(f"I/O operation on closed file '{self.name}'")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # --- reads and writes -------------------------------------------------------------
    def _check_offset(self, offset: int, length: int) -> None:
        """Offsets come from image metadata: out of range is the image's fault."""
        if offset < 0 or offset + max(length, 0) > INT64_MAX:
            from diskimg.errors import FormatError

            raise FormatError(f"offset {offset:#x} (+{length} bytes) in '{self.name}' is out "
                              "of range", offset=offset)

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``; short only at end of file."""
        fd = self.fd
        if length <= 0:
            return b""
        self._check_offset(offset, length)
        data = os.pread(fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly ``length`` bytes or raise naming ``what`` and the offset."""
        from diskimg.errors import FormatError

        data = self.pread(offset, length)
        if len(data) != length:
            raise FormatError(
                f"{what} at offset {offset:#x} (length {length}) lies past the end of "
                f"'{self.name}'",
                offset=offset,
            )
        return data

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past end of file are zeroed.  Returns len(buf)."""
        fd = self.fd
        n = len(buf)
        self._check_offset(offset, n)
        got = 0
        if n >= _BOUNCE_MIN:
            skew = (_page_offset(buf) - offset) % _PAGE
            if 0 < skew < _SLOW_SKEW:
                got = self._preadinto_shifted(offset, buf, _FAST_SKEW - skew)
                if got < 0:
                    return n                  # end of file inside the shifted part
        while got < n:
            chunk = os.preadv(fd, [buf[got:]], offset + got)
            if chunk <= 0:
                zero_fill(buf[got:])
                break
            got += chunk
        return n

    def _preadinto_shifted(self, offset: int, buf: memoryview, shift: int) -> int:
        """Read ``buf[:len(buf) - shift]`` into ``buf[shift:]`` (where the kernel's copy is
        at a fast skew), then move it down in place: the bytes ``buf`` gets are those of a direct
        read.  The last ``shift`` bytes come in the same system call, into a small scratch
        buffer.  Returns how many bytes of ``buf`` are in place (the caller reads the rest
        directly), or -1 when the file ended first (the rest of ``buf`` is zeroed)."""
        n = len(buf)
        want = n - shift
        tail = bytearray(shift)
        k = os.preadv(self.fd, [buf[shift:], tail], offset)
        if k == n:                            # the whole request in one system call
            buf[:want] = buf[shift:]          # overlapping: memoryview copies with memmove
            buf[want:] = tail
            return n
        got = min(max(k, 0), want)            # a short read: the tail is read again later
        while 0 < k and got < want:
            k = os.preadv(self.fd, [buf[shift + got : shift + want]], offset + got)
            got += max(k, 0)
        buf[:got] = buf[shift : shift + got]
        if got < want:
            zero_fill(buf[got:])
            return -1
        return got

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        fd = self.fd
        if not self.writable:
            raise UsageError(f"'{self.name}' is opened read-only")
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], offset + done)

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write ``parts`` back to back at ``offset`` with as few ``pwritev`` calls as the
        kernel allows (no joined copy of the pieces)."""
        fd = self.fd
        if not self.writable:
            raise UsageError(f"'{self.name}' is opened read-only")
        views = [memoryview(p).cast("B") for p in parts]
        views = [v for v in views if len(v)]
        iov_max = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
        while views:
            batch = views[:iov_max]
            done = os.pwritev(fd, batch, offset)
            offset += done
            # drop what was written (short writes resume inside a piece)
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]

    # --- size and allocation ----------------------------------------------------------
    def size(self) -> int:
        """Current file size in bytes (block devices: their size)."""
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        return st.st_size

    def allocated_size(self) -> int:
        """Bytes the filesystem has allocated (st_blocks * 512), qemu-img's 'disk size'."""
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        fd = self.fd
        if not self.writable:
            raise UsageError(f"'{self.name}' is opened read-only")
        os.ftruncate(fd, size)

    def empty(self, reserve: int = 0) -> None:
        """Truncate a regular file to 0 bytes (what ``create`` does once the lock is held;
        a block device keeps its size, as ``O_TRUNC`` leaves it).

        ``reserve``: the size the caller will grow the file to next.  A smaller file is
        first grown to it, so a file system that cannot hold that size refuses (EFBIG)
        while the file is still byte-identical: a refused create changes nothing."""
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            if reserve > st.st_size:
                self.truncate(reserve)
            self.truncate(0)

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, is_data) runs covering the range, from SEEK_DATA/SEEK_HOLE."""
        from diskimg.hostio import sparse  # (these five: imported when first used)

        return sparse.data_extents(self.fd, offset, length)

    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, data, zero) runs: holes read as zeros."""
        from diskimg.hostio.host import allocation_from_data

        return allocation_from_data(self, offset, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        from diskimg.hostio import sparse

        return sparse.punch_hole(self.fd, offset, length)

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        from diskimg.hostio import sparse

        sparse.zero_range(self.fd, offset, length, keep_size)

    def preallocate(self, offset: int, length: int) -> None:
        from diskimg.hostio import sparse

        sparse.preallocate(self.fd, offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        from diskimg.hostio import sparse

        sparse.write_zeros(self.fd, offset, length)

    def flush(self) -> None:
        """fdatasync: data and the metadata needed to read it back are durable (a no-op
        when ``sync`` is off)."""
        fd = self.fd
        if self.writable and self.sync:
            os.fdatasync(fd)

    # --- locking and lifetime ---------------------------------------------------------
    def lock(self, writable: bool) -> None:
        held, refused = READ_WRITE_PERMS if writable else READ_ONLY_PERMS
        acquire(self.fd, self.name, held, refused)
        self.locked = True

    def close(self) -> None:
        """Release the lock bytes and close the fd (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            release(fd)
            os.close(fd)

    def __enter__(self) -> HostFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- declared capabilities (the Host protocol; no caller reads ``fd``) --------------
    def zero_init(self) -> bool:
        """QEMU's file-posix rule: a regular file reads as zeros where nothing was written
        (holes, ``falloc``/``full`` preallocation alike); a block device need not."""
        return stat.S_ISREG(os.fstat(self.fd).st_mode)

    def is_device(self) -> bool:
        """True for a block device (open_host_file admits nothing else but files)."""
        return stat.S_ISBLK(os.fstat(self.fd).st_mode)

    def block_size(self) -> int:
        """The filesystem's allocation unit (``st_blksize``, at least 512)."""
        return max(512, os.fstat(self.fd).st_blksize)

    def identity(self) -> tuple[int, int]:
        """(device, inode): equal for two opens of the same file."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)


def open_host_file(
    path: str | os.PathLike[str],
    writable: bool = False,
    *,
    create: bool = False,
    lock_mode: bool | None = True,
    truncate: bool = True,
) -> HostFile:
    """Open ``path`` for positional I/O.

    Refuses directories, FIFOs, sockets and character devices with a clear error.
    ``lock_mode`` True takes QEMU's lock bytes (writable or read-only set); None/False skips
    locking (qemu-img ``-U``).

    ``create`` makes the file if it is missing and empties a regular file -- only once
    QEMU's lock is held, so a file another process holds is refused byte-identical (never
    ``O_TRUNC``).  ``truncate=False`` leaves emptying it to the caller (:meth:`HostFile.empty`),
    who first takes the locks on the other files it will rewrite.
    """
    p = path_name(path)
    flags = os.O_RDWR if writable else os.O_RDONLY
    if create:
        flags |= os.O_CREAT
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(p, flags, 0o644)
    except IsADirectoryError:
        raise DiskImgError(f"Could not open '{p}': Is a directory", path=p,
                           operation="open", reason="Is a directory") from None
    except FileNotFoundError:
        raise DiskImgError(f"Could not open '{p}': No such file or directory", path=p,
                           operation="open", reason="No such file or directory") from None
    except PermissionError:
        raise DiskImgError(f"Could not open '{p}': Permission denied", path=p,
                           operation="open", reason="Permission denied") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DiskImgError(f"Could not open '{p}': Is a directory", path=p,
                               operation="open", reason="Is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskImgError(f"Could not open '{p}': not a regular file or block device",
                               path=p, operation="open",
                               reason="not a regular file or block device")
        os.set_blocking(fd, True)
        hf = HostFile(fd, p, writable)
        if lock_mode:
            hf.lock(writable)
        if create and truncate:
            hf.empty()
    except BaseException:
        release(fd)
        os.close(fd)
        raise
    return hf
