"""The vmdk extents without grain tables, which only a separate descriptor file names:
FLAT / VMFS (guest bytes at an offset of a host file) and ZERO (and NOACCESS) extents, each
one run per request.  Imported when such a descriptor is opened (start-up, issue 20)."""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.plan import Run, RunKind
from diskimg.vmdk.sparse_extent import _NoCompression

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.vmdk.extent import Fill


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

    def zero_init(self) -> bool:
        """Whether the host file reads as zeros where it was never written."""
        return self.host.zero_init()

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

    def zero_init(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.size, "filename": self.filename, "format": self.type}
