"""VmdkImage: a vmdk (descriptor + extents) as a :class:`BlockDevice`.

Opening: a file starting with ``KDMV`` is a hosted sparse extent with an embedded
descriptor (monolithicSparse, streamOptimized; the embedded extent lines are ignored, the
file is the only extent).  Otherwise the file is a text descriptor whose extent lines name
files resolved through the :class:`OpenPolicy` and, by default, confined to the
descriptor's directory.  The image keeps the extents' start offsets sorted and dispatches
by bisection.  The first write changes the CID (as qemu does) so children notice.
"""

from __future__ import annotations

from diskimg.device import BlockDevice, ImageInfo, Status, requires_open
from diskimg.errors import BackingChainError, FormatError, UnsupportedFeatureError
from diskimg.hostio import zero_fill
from diskimg.plan import Run, RunKind
from diskimg.policy import OpenPolicy, full_name
from diskimg.vmdk import sparse as S
from diskimg.vmdk.descriptor import EMBEDDED_DESC_MAX, NO_PARENT, Descriptor, file_name
from diskimg.vmdk.sparse_extent import GrainMappedExtent, SparseExtent

TYPE_CHECKING = False
if TYPE_CHECKING:  # check_report is imported by check(): info and map do not load it
    from collections.abc import Iterator
    from typing import Any

    from diskimg.check_report import CheckReport
    from diskimg.hostio.host import Host
    from diskimg.vmdk.extent import Extent, Fill

#: the total virtual size is capped where int64 byte arithmetic would overflow
MAX_SIZE = (1 << 63) - 1
_DATA, _ZERO, _UNALLOC = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED


