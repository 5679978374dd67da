"""raw: the guest bytes are the host file's bytes.

The virtual size is the file size rounded up to 512 (qemu's rule); bytes past the end of
the file read as zeros.  When the format was probed rather than named, writes to the first
sector that would make the image probe as another format are refused (qemu's probed-raw
rule, CVE-2008-2004).

The image options ``offset=`` and ``size=`` (qemu's raw driver; a disk inside an OVA or a
tar) make the image a window of the file: guest byte ``o`` is file byte ``offset + o``.
With ``size`` the window is fixed (it must lie inside the file and be a multiple of 512;
it is never resized); without it the window runs to the end of the file.
"""

from __future__ import annotations

import errno

from diskimg.device import BlockDevice, ImageInfo, Status, requires_open
from diskimg.errors import UnsupportedFeatureError, UsageError
from diskimg.plan import Run, RunKind

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from diskimg.hostio.file import HostFile
    from diskimg.hostio.host import Host

SECTOR = 512


class RawImage(BlockDevice):
    """A raw image over one :class:`HostFile`."""

    format = "raw"

    def host_files(self) -> list[Host]:
        """The one file."""
        return [self.host]

    def __init__(self, host: Host, *, probed: bool = False,
                 options: Mapping[str, str] | None = None, driver: str = "raw") -> None:
        """``driver``: the name ``info`` gives (``file``: qemu's protocol driver, which a
        backing format may name: the same bytes)."""
        self.driver = driver
        self.host = host
        self.filename = host.name  # str(host.path), without pathlib (start-up)
        self.read_only = not host.writable
        self.probed = probed
        self.options = dict(options or {})
        self.offset, self.window = window_options(self.options, host.size())
        self.size = self._virtual_size()
        self._mark_open()

    def _virtual_size(self) -> int:
        """The window's size, or what the file holds past ``offset`` rounded up to 512
        (qemu's rule)."""
        if self.window is not None:
            return self.window
        return -(-(self.host.size() - self.offset) // SECTOR) * SECTOR

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self.host.preadinto(self.offset + offset, buf)

    def _guard_probe(self, offset: int, data: memoryview | None) -> None:
        if not self.probed or offset >= SECTOR:
            return
        from diskimg.probe import probe_bytes

        head = bytearray(self.host.pread(self.offset, SECTOR).ljust(SECTOR, b"\0"))
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
        self.host.pwrite(self.offset + offset, data)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._guard_probe(offset, None)
        offset += self.offset
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
        offset += self.offset
        if offset < self.host.size():
            self.host.punch_hole(offset, length)

    def _plan(self, offset: int, length: int) -> Run:
        """One DATA run: guest byte ``o`` is byte ``offset + o`` of the file."""
        return Run(offset, length, RunKind.DATA, self.offset + offset, filename=self.filename)

    def _status(self, offset: int, length: int) -> Status:
        """The DATA run of :meth:`_plan` refined by the host's allocation (QEMU's
        file-posix: a hole is allocated, reads as zeros and is not data; an NBD export:
        its ``base:allocation`` flags)."""
        run = self._plan(offset, length)
        assert run.host is not None
        for start, n, data, zero in self.host.allocation_extents(run.host, run.length):
            return Status(n, allocated=True, data=data, zero=zero, offset=start,
                          filename=self.filename)
        return Status(run.length, True, False, True, run.host, self.filename)

    def _flush(self) -> None:
        self.host.flush()

    def _close(self) -> None:
        self.host.close()

    @requires_open
    def resize(self, new_size: int, preallocation: str = "off", *,
               shrink: bool = True) -> None:
        """Grow or shrink the file to ``offset + new_size`` bytes (a fixed ``size=``
        window is refused, as qemu refuses it)."""
        self._check_writable()
        if self.window is not None:
            raise UnsupportedFeatureError("Cannot resize fixed-size raw disks")
        old = self.host.size()
        end = self.offset + new_size
        self.host.truncate(end)
        if end > old:
            if preallocation == "falloc":
                self.host.preallocate(old, end - old)
            elif preallocation == "full":
                self.host.write_zeros(old, end - old)
        self.size = self._virtual_size()

    def has_zero_init(self) -> bool:
        # a window of a file holds whatever the file holds there
        return not self.options and self.host.zero_init()

    @requires_open
    def info(self) -> ImageInfo:
        # raw's dirty flag is the protocol's answer (qemu: bdrv_get_info of the file);
        # a URL gives none, and no allocated size either
        actual = self.host.allocated_size()
        return ImageInfo(
            filename=self.display_name(),
            format=self.driver,
            virtual_size=self.size,
            actual_size=actual,
            dirty_flag=None if actual is None else False,
        )

    def display_name(self) -> str:
        """The name qemu-img prints for the image (``json:{...}`` with ``offset``/``size``)."""
        from diskimg.info_text import image_name  # (what info prints: not for a copy)

        from diskimg.options import RAW_WINDOW_OPTIONS

        return image_name("raw", self.filename, self.options, RAW_WINDOW_OPTIONS)


def window_options(options: Mapping[str, str], file_size: int) -> tuple[int, int | None]:
    """``(offset, size)`` of the window the image options ``offset=``/``size=`` name in a
    file of ``file_size`` bytes (size None: to the end of the file), checked with qemu's
    messages (the other options are :mod:`diskimg.image_options`' to check)."""
    if "offset" not in options and "size" not in options:
        return 0, None  # the whole file (no option parser loaded for it: start-up)
    from diskimg.options import parse_param_size

    offset = parse_param_size("offset", options["offset"]) if "offset" in options else 0
    size = parse_param_size("size", options["size"]) if "size" in options else None
    if offset > file_size:
        raise UsageError(f"Offset ({offset}) cannot be greater than size of the containing "
                         f"file ({file_size})")
    if size is not None:
        if offset + size > file_size:
            raise UsageError(f"The sum of offset ({offset}) and size ({size}) has to be "
                             "smaller or equal to the  actual size of the containing file "
                             f"({file_size})")
        if size % SECTOR:
            raise UsageError(f"Specified size is not multiple of {SECTOR}")
    return offset, size


#: the preallocation modes a raw image takes
_PREALLOCATION = ("off", "falloc", "full")


def create_raw(host: HostFile, size: int, preallocation: str = "off") -> None:
    """Lay out a new raw image of ``size`` bytes on ``host``, emptying it first (QEMU's lock
    is held).  The file is emptied only once the file system has accepted ``size``: a
    refusal leaves it byte-identical."""
    if preallocation not in _PREALLOCATION:  # (options' refusal, in qemu's words)
        from diskimg.options import check_preallocation

        check_preallocation("raw", preallocation, _PREALLOCATION)
    size = -(-size // SECTOR) * SECTOR  # qemu-img rounds the file up to a whole sector
    if size >= 1 << 63:  # rounded past off_t: ftruncate's EINVAL in qemu
        raise UsageError("Could not resize file: Invalid argument")
    try:
        host.empty(reserve=size)
        host.truncate(size)
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise
        raise UsageError("The image size is too large for file format 'raw'") from None
    if preallocation == "off" and size:
        # qemu allocates the first block so later opens can probe alignment (one pwrite of
        # zeros, as qemu's: no module of zero-writing strategies for 4 KiB, start-up)
        host.pwrite(0, bytes(min(size, 4096)))
    if preallocation == "falloc":
        host.preallocate(0, size)
    elif preallocation == "full":
        host.write_zeros(0, size)
