"""Host: the byte-source layer every format reads and writes through.

A format never knows where its bytes live.  It gets a :class:`Host`: a
:class:`~diskimg.hostio.file.HostFile` (one local file or block device), a
:class:`~diskimg.hostio.fileobj.FileObjectHost` (any binary file object), a
:class:`~diskimg.hostio.pipe.PipeHost` (a raw image read once from a pipe), or what the
opener registered for a URL's scheme returns (:mod:`diskimg.hostio.urls`: HTTP, fsspec).
Invariants every host keeps:

- offsets and lengths are bytes; reads past the end are short (``pread``) or zero-filled
  (``preadinto``), never an exception; ``pread_exact`` names ``what`` and the offset;
- a read-only host refuses every write with :class:`~diskimg.errors.UsageError` and
  changes nothing;
- ``name`` (a ``str``) is what messages name: a path as pathlib prints it, or a URL with
  its scheme intact; ``path`` is what the host was opened from: a :class:`~pathlib.Path`
  for a local file (the only kind of host whose image may name other local files without
  the :class:`~diskimg.policy.OpenPolicy` allowing it), else a ``str`` -- a URL with its
  scheme intact, or a file object's label;
- ``flush`` makes written data durable as far as the host can (a no-op when ``sync`` is
  off); ``close`` is idempotent and releases every lock and connection;
- the sparse helpers (``data_extents``, ``punch_hole``, ``zero_range``, ``preallocate``,
  ``write_zeros``) answer conservatively on hosts without holes: all data, no hole
  punched (``punch_hole`` returns False), zeros written as bytes;
- ``data_extents`` says which bytes must be read (is_data False: they read as zeros);
  ``allocation_extents`` says, as QEMU's block status of the host does, whether each run
  is data and whether it reads as zeros, apart (an NBD export's ``base:allocation``: a
  hole that does not read as zeros, zeros that are allocated); for a file the two are
  one answer (:func:`allocation_from_data`);
- capabilities are declared by methods, never probed (no ``fd`` outside hostio):
  ``zero_init`` (bytes never written read as zeros), ``is_device`` (a block device: an
  image may not name one), ``block_size`` (the allocation unit estimates count in) and
  ``identity`` (equal for two hosts over the same bytes: backing-loop detection);
- ``allocated_size`` is the bytes the host stores, or None when the host has no
  allocation to report (an NBD export: ``info`` then says ``disk size: unavailable`` and,
  as qemu-img, omits ``actual-size``).
"""

from __future__ import annotations

# Start-up (issue 20): Host and HasDataExtents are protocols for the type checker; at run
# time they are plain classes, so that opening a file loads neither typing nor pathlib
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Hashable, Iterator
    from pathlib import Path
    from typing import Protocol
else:
    Protocol = object


def read_exact(host: Host, offset: int, length: int, what: str) -> bytes:
    """``host.pread`` of exactly ``length`` bytes, or a FormatError naming ``what``, the
    offset and the host (what ``pread_exact`` does on every host)."""
    from diskimg.errors import FormatError

    data = host.pread(offset, length)
    if len(data) != length:
        raise FormatError(f"{what} at offset {offset:#x} (length {length}) lies past the end "
                          f"of '{host.path}'", offset=offset)
    return data


class HasDataExtents(Protocol):
    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]: ...


def allocation_from_data(host: HasDataExtents, offset: int, length: int
                         ) -> Iterator[tuple[int, int, bool, bool]]:
    """``allocation_extents`` of a host whose holes read as zeros: (start, length, data,
    zero) from its ``data_extents``, zero exactly where not data."""
    for start, n, is_data in host.data_extents(offset, length):
        yield start, n, is_data, not is_data


class Host(Protocol):
    """What formats and operations may call on the bytes under an image."""

    writable: bool
    sync: bool
    locked: bool
    #: a local file (``path`` is then a :class:`~pathlib.Path`): declared, so that a
    #: caller who only asks need not build the Path (pathlib: start-up, issue 20)
    local: bool

    @property
    def path(self) -> Path | str: ...
    @property
    def name(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def pread_exact(self, offset: int, length: int, what: str) -> bytes: ...
    def preadinto(self, offset: int, buf: memoryview) -> int: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None: ...
    def size(self) -> int: ...
    def allocated_size(self) -> int | None: ...  # None: the store cannot tell (a URL)
    def truncate(self, size: int) -> None: ...
    def empty(self) -> None: ...
    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]: ...
    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]: ...
    def punch_hole(self, offset: int, length: int) -> bool: ...
    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None: ...
    def preallocate(self, offset: int, length: int) -> None: ...
    def write_zeros(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def lock(self, writable: bool) -> None: ...
    def close(self) -> None: ...
    def zero_init(self) -> bool: ...
    def is_device(self) -> bool: ...
    def block_size(self) -> int: ...
    def identity(self) -> Hashable: ...
