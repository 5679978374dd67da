"""The vmdk extent protocol, for the type checker: nothing here runs (no module imports
this one at run time).

Offsets passed to an extent are bytes relative to the extent's first guest byte, and every
call stays inside the extent (the image splits requests at extent boundaries).  ``fill``
is a callable ``fill(extent_offset, buf)`` supplying the bytes below this layer (the
parent image, or zeros) for unallocated grains.

Reads are planned, then executed by the image: :meth:`Extent.lookup` returns the
:class:`~diskimg.plan.Run` at an offset (non-empty, starting at that offset, inside the
request and the extent); the image dispatches on its kind, calling
:meth:`Extent.read_data` for DATA and :meth:`Extent.read_compressed` for COMPRESSED runs.

The extents are the grain-mapped ones (hosted sparse, COWD, seSparse), whose shared base,
:class:`~diskimg.vmdk.sparse_extent.GrainMappedExtent`, lives beside the hosted sparse
extent that every sparse open loads, and the flat and zero extents of
:mod:`~diskimg.vmdk.flat`, which only a separate descriptor file names.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # the protocol is for the type checker (start-up, issue 20)
    from collections.abc import Callable
    from typing import Any, Protocol, TypeAlias

    from diskimg.device import Status
    from diskimg.plan import Run

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
