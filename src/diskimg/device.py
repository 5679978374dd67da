"""The block-device interface every format implements, and its shared machinery.

A :class:`BlockDevice` is a fixed-size array of bytes addressed by guest offset.  Formats
implement a handful of primitives (``_readinto``, ``_write``, ``_write_zeroes``,
``_discard``, ``_plan`` (the mapper, a :class:`~diskimg.plan.Run`) and ``_status`` (block
status derived from it)); this module builds ``read``, ``plan``, ``block_status``, ``map``
(qemu-img map's entries, walking backing chains), ``as_file`` and the context-manager
protocol on top of them.
"""

from __future__ import annotations

import io
import os

# warnings.warn is _warnings.warn (a built-in module, loaded with the interpreter):
# importing the warnings module, and the collections, functools, contextlib and types
# modules this one used, costs start-up (issue 20)
from _warnings import warn

from diskimg.errors import ClosedImageError, CorruptImageError, UnsupportedFeatureError, UsageError
from diskimg.records import ImageInfo as ImageInfo  # re-exported (they lived here)
from diskimg.records import MapEntry as MapEntry
from diskimg.records import Status as Status
from diskimg.records import mergeable
from diskimg.slotted import made_from

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import ClassVar, Concatenate, ParamSpec, Self, TypeVar

    from diskimg.check_report import CheckReport  # built by the checkers, imported there
    from diskimg.hostio.host import Host
    from diskimg.internal_snapshots import InternalSnapshots  # a Protocol: types only
    from diskimg.persistent_bitmaps import PersistentBitmaps
    from diskimg.plan import Run

    _P = ParamSpec("_P")
    _R = TypeVar("_R")
    _D = TypeVar("_D", bound="BlockDevice")