class VmdkImage(BlockDevice):
    """A vmdk image.  ``extents`` are consecutive; ``starts[i]`` is extent i's first guest
    byte; ``size`` is the sum of the extent sizes."""

    format = "vmdk"
    # declared capability (BlockDevice): compressed writes are taken as ordinary writes
    supports_compressed_write = True

    @property
    def cluster_size(self) -> int | None:
        """The grain size of the first extent when it is grain-mapped (what qemu's info
        shows as cluster_size), else None."""
        first = self.extents[0]
        return first.gb if isinstance(first, GrainMappedExtent) else None

    @property
    def compresses_every_write(self) -> bool:
        """True for a streamOptimized vmdk (every extent of compressed grains)."""
        return all(e.compressed for e in self.extents)

    def host_files(self) -> list[Host]:
        """The descriptor (or monolithic sparse) file, then each extent file."""
        return [self.host, *self._own_hosts]

    def __init__(self, host: Host, *, policy: OpenPolicy | None = None) -> None:
        self.host = host
        self.filename = host.name  # str(host.path), without pathlib (start-up)
        self.read_only = not host.writable
        self.policy = policy or OpenPolicy()
        self.extents: list[Extent] = []
        self._own_hosts: list[Host] = []
        self._cid_updated = False
        self._cid_mismatch: str | None = None
        self._embedded: S.SparseHeader | None = None
        self.starts: list[int] = []
        try:
            self._open()
            pos = 0
            for e in self.extents:
                self.starts.append(pos)
                pos += e.size
            if pos > MAX_SIZE:
                raise FormatError(f"Total size of the extents of '{self.filename}' ({pos} "
                                  "bytes) is too large")
        except BaseException:
            for h in self._own_hosts:
                h.close()
            raise
        self.size = pos
        self._mark_open()

    # --- opening -----------------------------------------------------------------------
    def _open(self) -> None:
        head = self.host.pread(0, S.SECTOR)
        fsize = self.host.size()
        if head[:4] == b"COWD":
            raise UnsupportedFeatureError("A COWD (vmfsSparse) extent is opened through its "
                                          "descriptor file (qemu 7.2 refuses it alone too)")
        if head[:4] == S.VMDK4_MAGIC:
            ext = self._open_sparse(self.host, self.filename, "", self.read_only, head)
            h = self._embedded = ext.header
            if h.desc_offset:
                start = h.desc_offset * S.SECTOR
                # descriptorSize sectors (20 when 0, as qemu), never more than 1 MiB
                n = min((h.desc_size or 20) * S.SECTOR, EMBEDDED_DESC_MAX,
                        max(0, fsize - start))
                if start >= fsize:
                    raise FormatError(f"Embedded descriptor at offset {start:#x} "
                                      "(descriptorOffset at 28) lies past the end of the file",
                                      offset=28)
                self.desc = Descriptor.parse(self.host.pread(start, n),
                                             max_size=EMBEDDED_DESC_MAX, extents=False)
            else:
                self.desc = Descriptor.parse(b"")
            self.extents = [ext]
            return
        from diskimg.vmdk.descfile import open_descriptor_file  # other files: on use

        open_descriptor_file(self, fsize)

    def _open_sparse(self, host: Host, shown: str, typ: str, ro: bool,
                     raw: bytes | None = None) -> SparseExtent:
        """The hosted sparse extent in ``host`` (``shown``: its name in messages; ``typ``:
        the descriptor's extent type, "" for a monolithic file; ``ro``: opened read-only;
        ``raw``: its first sector, when already read).  A COWD extent (``typ``
        VMFSSPARSE) is read-only; a streamOptimized one is read through its footer's
        header when its header says the directory is at the end."""
        if raw is None:
            raw = host.pread(0, S.SECTOR)
        if raw[:4] == b"COWD" and typ == "VMFSSPARSE":
            from diskimg.vmdk.cowd import CowdHeader  # rare: loaded on use

            c = CowdHeader.parse(raw)        # read-only: qemu-compatible reads only
            return SparseExtent(host, c.as_sparse(), shown, typ, True,
                                cowd_l1_size=c.l1dir_size)
        if raw[:4] != S.VMDK4_MAGIC:
            raise FormatError(f"'{shown}' is not a VMDK sparse extent (no KDMV magic)",
                              offset=0)
        h = S.SparseHeader.parse(raw)
        footer = None
        at = 0
        if h.gd_offset == S.GD_AT_END:
            fsize = host.size()
            if fsize < 4 * S.SECTOR:
                raise FormatError("Invalid footer (file too short)", offset=fsize)
            at = (fsize // S.SECTOR) * S.SECTOR - 3 * S.SECTOR
            from diskimg.vmdk.markers import parse_footer  # streamOptimized: on use

            footer = parse_footer(host.pread(at, 3 * S.SECTOR), at)
            if footer.gd_offset == S.GD_AT_END:
                raise FormatError(f"Invalid footer at {at:#x}: gdOffset is also at end",
                                  offset=at)
        if ro:
            return SparseExtent(host, h, shown, typ, True, footer_header=footer)
        from diskimg.vmdk.sparse_write import WritableSparseExtent  # the write side: on use

        return WritableSparseExtent(host, h, shown, typ, footer_header=footer,
                                    footer_at=at + S.SECTOR if footer is not None else 0)

    # --- chain ------------------------------------------------------------------------
    @property
    def cid(self) -> int:
        """The descriptor's content ID (32-bit); a child's ``parentCID`` must equal it."""
        return self.desc.cid

    @property
    def parent_cid(self) -> int:
        """The descriptor's ``parentCID``: 0xffffffff without a parent, else the CID the
        parent had when this delta was made (checked when the backing file is attached)."""
        return self.desc.parent_cid

    def has_zero_init(self) -> bool:
        """QEMU's vmdk rule: grain-mapped extents read as zeros until written, flat extents
        when their host file does; a delta disk reads its parent."""
        if self.backing is not None or self.desc.parent_hint:
            return False
        return all(e.zero_init() for e in self.extents)

    def backing_file_name(self) -> tuple[str | None, str | None]:
        """(``parentFileNameHint``, ``"vmdk"``) for a delta disk, else (None, None)."""
        hint = self.desc.parent_hint
        return (file_name(hint), "vmdk") if hint else (None, None)

    def backing_attached(self) -> None:
        """Called by the opener once ``self.backing`` is set: verify the parent CID."""
        b = self.backing
        if not isinstance(b, VmdkImage):
            self._cid_mismatch = "the backing file is not a vmdk"
        elif b.cid != self.parent_cid:
            self._cid_mismatch = (f"parentCID {self.parent_cid:x} of '{self.filename}' does "
                                  f"not match the CID {b.cid:x} of '{b.filename}'")

    # --- I/O -------------------------------------------------------------------------
    def _find(self, offset: int) -> tuple[int, Extent]:
        starts = self.starts
        if len(starts) == 1:                  # monolithic: no search (nor its import)
            return 0, self.extents[0]
        import bisect

        i = bisect.bisect_right(starts, offset) - 1
        return starts[i], self.extents[i]

    def _fill_for(self, start: int) -> Fill:
        def fill(off: int, buf: memoryview) -> None:
            g = start + off
            b = self.backing
            if b is None or g >= b.size:
                zero_fill(buf)
                return
            if self._cid_mismatch:
                raise BackingChainError(f"Could not read from the parent: {self._cid_mismatch}")
            n = min(len(buf), b.size - g)
            b.readinto(g, buf[:n])
            if n < len(buf):
                zero_fill(buf[n:])
        return fill

    def _each(self, offset: int, length: int) -> Iterator[tuple[int, int, Extent, int]]:
        pos = offset
        end = offset + length
        while pos < end:
            start, ext = self._find(pos)
            n = min(end, start + ext.size) - pos
            yield pos, start, ext, n
            pos += n

    def _readinto(self, offset: int, buf: memoryview) -> None:
        """Execute each extent's plan: runs from ``lookup``, dispatched by kind.  A
        monolithic image (one extent) goes straight to it: no generator, no search."""
        if len(self.extents) == 1:
            self._read_extent(self.extents[0], 0, offset, buf)
            return
        for pos, start, ext, n in self._each(offset, len(buf)):
            self._read_extent(ext, start, pos - start, buf[pos - offset:pos - offset + n])

    def _read_extent(self, ext: Extent, start: int, o: int, buf: memoryview) -> None:
        """Fill ``buf`` from extent offset ``o`` of ``ext`` (which starts at guest offset
        ``start``): one ``lookup`` per run; a run covering the whole request reads into
        ``buf`` itself (no slice); unallocated runs read as zeros, or the backing file's
        bytes through :meth:`_fill_for` when there is one."""
        end = o + len(buf)
        at = o                              # extent offset of buf[0]
        while o < end:
            run = ext.lookup(o, end - o)
            n = run.length
            part = buf if n == len(buf) else buf[o - at:o - at + n]
            kind = run.kind
            if kind is _DATA:
                ext.read_data(run, part)
            elif kind is _UNALLOC:
                if self.backing is None:
                    zero_fill(part)
                else:
                    self._fill_for(start)(o, part)
            elif kind is _ZERO:
                zero_fill(part)
            else:
                ext.read_compressed(run, part)
            o += n

    def _write(self, offset: int, data: memoryview) -> None:
        from diskimg.vmdk.image_write import write  # the write side: loaded on first use

        write(self, offset, data)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """qemu 7.2's write-zeroes path (:func:`~diskimg.vmdk.image_write.write_zeroes`)."""
        from diskimg.vmdk.image_write import write_zeroes

        write_zeroes(self, offset, length)

    def _discard(self, offset: int, length: int) -> None:
        """qemu's vmdk driver has no discard; neither do we (contents unchanged)."""

    def _plan(self, offset: int, length: int) -> Run:
        """The extent's run at ``offset`` (never past the extent), in guest offsets."""
        start, ext = self._find(offset)
        run = ext.lookup(offset - start, min(length, start + ext.size - offset))
        return run.replace(offset=offset) if start else run

    def _status(self, offset: int, length: int) -> Status:
        """The extent's status, which it derives from its own lookup (extent.py)."""
        start, ext = self._find(offset)
        return ext.status(offset - start, min(length, start + ext.size - offset))

    def _flush(self) -> None:
        for e in self.extents:
            if not e.read_only:
                e.flush()
        self.host.flush()

    def _close(self) -> None:
        try:
            if not self.read_only:
                for e in self.extents:
                    e.finish()
        finally:
            for h in self._own_hosts:
                h.close()
            self.host.close()

    # --- reporting ----------------------------------------------------------------------
    @requires_open
    def info(self) -> ImageInfo:
        sizes = [self.host.allocated_size(), *(h.allocated_size() for h in self._own_hosts)]
        actual = None if None in sizes else sum(s or 0 for s in sizes)
        cs = self.cluster_size
        hint, _ = self.backing_file_name()
        full = None
        if hint and not self.host.local:
            full = full_name(hint, self.host.path)  # a URL, a file object
        elif hint:
            from diskimg.hostio.file import path_name
            from diskimg.vmdk.descfile import extent_name  # a delta's parent: on use

            full = path_name(hint if hint.startswith("/") else
                             extent_name(self.host.name, hint))
        fs: dict[str, Any] = {
            "type": "vmdk",
            "data": {
                "cid": self.cid,
                "parent-cid": self.parent_cid,
                "create-type": self.desc.create_type or "",
                "extents": [e.info() for e in self.extents],
            },
        }
        return ImageInfo(
            filename=self.filename, format="vmdk", virtual_size=self.size,
            actual_size=actual, cluster_size=cs,
            backing_filename=hint, full_backing_filename=full,
            backing_filename_format="vmdk" if hint else None,
            format_specific=fs,
        )

    supports_check = True

    @requires_open
    def check(self, repair: str | None = None) -> CheckReport:
        """qemu-img check for vmdk: grain table entries must point inside their file."""
        from diskimg.vmdk.check import check_image  # check only: loaded on use

        return check_image(self)

    @requires_open
    def lint(self) -> list[dict[str, Any]]:
        """VMware-acceptance findings (structure of a streamOptimized file); these do not
        count as corruptions (qemu accepts the files) but are reported in ``findings``."""
        ext = self.extents[0] if self.extents else None
        if self.desc.create_type != "streamOptimized" or not isinstance(ext, GrainMappedExtent):
            return []
        from diskimg.vmdk.lint import lint_stream  # check/info of a streamOptimized image

        text = self.desc.pack().decode("latin-1")
        return [{"extent": ext.filename, **f}
                for f in lint_stream(ext.host.pread, ext.host.size(), text)]


def open_vmdk(host: Host, *, policy: OpenPolicy | None = None) -> VmdkImage:
    """Open the vmdk whose descriptor (or monolithic sparse file) is ``host``."""
    if policy is None:
        policy = OpenPolicy()  # for_top() returns a default policy unchanged
    return VmdkImage(host, policy=policy)


__all__ = ["NO_PARENT", "VmdkImage", "open_vmdk"]

