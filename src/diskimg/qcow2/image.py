"""Qcow2Image: a qcow2 file as a :class:`BlockDevice`.

The only qcow2 class with both state and I/O.  Write ordering (QEMU's): guest data is
written before the L2 entry that points at it; refcount blocks are flushed (and synced)
before any L2 table; L2 tables before the L1 entries that point at them; references are
dropped (clusters freed) only after the tables no longer pointing at them are on disk.
A crash therefore leaves at most leaked clusters.
"""

from __future__ import annotations

from diskimg import progname
from diskimg.device import BlockDevice, ImageInfo, MapEntry, Status, requires_open
from diskimg.errors import CorruptImageError, DiskImgError, FormatError
from diskimg.hostio import open_host_file
from diskimg.policy import OpenPolicy, combine, full_name, naming_parent
from diskimg.qcow2 import lazy_modules
from diskimg.qcow2 import flush as F
from diskimg.slotted import OnFirstUse, made_from
from diskimg.qcow2.layout import (COMPRESSION_TYPES, QCOW2_AUTOCLEAR_DATA_FILE_RAW,
                                  QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_EXT_MAGIC_BITMAPS,
                                  QCOW2_EXT_MAGIC_CRYPTO_HEADER, QCOW2_INCOMPAT_CORRUPT,
                                  QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_DIRTY, QCOW_MAX_L1_SIZE,
                                  Header, require_table_pointer)

TYPE_CHECKING = False
if TYPE_CHECKING:  # the ciphers, codecs and threads are imported when first used
    from array import array
    from collections import OrderedDict
    from collections.abc import Iterator, Mapping
    from typing import Any

    from diskimg.check_report import CheckReport
    from diskimg.crypto import SectorCipher
    from diskimg.hostio.host import Host
    from diskimg.plan import Run
    from diskimg.qcow2 import compressed, crypt, mapper
    from diskimg.qcow2 import entries as cache
    from diskimg.qcow2 import cluster as C
    from diskimg.qcow2 import entries as E
    from diskimg.qcow2.bitmaps import Bitmaps
    from diskimg.qcow2.entries import L2Table, TableCache
    from diskimg.qcow2.refcount import Refcounts
    from diskimg.qcow2.snapshot import Snapshot, SnapshotTable
else:  # the tables, reads, writes, compressed clusters, encryption: imported on first use
    lazy_modules(globals(), "diskimg.qcow2", C="cluster", E="entries", cache="entries",
                 compressed="compressed", crypt="crypt", mapper="mapper")


