"""The vmdk extent protocol and the extents without grain tables: flat and zero.

Offsets passed to an extent are bytes relative to the extent's first guest byte, and every
call stays inside the extent (the image splits requests at extent boundaries).  ``fill``
is a callable ``fill(extent_offset, buf)`` supplying the bytes below this layer (the
parent image, or zeros) for unallocated grains.

Reads are planned, then executed by the image: :meth:`Extent.lookup` returns the
:class:`~diskimg.plan.Run` at an offset (non-empty, starting at that offset, inside the
request and the extent); the image dispatches on its kind, calling
:meth:`Extent.read_data` for DATA and :meth:`Extent.read_compressed` for COMPRESSED runs.
"""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import CorruptImageError, FormatError, UnsupportedFeatureError, UsageError
from diskimg.plan import Run, RunKind

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol, TypeAlias

    from diskimg.hostio.host import Host

    Fill: TypeAlias = Callable[[int, memoryview], None]
else:  # typing is for the type checker: not imported at run time (start-up, issue 20)
    Protocol = object


class Extent(Protocol):
    """One extent of a vmdk.  ``appendable``: written front to back by a stream writer
    (the image keeps the CID of such a file unchanged); ``finish`` is close-time work."""

    size: int
    filename: str
    read_only: bool
    appendable: bool

    def lookup(self, off: int, length: int) -> Run: ...
    def read_data(self, run: Run, part: memoryview) -> None: ...
    def read_compressed(self, run: Run, part: memoryview) -> None: ...
    def status(self, off: int, length: int) -> Status: ...
    def write(self, off: int, data: memoryview, fill: Fill) -> None: ...
    def zeroable(self, off: int, length: int) -> bool: ...
    def mark_zeroed(self, off: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...
    def info(self) -> dict[str, Any]: ...


class _NoCompression:
    """For extents whose format has no compressed grains (a mapper never plans one)."""

    filename: str
    appendable = False

    def read_compressed(self, run: Run, part: memoryview) -> None:
        raise CorruptImageError(f"Compressed grain at offset {run.host or 0:#x} in "
                                f"'{self.filename}', whose format has none", offset=run.host)

    def finish(self) -> None:
        """Nothing to do at close."""


class FlatExtent(_NoCompression):
    """FLAT / VMFS extent: guest bytes at ``start`` in a host file, one DATA run.  Bytes
    past the end of the host file read as zeros."""

    def __init__(self, host: Host, start: int, size: int, filename: str, typ: str,
                 read_only: bool) -> None:
        self.host, self.start, self.size = host, start, size
        self.filename, self.type, self.read_only = filename, typ, read_only

    def lookup(self, off: int, length: int) -> Run:
        return Run(off, length, RunKind.DATA, self.start + off, filename=self.filename)

    def read_data(self, run: Run, part: memoryview) -> None:
        assert run.host is not None
        self.host.preadinto(run.host, part)

    def status(self, off: int, length: int) -> Status:
        """DATA refined by the host file's holes (a hole reads as zeros)."""
        h = self.start + off
        for s, n, is_data in self.host.data_extents(h, length):
            return Status(n, True, True, not is_data, s, self.filename)
        return Status(length, True, True, True, h, self.filename)

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        self.host.pwrite(self.start + off, data)

    def zeroable(self, off: int, length: int) -> bool:
        """Never: like qemu, zeroes go to a flat extent as written zero bytes."""
        return False

    def mark_zeroed(self, off: int, length: int) -> None:
        raise UsageError("A flat extent has no zeroed grains")

    def flush(self) -> None:
        self.host.flush()

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.type}


class ZeroExtent(_NoCompression):
    """ZERO extent: one ZERO run, refuses writes.  ``no_access``: a NOACCESS extent line,
    whose reads fail (qemu 7.2 silently drops such lines, shifting later extents); its
    status still reports zeros."""

    host = None

    def __init__(self, size: int, typ: str = "ZERO", no_access: str | None = None) -> None:
        self.size, self.filename, self.type, self.read_only = size, "", typ, True
        self.no_access = no_access

    def lookup(self, off: int, length: int) -> Run:
        if self.no_access:
            raise UnsupportedFeatureError(f"Cannot read extent '{self.no_access}': its "
                                          "access mode is NOACCESS")
        return Run(off, length, RunKind.ZERO)

    def read_data(self, run: Run, part: memoryview) -> None:
        raise UsageError("A ZERO extent has no data runs")

    def status(self, off: int, length: int) -> Status:
        return Status(length, True, False, True)

    def write(self, off: int, data: memoryview, fill: Fill) -> None:
        raise UsageError("Cannot write to a ZERO extent")

    def zeroable(self, off: int, length: int) -> bool:
        return not self.no_access

    def mark_zeroed(self, off: int, length: int) -> None:
        """A ZERO extent reads as zeros already."""

    def flush(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.type}


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


def guard_type(typ: str) -> None:
    """Refuse extent types qemu 7.2 refuses (raw device mappings) or does not know."""
    if typ in ("VMFSRDM", "VMFSRAW"):
        raise UnsupportedFeatureError(f"Unsupported vmdk extent type '{typ}'")
    if typ not in ("SPARSE", "FLAT", "VMFS", "ZERO", "VMFSSPARSE", "SESPARSE"):
        raise FormatError(f"Unknown vmdk extent type '{typ}'")
