"""raw: the guest bytes are the host file's bytes.

The virtual size is the file size rounded up to 512 (qemu's rule); bytes past the end of
the file read as zeros.  When the format was probed rather than named, writes to the first
sector that would make the image probe as another format are refused (qemu's probed-raw
rule, CVE-2008-2004).
"""

from __future__ import annotations

from diskimg.device import (BlockDevice, ImageInfo, Status, host_has_zero_init,
                             requires_open)
from diskimg.errors import UsageError
from diskimg.hostio import HostFile
from diskimg.plan import Run, RunKind

SECTOR = 512


class RawImage(BlockDevice):
    """A raw image over one :class:`HostFile`."""

    format = "raw"

    def host_files(self) -> list[HostFile]:
        """The one file."""
        return [self.host]

    def __init__(self, host: HostFile, *, probed: bool = False) -> None:
        self.host = host
        self.filename = str(host.path)
        self.read_only = not host.writable
        self.probed = probed
        self.size = -(-host.size() // SECTOR) * SECTOR
        self._mark_open()

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self.host.preadinto(offset, buf)

    def _guard_probe(self, offset: int, data: memoryview | None) -> None:
        if not self.probed or offset >= SECTOR:
            return
        from diskimg.probe import probe_bytes

        head = bytearray(self.host.pread(0, SECTOR).ljust(SECTOR, b"\0"))
        end = min(SECTOR, offset + (len(data) if data is not None else SECTOR))
        if data is None:
            head[offset:end] = bytes(end - offset)
        else:
            head[offset:end] = data[: end - offset]
        if probe_bytes(bytes(head)) != "raw":
            raise UsageError(
                "Writing to sector 0 of a probed raw image that would make it look like "
                "another format is refused; specify -f raw to allow it"
            )

    def _write(self, offset: int, data: memoryview) -> None:
        self._guard_probe(offset, data)
        self.host.pwrite(offset, data)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._guard_probe(offset, None)
        fsize = self.host.size()
        if offset >= fsize:
            self.host.truncate(max(fsize, offset + length))
            return
        if may_unmap:
            self.host.punch_hole(offset, length)
        else:
            self.host.zero_range(offset, length)

    def _discard(self, offset: int, length: int) -> None:
        self._guard_probe(offset, None)
        if offset < self.host.size():
            self.host.punch_hole(offset, length)

    def _plan(self, offset: int, length: int) -> Run:
        """One DATA run: guest byte ``o`` is byte ``o`` of the file."""
        return Run(offset, length, RunKind.DATA, offset, filename=self.filename)

    def _status(self, offset: int, length: int) -> Status:
        """The DATA run of :meth:`_plan` refined by the file's holes (QEMU's file-posix:
        a hole is allocated, reads as zeros and is not data)."""
        run = self._plan(offset, length)
        assert run.host is not None
        for start, n, is_data in self.host.data_extents(run.host, run.length):
            return Status(n, allocated=True, data=is_data, zero=not is_data, offset=start,
                          filename=self.filename)
        return Status(run.length, True, False, True, run.host, self.filename)

    def _flush(self) -> None:
        self.host.flush()

    def _close(self) -> None:
        self.host.close()

    @requires_open
    def resize(self, new_size: int, preallocation: str = "off", *,
               shrink: bool = True) -> None:
        """Grow or shrink the file to ``new_size`` bytes."""
        self._check_writable()
        old = self.host.size()
        self.host.truncate(new_size)
        if new_size > old:
            if preallocation == "falloc":
                self.host.preallocate(old, new_size - old)
            elif preallocation == "full":
                self.host.write_zeros(old, new_size - old)
        self.size = -(-new_size // SECTOR) * SECTOR

    def has_zero_init(self) -> bool:
        return host_has_zero_init(self.host.fd)

    @requires_open
    def info(self) -> ImageInfo:
        return ImageInfo(
            filename=self.filename,
            format="raw",
            virtual_size=self.size,
            actual_size=self.host.allocated_size(),
        )


def create_raw(host: HostFile, size: int, preallocation: str = "off") -> None:
    """Lay out a new raw image of ``size`` bytes on an empty host file."""
    if preallocation not in ("off", "falloc", "full"):
        raise UsageError(f"Unsupported preallocation mode: {preallocation}")
    size = -(-size // SECTOR) * SECTOR  # qemu-img rounds the file up to a whole sector
    host.truncate(size)
    if preallocation == "off" and size:
        # qemu allocates the first block so later opens can probe alignment
        host.write_zeros(0, min(size, 4096))
    if preallocation == "falloc":
        host.preallocate(0, size)
    elif preallocation == "full":
        host.write_zeros(0, size)