class BlockDevice:
    """Base class of every image format.

    Invariants: ``0 <= offset`` and ``offset + length <= size`` for every data call (checked
    here, so formats may assume it); a read-only device refuses every mutating call with
    :class:`UsageError`; ``close()`` flushes, is idempotent, and releases the host files.

    After ``close()`` every call raises :class:`ClosedImageError`.  An image that is never
    closed is closed when it is garbage collected, with a ``ResourceWarning`` as Python's
    files give, so its files and QEMU's locks do not outlive it; its backing files and
    snapshot views close quietly (the image that owns them warns).
    """

    # Lifecycle, for formats: ``__init__`` calls ``self._mark_open()`` as its last step
    # (an image that failed to open is released by its opener and never finalized), and
    # public methods beyond this class's carry @requires_open.

    format: str = ""
    size: int = 0
    read_only: bool = True
    backing: BlockDevice | None = None
    owns_backing: bool = True  # False for views that share another device's chain
    filename: str = ""
    #: set by the opener of a backing file: its finalizer closes it without a warning
    #: (the image that owns it gives that warning)
    is_backing: bool = False
    #: set by :func:`diskimg.open`: its reopening function and what it was given (path or
    #: URL, mode, format, options, policy; never secrets).  An image pickles as these and
    #: unpickles by opening it again; None (file object, backing file, view): no pickle
    reopen_with: tuple[Callable[[dict[str, object]], BlockDevice], dict[str, object]] | None \
        = None

    def __reduce__(self) -> tuple[object, ...]:
        if self.reopen_with is None:
            raise UsageError(f"Cannot pickle the {self.format} image '{self.filename}': it "
                             "was not opened from a path or URL (a file object, a backing "
                             "file or a view cannot be opened again elsewhere)")
        fn, args = self.reopen_with
        return (fn, (dict(args),))
    #: whether the format has a :meth:`check` (qcow2, vmdk; raw has none, as in qemu)
    supports_check: bool = False
    #: whether :meth:`check` can repair (``repair="leaks"``/``"all"``); a format without
    #: a checker, or whose checker only reports (vmdk, as qemu's), leaves it False
    supports_check_repair: bool = False
    #: whether ``convert -c`` can write this format (:meth:`write_compressed` and
    #: friends): qcow2 stores compressed clusters; vmdk takes them as ordinary writes, as
    #: qemu's vmdk driver does (a streamOptimized extent compresses every grain anyway);
    #: raw refuses (qemu-img: "Compression not supported for this file format")
    supports_compressed_write: bool = False
    #: the guest bytes are stored encrypted (LUKS, a qcow2 with an encryption method):
    #: every command but info needs the key secret
    encrypted: bool = False
    #: the internal snapshots of the image (qcow2's table); None for a format without
    #: them (raw, vmdk): ``snapshot -l`` lists none, every other action is refused
    snapshots: InternalSnapshots | None = None
    #: the persistent dirty bitmaps (qcow2 v3's); a format without them lists none and
    #: refuses every change with UnsupportedFeatureError
    bitmaps: PersistentBitmaps = made_from("diskimg.persistent_bitmaps", "NoBitmaps")  # type: ignore[assignment]
    #: the format was probed, not named, and it is raw: qemu-img warns before writing,
    #: and refuses writes to sector 0 that would make the file probe as another format
    probed: bool = False
    #: the image options the device was opened with (qcow2: ``encrypt.key-secret``);
    #: empty for a format that takes none
    options: Mapping[str, str] = type(type.__dict__)({})  # types.MappingProxyType({})
    #: True once :meth:`close` ran (set by :meth:`_mark_open` and :meth:`close`)
    _closed: bool = False
    #: ``id()`` of this process's devices marked open and not closed (the CLI's exit asks)
    open_devices: ClassVar[set[int]] = set()

    # --- primitives formats implement ------------------------------------------------
    def _readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def _write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._write(offset, memoryview(bytes(length)))

    def _discard(self, offset: int, length: int) -> None:
        """Default: discard is advisory, do nothing."""

    def _plan(self, offset: int, length: int) -> Run:
        """This layer's run at ``offset`` (see :meth:`plan`); every format implements it."""
        raise NotImplementedError

    def _status(self, offset: int, length: int) -> Status:
        """This layer's block status at ``offset`` (at most ``length`` bytes), derived from
        :meth:`_plan` (see :meth:`block_status`).  The default, for a device with no
        mapper: its bytes are all its own data, at no host offset."""
        return Status(length, allocated=True, data=True, zero=False)

    def _unallocated_until(self, offset: int, end: int) -> int:
        """Where the unallocated region of this layer that reaches ``offset`` ends (at
        most ``end``), when the format knows it cheaply; ``offset`` when it does not."""
        return offset

    def _status_coarse(self, offset: int, length: int, st: Status | None = None) -> Status:
        """:meth:`_status` (or ``st``, its answer), an unallocated run taken on past the
        format's table boundaries (see :meth:`_unallocated_until`)."""
        st = self._status(offset, length) if st is None else st
        if not st.allocated and st.length < length:
            more = self._unallocated_until(offset + st.length, offset + length) - offset
            if more > st.length:
                st = Status(more, st.allocated, st.data, st.zero, st.offset, st.filename)
        return st

    def _status_batch(self, offset: int, length: int) -> list[Status]:
        """:meth:`_status_coarse` of one or more successive runs from ``offset``: what
        :meth:`map` asks for (qcow2 answers a whole L2 table of runs at once)."""
        return [self._status_coarse(offset, length)]

    def _flush(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _corruption_guard(self) -> _CorruptionGuard:
        """Inconsistent metadata found while writing: let the format mark the image corrupt
        (qcow2 sets its corrupt bit and goes read-only, as qemu) before the error leaves."""
        return _CorruptionGuard(self)

    def _mark_corrupt(self, error: CorruptImageError) -> None:
        """Formats with a corrupt flag override this; the default only refuses writes."""
        self.read_only = True

    def info(self) -> ImageInfo:
        """What ``qemu-img info`` reports for this image (see :class:`ImageInfo`)."""
        raise NotImplementedError

    def has_zero_init(self) -> bool:
        """Whether every range of the image that was never written reads as zeros, as the
        image is now (QEMU's ``bdrv_has_zero_init``): what lets ``convert`` leave the zero
        runs of a new target unwritten.  False for an image with a backing file (it reads
        the backing file there); each format declares its own rule, the default is False."""
        return False

    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Change the virtual size to ``new_size`` bytes (formats that support it)."""
        self._check_open()
        raise UnsupportedFeatureError(f"Image format '{self.format}' does not support resize")

    def backing_file_name(self) -> tuple[str | None, str | None]:
        """(backing file name, backing format) as the image stores them, unresolved;
        ``(None, None)`` for an image without one (the default: raw has none)."""
        return None, None

    def backing_attached(self) -> None:
        """Called by the opener once :attr:`backing` is set, for a format that verifies its
        backing file (vmdk's parent CID); the default does nothing."""

    @property
    def cluster_size(self) -> int | None:
        """Bytes per cluster (qcow2) or grain (a sparse vmdk's first extent): ``qemu-img
        info``'s ``cluster_size``; None without clusters (raw, a flat vmdk)."""
        return None

    @property
    def compresses_every_write(self) -> bool:
        """Whether the format stores every write compressed, whole clusters at a time (a
        streamOptimized vmdk: qemu's ``needs_compressed_writes``), so that qemu-img
        converts into it a cluster at a time, as with ``-c``; False for the others."""
        return False

    @property
    def l2_span(self) -> int | None:
        """Guest bytes one second-level mapping table of the format maps (qcow2: one L2
        table), the most one block-status answer of QEMU's driver covers; None for a
        format without such tables (raw) or that does not bound its answers by them."""
        return None

    def host_files(self) -> list[Host]:
        """The host files behind this device, each once: the image file first, then the
        files it opened for its data (qcow2's data file, vmdk's extents).  Backing files
        are devices of their own (:attr:`backing`) and are not listed."""
        return []

    def snapshot_view(self, snapshot_id: str | None = None,
                      name: str | None = None) -> BlockDevice:
        """A read-only device showing the disk as internal snapshot ``snapshot_id`` /
        ``name`` saw it (formats with internal snapshots override this); the default
        raises :class:`UnsupportedFeatureError` in qemu-img's words."""
        self._check_open()
        raise UnsupportedFeatureError(
            f"Failed to load snapshot: Block format '{self.format}' used by device '' does "
            "not support temporarily loading internal snapshots", operation="load snapshot")

    # --- compressed writes (``convert -c``, qemu-io ``write -c``) ------------------------
    def _compression_refused(self) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(
            f"Image format '{self.format}' does not support compressed writes "
            "(Compression not supported for this file format)", field="compress")

    def compressed_cluster_size(self) -> int:
        """The unit of :meth:`write_compressed`: whole clusters of this many bytes.  A
        format without compressed writes (see :attr:`supports_compressed_write`), or one
        without clusters (a flat vmdk: qemu-img's "invalid cluster size"), raises
        :class:`UnsupportedFeatureError`."""
        self._check_open()
        if not self.supports_compressed_write:
            raise self._compression_refused()
        cs = self.cluster_size
        if not cs:
            raise UnsupportedFeatureError("invalid cluster size", field="cluster_size")
        return cs

    def compress_cluster(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The compressed form of one cluster of guest data, or None to store it as it is.
        The default, for a format that takes compressed writes as ordinary ones (vmdk), is
        None; one without them raises :class:`UnsupportedFeatureError`.  Pure, thread-safe."""
        if not self.supports_compressed_write:
            raise self._compression_refused()
        return None

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview,
                         *, compressed: bytes | None = None) -> None:
        """Write one whole cluster compressed (qemu-io ``write -c``); ``compressed`` is a
        result of :meth:`compress_cluster` computed elsewhere.  The default writes it as
        an ordinary write (vmdk, as qemu's driver); a format without compressed writes
        raises :class:`UnsupportedFeatureError` and changes nothing."""
        self._check_writable()
        if not self.supports_compressed_write:
            raise self._compression_refused()
        self.write(offset, data)

    def write_compressed_clusters(
            self, offset: int,
            clusters: list[tuple[bytes | bytearray | memoryview, bytes | None]]) -> None:
        """Consecutive whole clusters from cluster-aligned ``offset``: each ``(data,
        compressed)`` pair as :meth:`write_compressed` writes it (None: stored as an
        ordinary cluster).  The default writes them one by one."""
        self._check_writable()
        if not self.supports_compressed_write:
            raise self._compression_refused()
        pos = offset
        for data, packed in clusters:
            n = memoryview(data).nbytes
            if packed is None:
                self.write(pos, data)
            else:
                self.write_compressed(pos, data, compressed=packed)
            pos += n

    def align_compressed_end(self) -> None:
        """What ``convert -c`` does to the image file when it finishes (qcow2 pads it to
        a whole sector); the default does nothing."""
        self._check_open()

    def check(self, repair: str | None = None) -> CheckReport:
        """``qemu-img check`` of this image, and its repair when ``repair`` is ``"leaks"``
        or ``"all"`` (see :attr:`supports_check_repair`); formats with a checker override
        this, the default raises :class:`UnsupportedFeatureError` (qemu-img's exit 63)."""
        self._check_open()
        raise UnsupportedFeatureError("This image format does not support checks")

    # --- lifecycle -------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (as for files)."""
        return self._closed

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedImageError(f"I/O operation on closed image '{self.filename}'")

    def _warns_unclosed(self) -> bool:
        """Whether the finalizer of an unclosed device warns (not for backing files)."""
        return not self.is_backing

    def _mark_open(self) -> None:
        """The last step of opening: from now on the finalizer closes this device."""
        self._closed = False
        self._opener_pid = os.getpid()
        BlockDevice.open_devices.add(id(self))

    def __del__(self) -> None:
        # not "_closed" in __dict__: construction failed, the opener released the files
        if self.__dict__.get("_closed", True):
            return
        if self.__dict__.get("_opener_pid") != os.getpid():
            return  # a forked child's copy: flushing or unlocking would act on the parent's
        if self._warns_unclosed():
            warn(f"unclosed image {self.filename!r}", ResourceWarning, stacklevel=2, source=self)
        self.close()

    # --- public API ------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if type(offset) is not int or type(length) is not int:
            offset, length = _ints(offset, length)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(
                f"request [{offset}, {offset + length}) is outside the image (size {self.size})"
            )

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise UsageError(f"'{self.filename}' is opened read-only")

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at guest ``offset`` (both in bytes, range inside the disk)."""
        self._check_open()
        self._check_range(offset, length)
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` with the guest bytes at ``offset``; returns ``len(buf)``."""
        self._check_open()
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            self._readinto(offset, mv)
        return len(mv)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest ``offset``; the range must lie inside the disk."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            with self._corruption_guard():
                self._write(offset, mv)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make the range read as zeros; ``may_unmap`` allows deallocating it."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            with self._corruption_guard():
                self._write_zeroes(offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        """Tell the format the range is unused; contents afterwards are unspecified by
        QEMU.  qcow2 discards whole clusters, which then read as zeros; a compat 0.10
        image with a backing file ignores discards, as QEMU does (deallocating would
        expose the backing file's data)."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            with self._corruption_guard():
                self._discard(offset, length)

    def flush(self) -> None:
        """Make everything written so far durable on the host."""
        self._check_open()
        if not self.read_only:
            self._flush()

    def close(self) -> None:
        """Flush, release locks and host files.  Safe to call twice."""
        if self._closed:
            return
        try:
            if not self.read_only:
                self._flush()
        finally:
            self._closed = True
            BlockDevice.open_devices.discard(id(self))
            try:
                self._close()
            finally:
                if self.backing is not None and self.owns_backing:
                    self.backing.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chain(self) -> list[BlockDevice]:
        """This device followed by its backing devices, top first."""
        out: list[BlockDevice] = []
        dev: BlockDevice | None = self
        while dev is not None:
            out.append(dev)
            dev = dev.backing
        return out

    # --- the read plan and block status ----------------------------------------------
    # Two public answers, one source: plan() is this layer's mapper, a typed Run
    # (diskimg.plan); block_status() is QEMU's block status (Status flags) through the
    # backing chain.  Invariant: a layer's Status is derived from its Run (the format's
    # _status translates _plan's answer, see each format): it starts at the same offset,
    # is at most as long, ``allocated == run.allocated``; ``data`` for COMPRESSED and
    # DATA runs, ``zero`` for ZERO runs, except that a format may report a hole of the
    # host file under a DATA run as zeros (raw: zero, not data; qcow2 with metadata
    # preallocation and vmdk flat extents: zero and data); ``offset`` only where the
    # bytes lie verbatim (never for COMPRESSED runs or encrypted qcow2 clusters).
    def plan(self, offset: int, length: int) -> Run:
        """What this layer says about the guest bytes at ``offset`` (its backing file is
        not consulted): one :class:`~diskimg.plan.Run` starting at ``offset``, at most
        ``length`` (> 0) bytes long, of one :class:`~diskimg.plan.RunKind` (DATA at a host
        offset, ZERO, UNALLOCATED (the backing file's bytes, or zeros), COMPRESSED).
        Successive calls give a plan :func:`diskimg.plan.check_plan` accepts."""
        self._check_open()
        self._check_range(offset, length)
        if length <= 0:
            raise UsageError("plan() needs a non-empty range")
        return self._plan(offset, length)

    #: whether :meth:`read_compressed` decodes COMPRESSED runs and may run on several
    #: threads at once (a converter decodes them on a pool); qcow2 without encryption
    parallel_compressed_reads: bool = False

    def read_compressed(self, run: Run, dst: memoryview) -> None:
        """Fill ``dst`` with the guest bytes from ``run.offset`` of the COMPRESSED run
        ``run`` (from :meth:`plan`; ``len(dst) <= run.length``), touching no shared state
        (see :attr:`parallel_compressed_reads`); formats without such runs raise
        :class:`UnsupportedFeatureError`."""
        self._check_open()
        raise UnsupportedFeatureError(f"Image format '{self.format}' has no compressed "
                                      "runs to decode")

    def block_status(self, offset: int, length: int, coarse: bool = False, *,
                     top_only: bool = False) -> tuple[Status, int]:
        """Status of the run at ``offset`` through the backing chain, and its depth.

        ``coarse`` lets an unallocated run go on past the format's table boundaries
        (qemu stops at each L2 table): what ``map`` and ``convert`` merge anyway, taken in
        one step, so their cost follows the allocated data rather than the virtual size.
        ``top_only``: this layer's status alone (depth 0), the backing chain not consulted
        (qemu's ``bdrv_block_status`` of one node): a range the layer leaves to an existing
        backing file is not reported as zeros, whatever the format says (a vmdk's
        unallocated grains included); past the end of a shorter backing file the caller
        decides (qemu-img convert's progress and copy differ there)."""
        self._check_open()
        if type(offset) is not int or type(length) is not int:
            offset, length = _ints(offset, length)
        depth = 0
        dev: BlockDevice = self
        while True:
            st = dev._status_coarse(offset, length) if coarse else dev._status(offset, length)
            length = min(length, st.length)
            if st.allocated or dev.backing is None:
                return Status(length, st.allocated, st.data, st.zero, st.offset, st.filename), depth
            if top_only:  # left to the backing file: not zeros, whatever the format says
                return Status(length, False, st.data, False, st.offset, st.filename), 0
            if offset >= dev.backing.size:
                # qemu: past the end of a shorter backing file reads as zeros, decided here,
                # with this layer's own host offset (an extended-L2 cluster's unallocated
                # subclusters have one)
                return Status(length, False, False, True, st.offset, st.filename), depth
            length = min(length, dev.backing.size - offset)
            dev = dev.backing
            depth += 1

    def dirty_extents(self, name: str) -> Iterator[tuple[int, int]]:
        """The dirty guest ranges (offset, length) of persistent bitmap ``name``, merged,
        in order, clipped to the disk size."""
        self._check_open()
        return self.bitmaps.dirty_extents(name)

    def map(self, offset: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """Yield qemu-img map entries covering [offset, offset+length), merged like qemu."""
        self._check_open()  # now, not on the first next()
        if type(offset) is not int or offset < 0 or (
                length is not None and (type(length) is not int or length < 0)):
            offset, n = _ints(offset, 0 if length is None else length)
            length = None if length is None else n
        return self._map(offset, length)

    def _map(self, offset: int, length: int | None) -> Iterator[MapEntry]:
        end = self.size if length is None else min(self.size, offset + length)
        pending: MapEntry | None = None
        pos = offset
        alone = self.backing is None
        while pos < end:
            self._check_open()
            for top in self._status_batch(pos, end - pos):
                stop = pos + (top.length if top.length > 0 else 1)  # (0: asserted below)
                while pos < stop:  # what block_status(pos, coarse=True) answers
                    st, depth = (top, 0) if alone or top.allocated else \
                        self.block_status(pos, stop - pos, coarse=True)
                    if st.length <= 0:
                        raise AssertionError("block status made no progress")
                    e = MapEntry(pos, st.length, depth, st.allocated, st.zero, st.data,
                                 st.offset, st.filename)
                    if pending is not None and mergeable(pending, e):
                        pending = MapEntry(pending.start, pending.length + e.length,
                                           pending.depth, pending.present, pending.zero,
                                           pending.data, pending.offset, pending.filename)
                    else:
                        if pending is not None:
                            yield pending
                        pending = e
                    pos += st.length
        if pending is not None:
            yield pending

    def as_file(self) -> io.BufferedRandom | io.BufferedReader:
        """A buffered file object over the guest bytes (usable by tarfile, shutil, ...):
        ``BufferedRandom`` when the device is writable, ``BufferedReader`` otherwise."""
        from diskimg.device_io import DeviceIO

        self._check_open()
        if self.read_only:
            return io.BufferedReader(DeviceIO(self))
        return io.BufferedRandom(DeviceIO(self))


def __getattr__(name: str) -> object:
    """``DeviceIO``, which lived here (diskimg.device_io), imported when first asked for:
    a command that makes no file object of an image does not load it (start-up)."""
    if name == "DeviceIO":
        from diskimg.device_io import DeviceIO

        return DeviceIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ints(offset: object, length: object) -> tuple[int, int]:
    """:func:`~diskimg.params.check_int` of both, imported only when needed (start-up)."""
    from diskimg.params import check_int

    return check_int("offset", offset), check_int("length", length)


def requires_open(fn: Callable[Concatenate[_D, _P], _R]) -> Callable[Concatenate[_D, _P], _R]:
    """Decorator for a format's public methods: :class:`ClosedImageError` once closed."""

    def wrapper(self: _D, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self._check_open()
        return fn(self, *args, **kwargs)

    # functools.wraps, without importing functools (start-up)
    wrapper.__module__ = fn.__module__
    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    wrapper.__annotations__ = fn.__annotations__
    wrapper.__dict__.update(fn.__dict__)
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


class _CorruptionGuard:
    """``with dev._corruption_guard():`` — a CorruptImageError leaving the block marks
    ``dev`` corrupt first (:meth:`BlockDevice._mark_corrupt`), then goes on."""

    __slots__ = ("dev",)

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: object) -> None:
        if isinstance(error, CorruptImageError):
            self.dev._mark_corrupt(error)  # and the error goes on

