"""The vmdk extent protocol and what the grain-mapped extents share.

Offsets passed to an extent are bytes relative to the extent's first guest byte, and every
call stays inside the extent (the image splits requests at extent boundaries).  ``fill``
is a callable ``fill(extent_offset, buf)`` supplying the bytes below this layer (the
parent image, or zeros) for unallocated grains.

Reads are planned, then executed by the image: :meth:`Extent.lookup` returns the
:class:`~diskimg.plan.Run` at an offset (non-empty, starting at that offset, inside the
request and the extent); the image dispatches on its kind, calling
:meth:`Extent.read_data` for DATA and :meth:`Extent.read_compressed` for COMPRESSED runs.

The protocol is for the type checker; the extents are :class:`GrainMappedExtent` s
(:mod:`~diskimg.vmdk.sparse_extent`, :mod:`~diskimg.vmdk.sesparse`) and the flat and zero
extents of :mod:`~diskimg.vmdk.flat`, which only a separate descriptor file names.
"""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import CorruptImageError, UsageError
from diskimg.plan import Run, RunKind

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is for the type checker: not imported at run time (start-up)
    from collections.abc import Callable
    from typing import Any, Protocol, TypeAlias

    from diskimg.hostio.host import Host

    Fill: TypeAlias = Callable[[int, memoryview], None]

    class Extent(Protocol):
        """One extent of a vmdk.  ``appendable``: written front to back by a stream
        writer (the image keeps the CID of such a file unchanged); ``compressed``: every
        grain is compressed (streamOptimized); ``zero_init``: bytes never written read as
        zeros; ``finish`` is close-time work."""

        size: int
        filename: str
        read_only: bool
        appendable: bool
        compressed: bool

        def lookup(self, off: int, length: int) -> Run: ...
        def read_data(self, run: Run, part: memoryview) -> None: ...
        def read_compressed(self, run: Run, part: memoryview) -> None: ...
        def status(self, off: int, length: int) -> Status: ...
        def write(self, off: int, data: memoryview, fill: Fill) -> None: ...
        def zeroable(self, off: int, length: int) -> bool: ...
        def mark_zeroed(self, off: int, length: int) -> None: ...
        def zero_init(self) -> bool: ...
        def flush(self) -> None: ...
        def finish(self) -> None: ...
        def info(self) -> dict[str, Any]: ...


class _NoCompression:
    """For extents whose format has no compressed grains (a mapper never plans one)."""

    filename: str
    appendable = False
    compressed = False

    def read_compressed(self, run: Run, part: memoryview) -> None:
        raise CorruptImageError(f"Compressed grain at offset {run.host or 0:#x} in "
                                f"'{self.filename}', whose format has none", offset=run.host)

    def finish(self) -> None:
        """Nothing to do at close."""


class GrainMappedExtent(_NoCompression):
    """What the grain-mapped extents (hosted sparse, COWD, seSparse) share: ``status``
    from the subclass's ``lookup``, and DATA runs read only when their grain lies inside
    the file (checked against ``fsize``)."""

    host: Host
    filename: str
    fsize: int
    gb: int
    #: how errors name a grain of this extent type
    grain_noun = "Grain"

    def lookup(self, off: int, length: int) -> Run:
        raise NotImplementedError

    def zero_init(self) -> bool:
        """A grain never written reads as zeros (or, in a delta, as its parent)."""
        return True

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        """A read-only extent (a writable one's class has its own ``write``)."""
        raise UsageError(f"Cannot write to read-only extent '{self.filename}'")

    def flush(self) -> None:
        """Nothing to write back: a read-only extent changes nothing."""

    def zeroable(self, off: int, length: int) -> bool:
        return False

    def mark_zeroed(self, off: int, length: int) -> None:
        raise UsageError(f"'{self.filename}' has no zeroed grains")

    def read_data(self, run: Run, part: memoryview) -> None:
        host = run.host
        assert host is not None
        if host >= self.fsize:
            raise CorruptImageError(f"{self.grain_noun} at offset {host:#x} for guest "
                                    f"offset {run.offset:#x} lies past the end of "
                                    f"'{self.filename}'", offset=host)
        self.host.preadinto(host, part)

    def status(self, off: int, length: int) -> Status:
        r = self.lookup(off, length)
        k = r.kind
        if k is RunKind.UNALLOCATED:
            return Status(r.length, False, False, True)
        if k is RunKind.ZERO:
            return Status(r.length, True, False, True)
        if k is RunKind.COMPRESSED:
            return Status(r.length, True, True, False, None, self.filename)
        return Status(r.length, True, True, False, r.host, self.filename)