class Qcow2Image(BlockDevice):
    """qcow2 v2/v3 image.  Offsets are guest bytes unless named ``host``."""

    format = "qcow2"
    # declared capabilities (BlockDevice): compressed clusters, internal snapshots
    supports_compressed_write = True
    #: the persistent dirty bitmaps: read (and checked) on open when the image has the
    #: bitmaps extension, else made when first used (info and map do not load the module)
    bitmaps: Bitmaps = made_from("diskimg.qcow2.bitmaps", "Bitmaps")  # type: ignore[assignment]
    #: the active L1 table, read at open (a short read refuses it), decoded on first use;
    #: the table caches made on first use: info loads no ``array``/``collections`` (nor,
    #: for a small image, map: cache.be_u64_table)
    l1: memoryview = OnFirstUse(  # type: ignore[assignment]
        lambda img: cache.be_u64_table(img._l1_raw))  # (kept: two threads may decode)
    l2_cache: TableCache[L2Table] = OnFirstUse(  # type: ignore[assignment]
        lambda img: cache.l2_table_cache(img.host, img.cs, img.flush_refcounts))
    _decoded: OrderedDict[int, bytes] = OnFirstUse(lambda img: cache.new_lru())  # type: ignore[assignment]

    @property
    def snapshots(self) -> SnapshotTable:
        """Internal snapshot operations (diskimg.qcow2.snapshot, imported when first
        used: reading metadata needs only the table, :attr:`snapshot_list`).  A snapshot
        view answers with its image's."""
        ops: SnapshotTable | None = self.__dict__.get("_snapshot_ops")
        if ops is None:
            from diskimg.qcow2.snapshot import SnapshotTable

            view_of = self.__dict__.get("_view_of")
            ops = view_of.snapshots if view_of is not None else SnapshotTable(self)
            self.__dict__["_snapshot_ops"] = ops
        return ops

    @snapshots.setter
    def snapshots(self, value: SnapshotTable) -> None:
        self.__dict__["_snapshot_ops"] = value

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.cs * self.l2_entries

    def host_files(self) -> list[Host]:
        """The image file, then the external data file when the image opened one."""
        return [self.host, self.data_host] if self._data_file_opened else [self.host]

    def __init__(self, host: Host, *, secrets: Mapping[str, bytes] | None = None,
                 options: Mapping[str, str] | None = None,
                 policy: OpenPolicy | None = None, for_check: bool = False,
                 unlock: bool = True) -> None:
        """``unlock``: try the key secret the options name now (qemu's open), not on the
        first data access."""
        try:
            self._open(host, secrets=secrets, options=options, policy=policy,
                       for_check=for_check, unlock=unlock)
        except BaseException:
            # the opener closes ``host``; a data file this image opened is its own to close
            if self.__dict__.get("_data_file_opened"):
                self.data_host.close()
            raise

    def _open(self, host: Host, *, secrets: Mapping[str, bytes] | None,
              options: Mapping[str, str] | None, policy: OpenPolicy | None,
              for_check: bool, unlock: bool) -> None:
        self.host = host
        self.filename = host.name
        self.read_only = not host.writable
        self.policy = policy or OpenPolicy()
        self.secrets = dict(secrets or {})
        self.options = dict(options or {})
        cs = Header.cluster_size_of(host.pread(0, 512))
        # tables past the end of the file are found when used (check reports them, as qemu)
        self.header = h = Header.parse(host.pread(0, cs))
        self.cs = cs
        self.encrypted = bool(h.crypt_method)
        if self.options:
            from diskimg.image_options import check_l2_cache_entry_size

            check_l2_cache_entry_size(self.options, cs)
        self.cb = h.cluster_bits
        self.extended = h.extended_l2
        self.l2_entries = cs // (16 if self.extended else 8)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_size = cs // E.SUBCLUSTERS_PER_CLUSTER if self.extended else cs
        self.size = h.size
        self._cipher: SectorCipher | None = None
        self._luks_area: tuple[int, int] | None = None
        if h.crypt_method == 2:
            from diskimg.crypto.luks import parse_fde_extension

            ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
            self._luks_area = parse_fde_extension(ext.data if ext else None, cs)
        if not self.read_only and h.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write "
                                    "(corrupt bit set in incompatible_features at 0x48)")
        l1_bytes = h.l1_size * 8
        if l1_bytes > QCOW_MAX_L1_SIZE:
            raise CorruptImageError("Active L1 table too large", offset=36)
        self._l1_raw = host.pread_exact(h.l1_table_offset, l1_bytes, "L1 table") \
            if l1_bytes else b""
        self.l1_dirty: set[int] = set()
        self._refcounts: Refcounts | None = None
        self._pending_free: list[tuple[int, int, bool]] = []
        # (list, entries seen, lowest host offset): cluster.alloc_clusters' cache
        self._pending_low: tuple[list[tuple[int, int, bool]], int, int | None] | None = None
        self._header_dirty = False
        self._set_dirty_bit = False
        self.data_host: Host = host
        self._data_file_opened = False
        if h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW and \
                not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            raise CorruptImageError("data-file-raw requires a data file (autoclear bit 1 at "
                                    "0x58 without incompatible bit 2)", offset=88)
        if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            name = self.options.get("data-file") or h.data_file
            if not name:
                raise CorruptImageError("Image has an external data file (incompatible bit 2) "
                                        "but names none (header extension 0x44415441)")
            path = self.policy.resolve_name(name, naming_parent(host), "data file",
                                            local=host.local)
            self.data_host = open_host_file(path, not self.read_only, lock_mode=host.locked)
            self._data_file_opened = True
        if unlock and h.crypt_method and "encrypt.key-secret" in self.options:
            _ = self.cipher  # like qemu: a wrong passphrase fails the open
        self.snapshot_list = self._read_snapshot_table(for_check)
        if not (self.read_only or for_check) and h.incompatible_features & QCOW2_INCOMPAT_DIRTY:
            # qemu repairs a dirty lazy-refcount image on a read-write open, once the
            # snapshot table has been read, except when it opens it for check
            # (BDRV_O_CHECK): check then sees the stale refcounts as they are
            self._repair_dirty()
        if h.ext(QCOW2_EXT_MAGIC_BITMAPS) is not None:
            _ = self.bitmaps  # read and check the bitmap directory now, as qemu's open
        self._view_of: Qcow2Image | None = None
        self._metadata_prealloc: bool | None = None
        self._changed_since_map = False
        self._mark_open()

    @property
    def closed(self) -> bool:
        """True once closed; a snapshot view is closed with the image it shows."""
        view_of = self.__dict__.get("_view_of")
        return super().closed or (view_of is not None and view_of.closed)

    def _warns_unclosed(self) -> bool:
        return self._view_of is None and not self.is_backing  # a view holds no files

    # --- helpers ---------------------------------------------------------------------
    def _read_snapshot_table(self, for_check: bool) -> list[Snapshot]:
        """The snapshot table; when opened for check, an unreadable table reads as empty
        (qemu opens with BDRV_O_CHECK and leaves the table to the checker)."""
        self.snapshot_table_error: FormatError | None = None
        try:
            if not self.header.nb_snapshots:  # (no need for the table's module: start-up)
                require_table_pointer(self.header, self.cs)
                return []
            from diskimg.qcow2.snapshot_table import read_table

            return read_table(self)
        except FormatError as exc:
            if not for_check:
                raise
            self.snapshot_table_error = exc  # snapshot operations refuse to run
            return []

    def has_zero_init(self) -> bool:
        """QEMU's qcow2 rule: without a backing file, an image whose metadata is not
        preallocated (L1[0] unset: preallocation sets every L2 table) reads as zeros; a
        preallocated one does when it is not encrypted (its clusters would decrypt to
        garbage) and its data file does."""
        if self.backing is not None or self.header.backing_file:
            return False
        if not (len(self.l1) and self.l1[0]):
            return True
        if self.header.crypt_method:
            return False
        return self.data_host.zero_init()

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster (512 B .. 2 MiB)."""
        return self.cs

    @property
    def refcounts(self) -> Refcounts:
        """The refcount table and blocks, loaded on first use.  Invariant: dirty refcount
        blocks are flushed before any L2 table is written, so a cluster's refcount reaches
        the file before an L2 entry points at it."""
        if self._refcounts is None:
            from diskimg.qcow2.refcount import Refcounts  # not for reading (start-up)

            self._refcounts = Refcounts(self.host, self.header)
        return self._refcounts

    # --- the metadata interface (qcow2/metadata.py: MetadataImage) -------------------
    @property
    def has_data_file(self) -> bool:
        """True when the data clusters live in an external data file (identity mapped,
        without refcounts)."""
        return self._data_file_opened

    def check_open(self) -> None:
        """Raise :class:`ClosedImageError` once the image is closed."""
        self._check_open()

    def check_writable(self) -> None:
        """Raise unless the image is open read-write (and not marked corrupt)."""
        self._check_writable()

    def begin_change(self) -> None:
        """Announce a change to the image (see :func:`diskimg.qcow2.cluster.begin_change`)."""
        C.begin_change(self)

    def flush_refcounts(self) -> None:
        """Write the dirty refcount blocks and sync: before any table relying on them."""
        if self._refcounts is not None and self._refcounts.blocks.dirty:
            self._refcounts.flush()
            self.host.flush()

    def release_pending(self) -> None:
        """Write the tables, then drop the references pending since the last flush
        (:func:`diskimg.qcow2.flush.release_pending`)."""
        F.release_pending(self)

    def free_after_flush(self, host: int, length: int) -> None:
        """Drop the references to host bytes [host, host+length) at the next flush,
        after the tables written by that flush no longer point at them."""
        self._pending_free.append((host, length, False))

    def punch_free_clusters(self, clusters: list[int]) -> None:
        """Deallocate in the host file those of ``clusters`` whose refcount is 0."""
        F.punch_free_clusters(self, clusters)

    def grow_l1(self, need: int) -> None:
        """Grow the active L1 table to ``need`` entries (new clusters, one header write)."""
        from diskimg.qcow2 import resize as R

        R.grow_l1(self, need)

    def install_l1(self, l1: array[int] | memoryview) -> None:
        """Make ``l1`` (already written at the header's L1 offset) the active L1 table (a
        ``"Q"`` view of it): no entry dirty, decoded compressed clusters forgotten."""
        self.__dict__.pop("_l1_raw", None)
        self.l1 = memoryview(l1)
        self.l1_dirty.clear()
        self.__dict__.pop("_decoded", None)  # (made again when next used)

    def install_snapshots(self, snapshots: list[Snapshot]) -> None:
        """Make ``snapshots`` (already on disk and named by the header) the table."""
        self.snapshot_list = snapshots

    def install_tables(self, l1: array[int] | memoryview, snapshots: list[Snapshot],
                       l2_tables: list[tuple[int, L2Table]]) -> None:
        """After one header write switched to a new active L1 table, refcount table and
        snapshot table: install them, keep only ``l2_tables`` (clean, as on disk) in the
        L2 cache and reload the refcounts from the new table on first use."""
        self.install_l1(l1)
        self.install_snapshots(snapshots)
        self.l2_cache.clear()
        for off, table in l2_tables:
            self.l2_cache.put(off, table, dirty=False)
        self._refcounts = None

    def _repair_dirty(self) -> None:
        from diskimg.qcow2.check import check_image

        C.clear_unknown_autoclear(self.host, self.header)  # the repair changes the image
        res = check_image(self.host, self.header, "all")
        if res.exit_code != 0:
            raise CorruptImageError("Could not repair the dirty lazy-refcount image; run "
                                    f"'{progname.name()} check -r all'")
        # qemu prints its one repairing pass's lines (its open does not check twice)
        for line in res.repair_messages if res.repaired else res.messages:
            progname.message(line)
        self._reload_after_repair()

    def _reload_after_repair(self) -> None:
        """Forget every table a repair may have changed or moved: read the header, the
        active L1 table and the snapshot table again; refcounts and L2 tables on use."""
        self.header = Header.parse(self.host.pread(0, self.cs))
        self._set_dirty_bit = False  # the repair decided the dirty bit on disk
        self._l1_raw = self.host.pread_exact(
            self.header.l1_table_offset, self.header.l1_size * 8, "L1 table")
        self.__dict__.pop("l1", None)  # decoded on first use, as after open
        self.l2_cache.clear()
        self._refcounts = None
        self.snapshot_list = self._read_snapshot_table(True)

    def backing_file_name(self) -> tuple[str | None, str | None]:
        """(backing file name, backing format) as stored in the header, unresolved;
        (None, None) without a backing file, format None when the header has none."""
        return self.header.backing_file, self.header.backing_format

    # --- the read side: qcow2/mapper.py, compressed.py, crypt.py (and writes')
    def _l2_location(self, cluster: int) -> tuple[int, int]:
        """(L1 index, L2 table host offset or 0) for guest cluster index ``cluster``
        (entries, not the mapper: a new image's writes do not load the read side)."""
        return E.l2_offset(self.l1, cluster, self.l2_bits, self.cs,
                           self.header.l1_table_offset)

    def _check_data_offset(self, host_off: int, l2_off: int, idx: int, guest: int) -> None:
        mapper.check_data_offset(self, host_off, l2_off, idx, guest)  # (see there)

    def _cluster_type(self, ent: int) -> int:  # (with this image's ext-L2, data-file flags)
        return E.cluster_type(ent, extended=self.extended, has_data_file=self._data_file_opened)

    @property
    def data_file_name(self) -> str | None:
        """The external data file's name (where DATA runs' host offsets lie), else None."""
        return self.data_host.name if self._data_file_opened else None

    def _plan(self, offset: int, length: int) -> Run:
        return mapper.lookup(self, offset, length)

    def _unallocated_until(self, offset: int, end: int) -> int:
        return mapper.unallocated_until(self, offset, end)

    @property
    def parallel_compressed_reads(self) -> bool:  # type: ignore[override]
        """Compressed clusters of an unencrypted image are decoded on worker threads."""
        return not self.header.crypt_method

    def read_compressed(self, run: Run, dst: memoryview) -> None:
        """Decode the COMPRESSED run ``run`` of :meth:`plan` into ``dst`` (thread-safe)."""
        self._check_open()
        compressed.read_compressed(self, run, dst)

    @property
    def cipher(self) -> SectorCipher | None:
        """The sector cipher of an encrypted image, unlocked on first data access with the
        secret named by the ``encrypt.key-secret`` option; None when not encrypted."""
        return crypt.cipher(self)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        mapper.readinto(self, offset, buf)

    def _status(self, offset: int, length: int) -> Status:
        return mapper.status(self, mapper.lookup(self, offset, length))

    def _status_batch(self, offset: int, length: int) -> list[Status]:
        return mapper.statuses(self, offset, length)  # a whole L2 table's runs (map)

    def map(self, offset: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """qemu-img map's entries (see :meth:`BlockDevice.map`).  After changes the image
        is flushed first, so the entries are what qemu-img map reports for the file and
        what map() reports after reopening it (see :attr:`metadata_preallocation`)."""
        self._check_open()
        if self._changed_since_map and not self.read_only:
            self.flush()
            self._metadata_prealloc = None
        self._changed_since_map = False
        return super().map(offset, length)

    # --- writes: qcow2/cluster.py, zero.py, compressed_write.py, resize.py, flush.py --
    @property
    def metadata_preallocation(self) -> bool:
        """QEMU's guess (made on first use) whether the image was created with
        ``preallocation=metadata``: at least ``max(real * 10 / 9, real + 2)`` clusters have
        a refcount, ``real`` being the clusters the host file really allocates.  Only then
        does block status report holes in the host file under data clusters as zeros.

        qemu-img makes it on a freshly opened file.  Every change to the image forgets it;
        it is made again on the file as a flush would leave it
        (:func:`diskimg.qcow2.flush.file_after_flush`, computed from the cached tables),
        so block_status() in a session agrees with qemu-img map of the flushed file
        without a flush per call."""
        return F.metadata_preallocation(self)

    def _write(self, offset: int, data: memoryview) -> None:
        C.write(self, offset, data)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        from diskimg.qcow2 import zero as Z

        Z.write_zeroes(self, offset, length, may_unmap)

    def _discard(self, offset: int, length: int) -> None:
        from diskimg.qcow2 import zero as Z

        Z.discard(self, offset, length)

    def _flush(self) -> None:
        F.flush(self)

    def _close(self) -> None:
        F.close(self)

    def _mark_corrupt(self, error: CorruptImageError) -> None:
        F.mark_corrupt(self, error)

    def compress_cluster(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The compressed form of one cluster of guest data (padded with zeros), or None
        when it would not be smaller than a cluster.  Pure and thread-safe (zlib and
        zstandard release the GIL), so callers may compress in a thread pool."""
        from diskimg.qcow2 import compressed_write as CW

        return CW.compress_cluster(self, data)

    @requires_open
    def align_compressed_end(self) -> None:
        """Grow the image file to a multiple of 512 bytes, as qemu-img's ``convert -c``
        does when it finishes (a zero-length compressed write), so sector-based readers can
        read the last compressed cluster whole.  Only bytes inside an already allocated
        cluster are added: refcounts are unchanged."""
        from diskimg.qcow2 import compressed_write as CW

        CW.align_compressed_end(self)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview,
                         *, compressed: bytes | None = None) -> None:
        """Write one whole cluster compressed (qemu-io ``write -c``).

        ``offset`` must be cluster aligned and ``data`` one cluster long (shorter only for
        the last cluster of the disk, padded with zeros).  Data that does not compress to
        less than a cluster is written as a normal cluster, as QEMU does.  ``compressed``
        passes a result of :meth:`compress_cluster` computed elsewhere (e.g. in a thread).
        """
        from diskimg.qcow2 import compressed_write as CW

        CW.write_compressed(self, offset, data, compressed=compressed)

    @requires_open
    def write_compressed_clusters(
            self, offset: int,
            clusters: list[tuple[bytes | bytearray | memoryview, bytes | None]]) -> None:
        """Write consecutive whole clusters from cluster-aligned guest ``offset``: each
        ``(data, compressed)`` pair as :meth:`write_compressed` would with that
        ``compressed`` (None: stored as a normal cluster).

        Same host allocations, in the same order, as writing them one by one (qemu-img
        convert -c's layout); the data goes out in as few pwrite/pwritev calls as host
        contiguity allows, all of it before any L2 entry changes."""
        from diskimg.qcow2 import compressed_write as CW

        CW.write_compressed_clusters(self, offset, clusters)

    @requires_open
    def preallocate(self, start: int, end: int, mode: str) -> None:
        """Give the unallocated clusters of guest [start, end) L2 entries and host clusters
        (``metadata``), then also reserve (``falloc``) or zero-fill (``full``) the new
        host space, as qemu's preallocation does on create and resize."""
        from diskimg.qcow2 import resize as R

        R.preallocate(self, start, end, mode)

    @requires_open
    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Grow (or with ``shrink`` shrink) the virtual disk to ``new_size`` bytes;
        ``preallocation`` (off/metadata/falloc/full) applies to the grown part."""
        from diskimg.qcow2 import resize as R

        R.resize(self, new_size, shrink=shrink, preallocation=preallocation)

    # --- info ------------------------------------------------------------------------
    @requires_open
    def info(self) -> ImageInfo:
        h = self.header
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data["compression-type"] = COMPRESSION_TYPES[h.compression_type]
            data["lazy-refcounts"] = bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
            if (bitmaps := self.__dict__.get("bitmaps")) and bitmaps.entries:  # (see open)
                data["bitmaps"] = bitmaps.info()
        else:
            data["compression-type"] = COMPRESSION_TYPES[h.compression_type]
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
        if h.data_file is not None:
            data["data-file"] = h.data_file
            data["data-file-raw"] = bool(h.autoclear_features & 2)
        if h.crypt_method == 1:
            data["encrypt"] = {"format": "aes"}
        elif h.crypt_method == 2 and self._luks_area is not None:
            from diskimg.crypto.luks import luks_info

            off, length = self._luks_area
            try:
                area = self.host.pread_exact(off, min(length, 1 << 20), "LUKS header")
                data["encrypt"] = luks_info(area)
            except DiskImgError:
                data["encrypt"] = {"format": "luks"}
        from diskimg.info_text import image_name  # (what info prints: not for a copy)
        backing = h.backing_file
        full = None
        if backing is not None and not self.host.local:
            full = full_name(backing, self.host.path)  # a URL, a file object
        elif backing is not None:
            full = combine(self.filename, backing)  # as written (./x stays)
        return ImageInfo(
            filename=image_name("qcow2", self.filename, self.options, ("encrypt.key-secret",)),
            format="qcow2",
            virtual_size=self.size,
            actual_size=self.host.allocated_size(),
            dirty_flag=bool(h.incompatible_features & QCOW2_INCOMPAT_DIRTY),
            cluster_size=self.cs,
            encrypted=self.encrypted,
            backing_filename=backing,
            full_backing_filename=full,
            backing_filename_format=h.backing_format if backing is not None else None,
            format_specific={"type": "qcow2", "data": data},
            snapshots=[s.to_json() for s in self.snapshot_list],
        )

    @requires_open
    def snapshot_view(self, snapshot_id: str | None = None,
                      name: str | None = None) -> Qcow2Image:
        """A read-only device showing the disk as snapshot ``snapshot_id``/``name`` saw it.

        It shares this image's files and backing chain: closing it closes nothing, and
        closing the image closes it (calls then raise :class:`ClosedImageError`)."""
        from diskimg.qcow2.snapshot import SnapshotNotFoundError

        sn = next((s for s in self.snapshot_list if (snapshot_id is None or s.id == snapshot_id)
                   and (name is None or s.name == name)), None)
        if sn is None:
            raise SnapshotNotFoundError(snapshot_id if snapshot_id is not None else str(name))
        view = object.__new__(Qcow2Image)
        view.__dict__.update(self.__dict__)
        view.bitmaps = self.bitmaps  # the image's, as every other table
        view.read_only = True
        view._view_of = self
        view.owns_backing = False
        view.reopen_with = None  # a view is not what diskimg.open opened: no pickling
        view.size = sn.disk_size if sn.disk_size is not None else self.size
        for made in ("_l1_raw", "l1", "l2_cache", "_decoded"):  # the view's own
            view.__dict__.pop(made, None)
        view.l1 = memoryview(self.snapshots._read_l1(sn.l1_table_offset, sn.l1_size))
        view.l1_dirty = set()
        view.l2_cache = cache.l2_table_cache(self.host, self.cs, None)
        view._pending_free = []
        view._mark_open()
        return view

    supports_check = True
    supports_check_repair = True

    @requires_open
    def check(self, repair: str | None = None) -> CheckReport:
        """Consistency check (and repair) like ``qemu-img check``; see qcow2.check."""
        from diskimg.qcow2.check import check_image

        if repair is not None:
            self._check_writable()
        self.flush()
        if repair is not None:
            C.clear_unknown_autoclear(self.host, self.header)
        res = check_image(self.host, self.header, repair)
        if repair is not None:
            self._reload_after_repair()
        return res
