"""Qcow2Image: a qcow2 file as a :class:`BlockDevice`.

The only qcow2 class with both state and I/O.  Write ordering (QEMU's): guest data is
written before the L2 entry that points at it; refcount blocks are flushed (and synced)
before any L2 table; L2 tables before the L1 entries that point at them; references are
dropped (clusters freed) only after the tables no longer pointing at them are on disk.
A crash therefore leaves at most leaked clusters.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from diskimg.check_report import CheckReport
from diskimg.device import (BlockDevice, ImageInfo, MapEntry, Status, host_has_zero_init,
                             requires_open)
from diskimg.errors import (
    CorruptImageError,
    DiskImgError,
    FormatError,
    UnsupportedFeatureError,
    UsageError,
)
from diskimg.hostio import HostFile, all_zero, open_host_file
from diskimg.plan import Run
from diskimg.policy import OpenPolicy
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import compressed, crypt, header_io, mapper, reader
from diskimg.qcow2.cache import L2Table, TableCache, be_u64_array, pack_be_u64_array
from diskimg.qcow2.layout import (
    COMPRESSION_TYPES,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_AUTOCLEAR_MASK,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_MAX_L1_SIZE,
    Header,
)
from diskimg.qcow2.refcount import Refcounts

if TYPE_CHECKING:  # the ciphers, codecs and threads are imported when first used

    from diskimg.crypto import SectorCipher
    from diskimg.qcow2.snapshot import Snapshot

_CRYPT_PIECE = crypt.CRYPT_PIECE  # bytes encrypted per cipher call (see crypt.py)


def clear_unknown_autoclear(host: HostFile, h: Header) -> None:
    """Clear the autoclear feature bits diskimg does not know (all but bit 0, bitmaps,
    which every write keeps true, and bit 1, raw external data) in the header and in
    ``h``, synced before the caller changes anything else: that is how a later reader
    tells that a writer unaware of those features touched the image (qemu clears them
    on every read-write open; diskimg on the first change, so that a refused operation
    leaves the file byte-identical).  v2 headers have no autoclear field."""
    if h.version >= 3 and h.autoclear_features & ~QCOW2_AUTOCLEAR_MASK:
        h.autoclear_features &= QCOW2_AUTOCLEAR_MASK
        header_io.set_autoclear(host, h.autoclear_features)
        host.flush()


class Qcow2Image(BlockDevice):
    """qcow2 v2/v3 image.  Offsets are guest bytes unless named ``host``."""

    format = "qcow2"

    def __init__(self, host: HostFile, *, secrets: Mapping[str, bytes] | None = None,
                 options: Mapping[str, str] | None = None,
                 policy: OpenPolicy | None = None, for_check: bool = False) -> None:
        try:
            self._open(host, secrets=secrets, options=options, policy=policy,
                       for_check=for_check)
        except BaseException:
            # the opener closes ``host``; a data file this image opened is its own to close
            if self.__dict__.get("_data_file_opened"):
                self.data_host.close()
            raise

    def _open(self, host: HostFile, *, secrets: Mapping[str, bytes] | None,
              options: Mapping[str, str] | None, policy: OpenPolicy | None,
              for_check: bool) -> None:
        self.host = host
        self.filename = str(host.path)
        self.read_only = not host.writable
        self.policy = policy or OpenPolicy()
        self.secrets = dict(secrets or {})
        self.options = dict(options or {})
        cs = Header.cluster_size_of(host.pread(0, 512))
        # tables past the end of the file are found when used (check reports them, as qemu)
        self.header = h = Header.parse(host.pread(0, cs))
        self.cs = cs
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
        self.l1 = be_u64_array(host.pread_exact(h.l1_table_offset, l1_bytes, "L1 table")
                               if l1_bytes else b"")
        self.l1_dirty: set[int] = set()
        capacity = min(32768, max(64, (16 << 20) // cs))
        self.l2_cache: TableCache[L2Table] = TableCache(
            host, cs, lambda b: L2Table(be_u64_array(b)), capacity, "L2 table")
        self._refcounts: Refcounts | None = None
        self._pending_free: list[tuple[int, int, bool]] = []
        self._decoded: OrderedDict[int, bytes] = OrderedDict()
        self._header_dirty = False
        self._set_dirty_bit = False
        self.data_host: HostFile = host
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
            path = self.policy.resolve(name, host.path, "data file")
            self.data_host = open_host_file(path, not self.read_only,
                                            lock_mode=host.locked)
            self._data_file_opened = True
        if not self.read_only and h.incompatible_features & QCOW2_INCOMPAT_DIRTY:
            self._repair_dirty()
        if h.crypt_method and "encrypt.key-secret" in self.options:
            _ = self.cipher  # like qemu: a wrong passphrase fails the open
        from diskimg.qcow2.snapshot import SnapshotTable

        self.snapshot_list = self._read_snapshot_table(for_check)
        self.snapshots = SnapshotTable(self)
        from diskimg.qcow2.bitmaps import Bitmaps

        self.bitmaps = Bitmaps(self)
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
        from diskimg.qcow2.snapshot import read_table

        self.snapshot_table_error: FormatError | None = None
        try:
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
        return host_has_zero_init(self.data_host.fd)

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
            self._refcounts = Refcounts(self.host, self.header)
            self.l2_cache.before_write = self._flush_refcounts
        return self._refcounts

    def _flush_refcounts(self) -> None:
        if self._refcounts is not None and self._refcounts.blocks.dirty:
            self._refcounts.flush()
            self.host.flush()

    def _repair_dirty(self) -> None:
        from diskimg.qcow2.check import check_image

        clear_unknown_autoclear(self.host, self.header)  # the repair changes the image
        res = check_image(self.host, self.header, "all")
        if res.exit_code != 0:
            raise CorruptImageError("Could not repair the dirty lazy-refcount image; run "
                                    "'diskimg check -r all'")
        self.header = Header.parse(self.host.pread(0, self.cs))

    def backing_file_name(self) -> tuple[str | None, str | None]:
        """(backing file name, backing format) as stored in the header, unresolved;
        (None, None) without a backing file, format None when the header has none."""
        return self.header.backing_file, self.header.backing_format

    # --- the read side: qcow2/mapper.py (L1/L2 walk, runs, block status), reader.py
    # (executing a plan), compressed.py and crypt.py; these delegate for the write side
    def _l2_location(self, cluster: int) -> tuple[int, int]:
        """(L1 index, L2 table host offset or 0) for guest cluster index ``cluster``."""
        return mapper.l2_location(self, cluster)

    def _check_data_offset(self, host_off: int, l2_off: int, idx: int, guest: int) -> None:
        """See :func:`mapper.check_data_offset`."""
        mapper.check_data_offset(self, host_off, l2_off, idx, guest)

    def _cluster_type(self, ent: int) -> E.ClusterType:
        """:func:`entries.cluster_type` with this image's extended-L2 and data-file flags."""
        return mapper.cluster_type(self, ent)

    @property
    def data_file_name(self) -> str | None:
        """The external data file's name (where DATA runs' host offsets lie), else None."""
        return str(self.data_host.path) if self._data_file_opened else None

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

    def _crypt_sector(self, host: int, guest: int) -> int:
        """IV sector: the host sector for LUKS, the guest sector for legacy AES (QEMU)."""
        return crypt.crypt_sector(self, host, guest)

    def _encrypt_writes(self, writes: list[tuple[int, Any, int]]) -> list[tuple[int, Any]]:
        """Turn (host, data, guest) pieces into whole encrypted sectors; partial sectors
        are completed with the current guest contents first."""
        cipher = self.cipher
        if cipher is None:
            return [(h, b) for h, b, _ in writes]
        out = []
        for host, data, guest in writes:
            d = host & 511
            n = len(data)
            if d or n % 512:
                full = bytearray(-(-(d + n) // 512) * 512)
                avail = min(len(full), self.size - (guest - d))
                self._readinto(guest - d, memoryview(full)[:avail])
                full[d : d + n] = data
            else:
                # whole sectors: encrypted _CRYPT_PIECE at a time, so the cipher's
                # temporaries stay small (2 MiB ones cost a page fault per 4 KiB) and the
                # pieces still go out with one pwritev
                mv = memoryview(data)
                for k in range(0, n, _CRYPT_PIECE):
                    piece = bytearray(mv[k : k + _CRYPT_PIECE])
                    cipher.encrypt(self._crypt_sector(host + k, guest + k), piece)
                    out.append((host + k, piece))
                continue
            cipher.encrypt(self._crypt_sector(host - d, guest - d), full)
            out.append((host - d, full))
        return out

    def _readinto(self, offset: int, buf: memoryview) -> None:
        reader.readinto(self, offset, buf)

    def _status(self, offset: int, length: int) -> Status:
        return mapper.status(self, mapper.lookup(self, offset, length))

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

    @property
    def metadata_preallocation(self) -> bool:
        """QEMU's guess (made on first use) whether the image was created with
        ``preallocation=metadata``: at least ``max(real * 10 / 9, real + 2)`` clusters have
        a refcount, ``real`` being the clusters the host file really allocates.  Only then
        does block status report holes in the host file under data clusters as zeros.

        qemu-img makes it on a freshly opened file.  Every change to the image forgets it;
        it is made again on the file as a flush would leave it (:meth:`_file_after_flush`,
        computed from the cached tables), so block_status() in a session agrees with
        qemu-img map of the flushed file without a flush per call."""
        if self._metadata_prealloc is None:
            try:
                rc = self._refcounts or Refcounts(self.host, self.header)
                alloc, size, freed = self._file_after_flush(rc)
                real = alloc // self.cs
                threshold = max(real * 10 // 9, real + 2)
                count = rc.count_used(-(-size // self.cs), threshold + len(freed))
                count -= sum(1 for c in freed if c * self.cs < size)
            except DiskImgError:
                real, count, threshold = 0, 0, 2  # broken refcounts: qemu ignores errors
            self._metadata_prealloc = count >= threshold
        return self._metadata_prealloc

    def _file_after_flush(self, rc: Refcounts) -> tuple[int, int, set[int]]:
        """(allocated bytes, size, clusters whose refcount drops to 0) of the host file as
        :meth:`flush` would leave it, computed from the cached tables without writing:
        the metadata preallocation guess of a changed image is then the one qemu makes on
        the flushed file, with no flush (fdatasync) per block status call.

        A flush writes the dirty L2 tables, refcount blocks and L1 entries (allocating
        the filesystem blocks under them that are holes now) and applies the pending
        frees, punching the clusters it frees with the punch flag."""
        host, cs = self.host, self.cs
        alloc, size = host.allocated_size(), host.size()
        if self.read_only:
            return alloc, size, set()
        writes = [(off, cs) for off in self.l2_cache.dirty]
        writes += [(off, cs) for off in rc.blocks.dirty] if self._refcounts else []
        l1_off = self.header.l1_table_offset
        writes += [(l1_off + 8 * i, 8) for i in self.l1_dirty]
        dec: dict[int, int] = {}
        punch: set[int] = set()
        for off, n, p in self._pending_free:
            if n < 0:
                continue  # a data-file cluster: deallocated there, not in this file
            for c in range(off // cs, (off + n - 1) // cs + 1):
                dec[c] = dec.get(c, 0) + 1
                if p:
                    punch.add(c)
        freed = {c for c, k in dec.items() if 0 < rc.get(c) <= k}
        if not writes and not freed:
            return alloc, size, freed
        blk = max(512, os.fstat(host.fd).st_blksize)
        written: set[int] = set()  # filesystem blocks the flush writes
        for off, n in writes:
            written.update(range(off // blk, (off + n - 1) // blk + 1))
            size = max(size, off + n)
        for b in sorted(written):
            if not any(d for _, _, d in host.data_extents(b * blk, blk)):
                alloc += blk  # a hole now: the write allocates it
        if self.data_host is host:
            gone: set[int] = set()  # filesystem blocks wholly inside a punched run
            run = sorted(freed & punch)
            i = 0
            while i < len(run):
                j = i
                while j + 1 < len(run) and run[j + 1] == run[j] + 1:
                    j += 1
                gone.update(range(-(-run[i] * cs // blk), (run[j] + 1) * cs // blk))
                i = j + 1
            for b in sorted(gone - written):
                if any(d for _, _, d in host.data_extents(b * blk, blk)):
                    alloc -= blk
        return alloc, size, freed

    # --- allocation helpers ----------------------------------------------------------
    def _check_write_support(self) -> None:
        """Called before every change to the image: fails early without the secret, then
        clears unknown autoclear bits and sets the lazy-refcounts dirty bit on disk."""
        if self.header.crypt_method:
            _ = self.cipher  # fails early without the secret
        clear_unknown_autoclear(self.host, self.header)
        if not self._set_dirty_bit and self.header.compatible_features & \
                QCOW2_COMPAT_LAZY_REFCOUNTS:
            self.header.incompatible_features |= QCOW2_INCOMPAT_DIRTY
            self._write_header_features()
            self.host.flush()
            self._set_dirty_bit = True
        self._metadata_prealloc = None  # allocation changes: guess again on next use
        self._changed_since_map = True

    def _write_header_features(self) -> None:
        if self.header.version >= 3:
            header_io.set_incompat(self.host, self.header.incompatible_features)

    def _get_l2_for_write(self, cluster: int) -> tuple[int, L2Table]:
        """L2 table covering ``cluster``, allocated or copied (if shared) as needed."""
        l1i, l2_off = self._l2_location(cluster)
        ent = self.l1[l1i]
        rc = self.refcounts
        if l2_off and ent & E.QCOW_OFLAG_COPIED:
            return l2_off, self.l2_cache.get(l2_off)
        new_off = rc.alloc(1)
        if l2_off:
            table = L2Table(array("Q", self.l2_cache.get(l2_off).entries))
            self._pending_free.append((l2_off, self.cs, False))
        else:
            table = L2Table(array("Q", bytes(self.cs)))
        self.l2_cache.put(new_off, table)
        self.l1[l1i] = new_off | E.QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return new_off, table

    def _alloc_data(self, clusters: list[int]) -> list[int]:
        """Host offsets for new data clusters of guest clusters ``clusters``: with an
        external data file the guest offset itself (QEMU's identity mapping, no refcounts),
        else one contiguous run of freshly allocated clusters."""
        if self._data_file_opened:
            hosts = [c << self.cb for c in clusters]
            if self._pending_free:
                # a deallocation still pending for one of these clusters (a discard or an
                # unmapping zero-write since the last flush) must not hit the data about
                # to be written there: the identity mapping hands out the same cluster
                taken = set(hosts)
                self._pending_free = [f for f in self._pending_free
                                      if not (f[1] < 0 and f[0] in taken)]
            return hosts
        base = self.refcounts.alloc(len(clusters))
        return [base + k * self.cs for k in range(len(clusters))]

    def _free_entry(self, ent: int, punch: bool = False) -> None:
        """Schedule dropping the reference an L2 entry held (applied after the flush).

        ``punch``: a guest discard or unmapping zero-write; clusters that become free are
        then deallocated in the host file too (QEMU's default pass-discard-request).
        Pending entries are (host, length, punch); a negative length marks a cluster of an
        external data file, which is only deallocated."""
        t = self._cluster_type(ent)
        self._decoded.pop(ent, None)  # the decoded-cluster cache is keyed by entry
        if self._data_file_opened:
            # data clusters of an external data file carry no refcount (identity mapped)
            if punch and t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
                self._pending_free.append((ent & E.L2E_OFFSET_MASK, -self.cs, True))
            return
        if t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
            self._pending_free.append((ent & E.L2E_OFFSET_MASK, self.cs, punch))
        elif t == E.ClusterType.COMPRESSED:
            host, clen = E.decode_compressed(ent, self.cb)
            self._pending_free.append((host & ~511, clen + (host & 511), punch))

    def _cow_is_zero(self, cluster: int, ent: int) -> bool:
        """True when the guest cluster reads as zeros and the image is not encrypted, so a
        partial write may zero the rest of a new cluster instead of copying it."""
        if self.header.crypt_method:
            return False
        t = self._cluster_type(ent)
        if t in (E.ClusterType.ZERO_PLAIN, E.ClusterType.ZERO_ALLOC):
            return True
        return t == E.ClusterType.UNALLOCATED and (
            self.backing is None or cluster << self.cb >= self.backing.size)

    def _cluster_contents(self, cluster: int, ent: int) -> bytearray:
        """Current guest contents of a whole cluster (for copy-on-write)."""
        buf = bytearray(self.cs)
        start = cluster << self.cb
        n = min(self.cs, self.size - start)
        if n > 0:
            self._readinto(start, memoryview(buf)[:n])
        return buf

    # --- writes ----------------------------------------------------------------------
    def _write(self, offset: int, data: memoryview) -> None:
        self._check_write_support()
        self.bitmaps.mark(offset, len(data))
        if self.extended:
            self._write_ext(offset, data)
            return
        end = offset + len(data)
        g = offset
        while g < end:
            cluster = g >> self.cb
            idx = cluster & (self.l2_entries - 1)
            stop = min(end, (cluster + self.l2_entries - idx) << self.cb)
            l2_off, table = self._get_l2_for_write(cluster)
            self._write_in_table(table.entries, l2_off, idx, cluster, g, stop, offset, data)
            g = stop

    def _write_in_table(self, ents: array[int], l2_off: int, idx: int, cluster: int,
                        g: int, stop: int, offset: int, data: memoryview) -> None:
        """Write guest [g, stop), which lies in the L2 table ``ents`` (entry ``idx`` is
        guest cluster ``cluster``); ``data[0]`` is guest byte ``offset``.

        The clusters needing a new host cluster get one run, allocated at once (QEMU's
        order); the data goes out host-contiguous pieces at a time (one pwrite or pwritev
        per run), and only then are the L2 entries changed and old references dropped."""
        cs, cb = self.cs, self.cb
        copied, mask = E.QCOW_OFLAG_COPIED, E.L2E_OFFSET_MASK
        normal, ctype = E.ClusterType.NORMAL, self._cluster_type
        df = self._data_file_opened
        n = ((stop - 1) >> cb) - cluster + 1
        olds = ents[idx : idx + n]
        # a NORMAL cluster this image alone references is written in place
        to_alloc = [j for j, ent in enumerate(olds)
                    if not (ent & copied and ctype(ent) == normal)]
        hosts = self._alloc_data([cluster + j for j in to_alloc]) if to_alloc else []
        # (host, guest lo, guest hi) runs of plain data, merged where host and guest are
        # both contiguous; copy-on-write clusters become their own buffers
        runs: list[list[int]] = []
        cow: list[tuple[int, bytearray, int]] = []
        k = 0
        for j in range(n):
            c_start = (cluster + j) << cb
            lo = g if g > c_start else c_start
            hi = stop if stop < c_start + cs else c_start + cs
            if k < len(to_alloc) and to_alloc[k] == j:
                host = hosts[k]
                k += 1
                if lo != c_start or hi != c_start + cs:
                    old = olds[j]
                    if not self._cow_is_zero(cluster + j, old):
                        buf = self._cluster_contents(cluster + j, old)
                        buf[lo - c_start : hi - c_start] = data[lo - offset : hi - offset]
                        cow.append((host, buf, c_start))
                        continue
                    # like qemu: zero the copy-on-write areas instead of writing zeros
                    self.data_host.zero_range(host, lo - c_start, keep_size=False)
                    self.data_host.zero_range(host + hi - c_start, c_start + cs - hi,
                                              keep_size=False)
            else:
                host = olds[j] & mask
                if host % cs or (df and host != c_start):
                    self._check_data_offset(host, l2_off, idx + j, c_start)
            h = host + lo - c_start
            last = runs[-1] if runs else None
            if last is not None and last[0] + last[2] - last[1] == h and last[2] == lo:
                last[2] = hi
            else:
                runs.append([h, lo, hi])
        writes: list[tuple[int, Any, int]] = [
            (h, data[lo - offset : hi - offset], lo) for h, lo, hi in runs]
        writes.extend(cow)
        # data first, then the L2 entries
        self._pwrite_runs(self._encrypt_writes(sorted(writes, key=lambda w: w[0])))
        if to_alloc:
            free = self._free_entry
            for k, j in enumerate(to_alloc):
                old = olds[j]
                ents[idx + j] = hosts[k] | copied
                free(old)  # a no-op unless the old entry held a cluster
            self.l2_cache.mark_dirty(l2_off)

    def _write_ext(self, offset: int, data: memoryview) -> None:
        """Writes with extended L2 entries: only the touched subclusters become allocated
        (copy-on-write at subcluster granularity), as QEMU does."""
        cs, scs = self.cs, self.sc_size
        full_bits = (1 << E.SUBCLUSTERS_PER_CLUSTER) - 1
        end = offset + len(data)
        g = offset
        while g < end:
            cluster = g >> self.cb
            c_start = cluster << self.cb
            hi = min(end, c_start + cs)
            s_lo = (g - c_start) // scs
            s_hi = -(-(hi - c_start) // scs)
            # guest bytes of the touched subclusters, merged with the new data
            r_lo = c_start + s_lo * scs
            r_hi = min(c_start + s_hi * scs, self.size)
            l2_off, table = self._get_l2_for_write(cluster)
            i = 2 * (cluster & (self.l2_entries - 1))
            ent, bm = table.entries[i], table.entries[i + 1]
            host = ent & E.L2E_OFFSET_MASK
            t = self._cluster_type(ent)
            has_host = t == E.ClusterType.NORMAL  # (offset 0 is one in a data file)
            if has_host:
                self._check_data_offset(host, l2_off, i // 2, c_start)
            touched = ((1 << s_hi) - 1) ^ ((1 << s_lo) - 1)
            if has_host and ent & E.QCOW_OFLAG_COPIED:
                new_host, new_bm = host, bm
            elif t == E.ClusterType.COMPRESSED or has_host:
                # compressed or shared cluster: copy the whole cluster to a new one
                new_host = self._alloc_data([cluster])[0]
                new_bm = full_bits
                r_lo, r_hi = c_start, min(c_start + cs, self.size)
            else:
                new_host, new_bm = self._alloc_data([cluster])[0], bm
            buf = bytearray(r_hi - r_lo)
            if g > r_lo or hi < r_hi:
                self._readinto(r_lo, memoryview(buf))
            buf[g - r_lo : hi - r_lo] = data[g - offset : hi - offset]
            for h_off, piece in self._encrypt_writes([(new_host + r_lo - c_start, buf, r_lo)]):
                self.data_host.pwrite(h_off, piece)
            new_bm = (new_bm | touched) & ~(touched << 32) & ((1 << 64) - 1)
            table.entries[i] = new_host | E.QCOW_OFLAG_COPIED
            table.entries[i + 1] = new_bm
            if not (has_host and new_host == host):
                self._free_entry(ent)
                self._decoded.pop(ent, None)
            self.l2_cache.mark_dirty(l2_off)
            g = hi

    def compress_cluster(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The compressed form of one cluster of guest data (padded with zeros), or None
        when it would not be smaller than a cluster.  Pure and thread-safe (zlib and
        zstandard release the GIL), so callers may compress in a thread pool."""
        from diskimg.qcow2.compress import compress

        if len(data) != self.cs:  # the last cluster of the disk: padded with zeros
            data = bytes(data).ljust(self.cs, b"\0")
        out = compress(self.header.compression_type, data)
        return out if len(out) < self.cs else None

    def _mark_corrupt(self, error: CorruptImageError) -> None:
        """Set the corrupt bit (incompatible feature bit 1) and refuse further writes, as
        qemu does when it finds inconsistent metadata while writing."""
        if self.read_only:
            return
        try:
            self.header.incompatible_features |= QCOW2_INCOMPAT_CORRUPT
            if self.header.version >= 3:
                self._write_header_features()
                self.host.flush()
        finally:
            self.read_only = True
            self._refcounts = None  # nothing more is written, not even on close
            self.l2_cache.clear()
            self.l1_dirty.clear()
            self._pending_free.clear()

    @requires_open
    def align_compressed_end(self) -> None:
        """Grow the image file to a multiple of 512 bytes, as qemu-img's ``convert -c``
        does when it finishes (a zero-length compressed write), so sector-based readers can
        read the last compressed cluster whole.  Only bytes inside an already allocated
        cluster are added: refcounts are unchanged."""
        end = self.host.size()
        if end % 512:
            self.host.truncate(end + (-end % 512))

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview,
                         *, compressed: bytes | None = None) -> None:
        """Write one whole cluster compressed (qemu-io ``write -c``).

        ``offset`` must be cluster aligned and ``data`` one cluster long (shorter only for
        the last cluster of the disk, padded with zeros).  Data that does not compress to
        less than a cluster is written as a normal cluster, as QEMU does.  ``compressed``
        passes a result of :meth:`compress_cluster` computed elsewhere (e.g. in a thread).
        """
        self._check_writable()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        cs = self.cs
        if offset % cs or (len(mv) != cs and offset + len(mv) != self.size):
            raise UsageError("Compressed writes must cover exactly one cluster")
        with self._corruption_guard():
            self._write_compressed(offset, mv, compressed)

    def _write_compressed(self, offset: int, mv: memoryview, compressed: bytes | None) -> None:
        # refused before _check_write_support: a refusal must not set the dirty bit
        if self.header.crypt_method:
            raise UnsupportedFeatureError("Compression of encrypted images is not supported")
        if self._data_file_opened:
            raise UnsupportedFeatureError("Compression is not supported with an external "
                                          "data file")
        self._check_write_support()
        self.bitmaps.mark(offset, len(mv))
        out = compressed if compressed is not None else self.compress_cluster(mv)
        if out is None:
            self._write(offset, mv)
            return
        cluster = offset >> self.cb
        l2_off, table = self._get_l2_for_write(cluster)
        host = self.refcounts.alloc_bytes(len(out))
        self.data_host.pwrite(host, out)
        idx = cluster & (self.l2_entries - 1)
        new = E.encode_compressed(host, len(out), self.cb)
        self._decoded.pop(new, None)  # same host bytes may have held a freed cluster
        if self.extended:
            old = table.entries[2 * idx]
            table.entries[2 * idx] = new
            table.entries[2 * idx + 1] = 0
        else:
            old = table.entries[idx]
            table.entries[idx] = new
        self._free_entry(old)
        self._decoded.pop(old, None)
        self.l2_cache.mark_dirty(l2_off)

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
        self._check_writable()
        cs = self.cs
        total = sum(len(d) for d, _ in clusters)
        self._check_range(offset, total)
        if offset % cs or any(len(d) != cs for d, _ in clusters[:-1]) or (
                clusters and len(clusters[-1][0]) != cs and offset + total != self.size):
            raise UsageError("Compressed writes must cover exactly one cluster")
        if not clusters:
            return
        with self._corruption_guard():
            self._check_write_support()
            if self.header.crypt_method or self._data_file_opened or self.extended:
                for k, (d, packed) in enumerate(clusters):  # the one-by-one path
                    mv = memoryview(d).cast("B")
                    if packed is None:
                        self._write(offset + k * cs, mv)
                    else:
                        self._write_compressed(offset + k * cs, mv, packed)
                return
            self.bitmaps.mark(offset, total)
            copied, mask = E.QCOW_OFLAG_COPIED, E.L2E_OFFSET_MASK
            writes: list[tuple[int, Any]] = []
            updates: list[tuple[int, int, int]] = []  # (L2 table offset, index, new entry)
            for k, (d, packed) in enumerate(clusters):
                cluster = (offset >> self.cb) + k
                l2_off, table = self._get_l2_for_write(cluster)
                idx = cluster & (self.l2_entries - 1)
                old = table.entries[idx]
                if packed is not None:
                    host = self.refcounts.alloc_bytes(len(packed))
                    new = E.encode_compressed(host, len(packed), self.cb)
                    writes.append((host, packed))
                elif len(d) != cs:  # the disk's partial last cluster: copy-on-write rules
                    self._pwrite_runs(writes)
                    writes = []
                    self._write_in_table(table.entries, l2_off, idx, cluster,
                                         cluster << self.cb, (cluster << self.cb) + len(d),
                                         cluster << self.cb, memoryview(d).cast("B"))
                    continue
                elif old & copied and self._cluster_type(old) == E.ClusterType.NORMAL:
                    self._check_data_offset(old & mask, l2_off, idx, cluster << self.cb)
                    writes.append((old & mask, d))  # written in place, entry unchanged
                    continue
                else:
                    new = self._alloc_data([cluster])[0] | copied
                    writes.append((new & mask, d))
                updates.append((l2_off, idx, new))
            self._pwrite_runs(writes)  # data first, then the L2 entries
            for l2_off, idx, new in updates:
                ents = self.l2_cache.get(l2_off).entries
                old = ents[idx]
                ents[idx] = new
                self._decoded.pop(new, None)  # same host bytes may have held a freed cluster
                self._free_entry(old)
                self.l2_cache.mark_dirty(l2_off)

    def _pwrite_runs(self, writes: list[tuple[int, Any]]) -> None:
        i = 0
        while i < len(writes):
            host, buf = writes[i]
            parts = [buf]
            end = host + len(buf)
            j = i + 1
            while j < len(writes) and writes[j][0] == end:
                parts.append(writes[j][1])
                end += len(writes[j][1])
                j += 1
            if len(parts) == 1:
                self.data_host.pwrite(host, parts[0])
            else:
                self.data_host.pwritev(host, parts)  # one syscall, no joined copy
            i = j

    def _full_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """(first, end) guest cluster indices fully inside the range (end exclusive);
        the last partial cluster of the disk counts as full."""
        first = -(-offset >> self.cb)
        end_b = offset + length
        end = (end_b >> self.cb) if end_b < self.size else -(-self.size >> self.cb)
        return first, max(first, end)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_write_support()
        self.bitmaps.mark(offset, length)
        first, end = self._full_clusters(offset, length)
        head_end = min(offset + length, first << self.cb)
        if head_end > offset:
            self._write(offset, memoryview(bytes(head_end - offset)))
        tail_start = max(offset, end << self.cb)
        if end > first and tail_start < offset + length:
            self._write(tail_start, memoryview(bytes(offset + length - tail_start)))
        elif end <= first and head_end < offset + length:
            self._write(head_end, memoryview(bytes(offset + length - head_end)))
            return
        if end > first:
            self._zero_clusters(first, end, may_unmap, discard=False)

    def _discard(self, offset: int, length: int) -> None:
        self._check_write_support()
        self.bitmaps.mark(offset, length)
        if self.header.version < 3 and (self.backing is not None
                                        or self.header.backing_file is not None):
            # As QEMU: without the zero flag, a discarded cluster would show the backing
            # file's data in place of what was written, so v2 ignores the request.
            return
        first, end = self._full_clusters(offset, length)
        if end > first:
            self._zero_clusters(first, end, True, discard=True)

    def _zero_clusters(self, first: int, end: int, unmap: bool, discard: bool) -> None:
        """Set full clusters [first, end) to read as zeros (v3) or deallocate them."""
        v3 = self.header.version >= 3
        if (not discard and self.header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW
                and not self.header.crypt_method):
            # data_file_raw: the data file must keep reading as the disk (as qemu does).
            # Not when encrypted: there it holds ciphertext, never the disk, and zeros
            # written ahead of the L2 zero flag would decrypt to garbage after a crash
            start = first << self.cb
            self.data_host.zero_range(start, min(self.size, end << self.cb) - start)
        c = first
        while c < end:
            idx = c & (self.l2_entries - 1)
            n = min(self.l2_entries - idx, end - c)
            _, l2_off = self._l2_location(c)
            if not v3:
                if self.backing is not None and not discard:
                    # v2 has no zero flag: write real zeros over the backing file
                    start = c << self.cb
                    stop = min(self.size, (c + n) << self.cb)
                    for s in range(start, stop, 1 << 20):
                        self._write(s, memoryview(bytes(min(1 << 20, stop - s))))
                    c += n
                    continue
                if not l2_off:
                    c += n
                    continue
            l2_off, table = self._get_l2_for_write(c)
            ents = table.entries
            if self.extended:
                self._zero_ext(ents, idx, n, unmap)
                self.l2_cache.mark_dirty(l2_off)
                c += n
                continue
            for j in range(idx, idx + n):
                old = ents[j]
                t = self._cluster_type(old)
                if not v3:
                    new = 0
                elif unmap or not (old & E.QCOW_OFLAG_COPIED) or t not in (
                        E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
                    new = E.QCOW_OFLAG_ZERO
                else:
                    new = (old & (E.L2E_OFFSET_MASK | E.QCOW_OFLAG_COPIED)) | E.QCOW_OFLAG_ZERO
                if discard and v3 and t == E.ClusterType.UNALLOCATED and self.backing is None:
                    new = 0
                if new != old:
                    ents[j] = new
                    if not new & E.L2E_OFFSET_MASK:
                        self._free_entry(old, punch=unmap)  # the entry lost its cluster
                    self._decoded.pop(old, None)
            self.l2_cache.mark_dirty(l2_off)
            c += n

    def _zero_ext(self, ents: array[int], idx: int, n: int, unmap: bool) -> None:
        """Extended L2: every subcluster of clusters idx..idx+n-1 reads as zeros; the host
        cluster is kept (zero-allocated) unless ``unmap`` or it is compressed/shared."""
        zero_bits = ((1 << E.SUBCLUSTERS_PER_CLUSTER) - 1) << 32
        for j in range(idx, idx + n):
            ent = ents[2 * j]
            keep = (not unmap and ent & E.QCOW_OFLAG_COPIED
                    and self._cluster_type(ent) == E.ClusterType.NORMAL)
            new = (ent & (E.L2E_OFFSET_MASK | E.QCOW_OFLAG_COPIED)) if keep else 0
            if not keep:
                self._free_entry(ent, punch=unmap)  # a no-op for an entry without cluster
                self._decoded.pop(ent, None)
            ents[2 * j], ents[2 * j + 1] = new, zero_bits

    # --- flush / close ---------------------------------------------------------------
    def _flush(self) -> None:
        if self._refcounts is None and not self.l1_dirty and not self._header_dirty:
            self.host.flush()
            return
        self._flush_refcounts()
        self.l2_cache.flush()
        self.host.flush()
        if self.l1_dirty:
            self._write_l1_entries()
            self.host.flush()
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            rc = self.refcounts
            to_punch: list[int] = []
            for host, n, punch in pending:
                if n < 0:  # external data file cluster: not refcounted, only deallocated
                    self.data_host.punch_hole(host, -n)
                    continue
                rc.free(host, n)
                if host in self.l2_cache.tables and rc.get(host // self.cs) == 0:
                    self.l2_cache.drop(host)  # a freed L2 table must never be written back
                if punch:
                    to_punch.extend(range(host // self.cs, (host + n - 1) // self.cs + 1))
            self._punch_free_clusters(to_punch)
            self._flush_refcounts()
        if self._header_dirty:
            self.host.pwrite(0, self.header.pack())
            self._header_dirty = False
        self.host.flush()

    def _punch_free_clusters(self, clusters: list[int]) -> None:
        """Deallocate in the host file those of ``clusters`` now unreferenced, merged into
        runs (one punch per run, so small clusters still free whole filesystem blocks)."""
        rc = self.refcounts
        free = sorted({c for c in clusters if rc.get(c) == 0})
        i = 0
        while i < len(free):
            j = i
            while j + 1 < len(free) and free[j + 1] == free[j] + 1:
                j += 1
            self.data_host.punch_hole(free[i] * self.cs, (j - i + 1) * self.cs)
            i = j + 1

    def _write_l1_entries(self) -> None:
        base = self.header.l1_table_offset
        for i in sorted(self.l1_dirty):
            self.host.pwrite(base + 8 * i, struct.pack(">Q", self.l1[i]))
        self.l1_dirty.clear()

    def _wipe_keys(self) -> None:
        """Zero the unlocked key in place and drop the secrets (issue 8.6); a view never
        wipes the cipher it shares with its parent."""
        cipher = self._cipher
        wipe_fn = getattr(cipher, "wipe", None)
        if wipe_fn is not None and (self._view_of is None
                                    or cipher is not self._view_of._cipher):
            wipe_fn()
        self.secrets = {}

    def _close(self) -> None:
        if self._view_of is not None:
            self._wipe_keys()
            return  # a snapshot view shares its parent's files
        try:
            if not self.read_only and self.bitmaps.tracked:
                self.bitmaps.store()
                self._flush()
            if not self.read_only and self._set_dirty_bit:
                self.header.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
                self._write_header_features()
                self.host.flush()
        finally:
            self._wipe_keys()
            if self._data_file_opened:
                self.data_host.close()
            self.host.close()

    def _zero_tail(self, start: int, end: int) -> None:
        """Make guest [start, end) read as zeros over a backing file after a grow."""
        self._write_zeroes(start, end - start, False)
        self.flush()

    @requires_open
    def preallocate(self, start: int, end: int, mode: str) -> None:
        """Give the unallocated clusters of guest [start, end) L2 entries and host clusters
        (``metadata``), then also reserve (``falloc``) or zero-fill (``full``) the new
        host space, as qemu's preallocation does on create and resize."""
        if mode == "off":
            return
        c, last = start >> self.cb, -(-end >> self.cb)
        while c < last:
            idx = c & (self.l2_entries - 1)
            n = min(self.l2_entries - idx, last - c)
            l2_off, table = self._get_l2_for_write(c)
            step = 2 if self.extended else 1  # extended L2: (entry, bitmap) pairs
            todo = [c + j for j in range(n) if not table.entries[step * (idx + j)]]
            hosts = self._alloc_data(todo)
            for h in hosts:  # the data clusters only: never over metadata
                if mode == "falloc":
                    self.data_host.preallocate(h, self.cs)
                elif mode == "full":
                    self.data_host.write_zeros(h, self.cs)
            for j, h in zip(todo, hosts, strict=True):
                # extended L2: the bitmap stays 0 (allocated, unused), as qemu leaves it
                table.entries[step * (j & (self.l2_entries - 1))] = h | E.QCOW_OFLAG_COPIED
            self.l2_cache.mark_dirty(l2_off)
            c += n
        self.flush()
        new_end = self.refcounts.find_free(1) * self.cs
        if self.host.size() < new_end:
            self.host.truncate(new_end)

    # --- resize ----------------------------------------------------------------------
    @requires_open
    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Grow (or with ``shrink`` shrink) the virtual disk to ``new_size`` bytes;
        ``preallocation`` (off/metadata/falloc/full) applies to the grown part."""
        self._check_writable()
        if new_size % 512:
            raise UsageError("The new size must be a multiple of 512")
        if new_size < self.size and not shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation.")
        # snapshots keep their own L1 tables and sizes: qemu 7.2 resizes the active
        # layer of such a v3 image (a shrink drops only the active references); a v2
        # snapshot entry has no disk size of its own, so qemu refuses those
        if self.header.nb_snapshots and self.header.version < 3:
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
        if self.bitmaps.entries:
            raise UnsupportedFeatureError("Cannot resize qcow2 with persistent bitmaps")
        self._check_write_support()
        if new_size < self.size:
            first = -(-new_size >> self.cb)
            last = -(-self.size >> self.cb)
            c = first
            while c < last:
                idx = c & (self.l2_entries - 1)
                n = min(self.l2_entries - idx, last - c)
                _, l2_off = self._l2_location(c)
                if l2_off:
                    l2_off, table = self._get_l2_for_write(c)
                    for j in range(idx, idx + n):
                        k = 2 * j if self.extended else j  # (entry, bitmap) pairs
                        if table.entries[k]:
                            self._free_entry(table.entries[k])
                            table.entries[k] = 0
                        if self.extended:
                            table.entries[k + 1] = 0
                    self.l2_cache.mark_dirty(l2_off)
                c += n
        need = -(-new_size // (self.cs * self.l2_entries))
        if need > len(self.l1):
            self._grow_l1(need)
        shrinking = new_size < self.size
        old_size = self.size
        self.size = self.header.size = new_size
        if new_size > old_size:
            # the grown area reads as zeros: never stale bytes of the old last cluster
            # (left there by an earlier shrink) nor the backing file (as qemu); zeroed
            # and preallocated before the header's size makes the area visible
            b = self.backing
            zero_end = max(min(new_size, -(-old_size // self.cs) * self.cs),
                           min(new_size, b.size) if b is not None else 0)
            grown = preallocation in ("falloc", "full") and not self._data_file_opened
            # (falloc/full without a backing file give the old last cluster a fresh,
            # zeroed cluster anyway and copy only its head)
            if zero_end > old_size and not (grown and b is None):
                self._zero_tail(old_size, zero_end)
            if grown:
                self._preallocate_grown(old_size, new_size, preallocation)
            else:
                self.preallocate(old_size, new_size, preallocation)
        self.flush()
        header_io.set_size(self.host, new_size)
        self.host.flush()
        if self._data_file_opened and self.data_host.size() != new_size:
            # like qemu: the data file takes the new size too; a shrink must not leave
            # the cut-off data in it (a raw data file would no longer be the disk)
            self.data_host.truncate(new_size)
            self.data_host.flush()
        if shrinking:  # like qemu: cut the host file after the last cluster in use
            rc = self.refcounts
            last = -(-self.host.size() // self.cs) - 1
            while last > 0 and rc.get(last) == 0:
                last -= 1
            if (last + 1) * self.cs < self.host.size():
                self.host.truncate((last + 1) * self.cs)

    def _preallocate_grown(self, old_size: int, new_size: int, mode: str) -> None:
        """``resize --preallocation=falloc|full`` laid out as qemu-img 7.2 lays it out.

        QEMU first builds refcount structures (new blocks, then a new refcount table)
        right after the last cluster in use, sized exactly for the new data clusters plus
        their L2 tables, then takes the data clusters in one run after them (reserved or
        written as zeros), and only then allocates the L2 tables (at the first free
        clusters) and fills in their entries.  A partly used last cluster of the old size
        gets a new cluster too; its old contents are copied into it (QEMU's COW head),
        so no guest data is lost.  Invariant: every cluster used has refcount 1."""
        cs = self.cs
        self.flush()
        rc = self.refcounts
        last = -(-self.host.size() // cs) - 1
        while last >= 0 and rc.get(last) == 0:
            last -= 1
        first_guest = old_size >> self.cb
        n_data = -(-new_size // cs) - first_guest
        n_l2 = -(-n_data // self.l2_entries) + 1
        start = rc.refcount_area(last + 1, n_data + n_l2, exact=True)
        rc.alloc_at(start, n_data)
        self._flush_refcounts()
        lo, hi = start * cs, (start + n_data) * cs
        cur = max(lo, min(hi, self.host.size()))
        if mode == "full":
            self.host.write_zeros(cur, hi - cur)
        elif hi > cur:
            self.host.preallocate(cur, hi - cur)
        if self.host.size() < hi:
            self.host.truncate(hi)
        head = old_size & (cs - 1)
        # the partly used old last cluster moves to a new cluster: keep what it holds
        head_data = self.read(first_guest * cs, head) if head else b""
        step = 2 if self.extended else 1  # extended L2: (entry, bitmap) pairs
        c, end, host = first_guest, first_guest + n_data, start
        while c < end:
            idx = c & (self.l2_entries - 1)
            n = min(self.l2_entries - idx, end - c)
            l2_off, table = self._get_l2_for_write(c)
            for j in range(n):
                k = step * (idx + j)
                if table.entries[k]:
                    self._free_entry(table.entries[k])
                table.entries[k] = (host + j) * cs | E.QCOW_OFLAG_COPIED
            self.l2_cache.mark_dirty(l2_off)
            c += n
            host += n
        self.flush()
        if not all_zero(head_data):
            l2_off, table = self._get_l2_for_write(first_guest)
            k = 2 * (first_guest & (self.l2_entries - 1)) + 1
            bitmap = table.entries[k] if self.extended else 0
            self.write(first_guest * cs, head_data)
            if self.extended:  # qemu keeps the old subcluster bitmap as it was
                l2_off, table = self._get_l2_for_write(first_guest)
                table.entries[k] = bitmap
                self.l2_cache.mark_dirty(l2_off)
            self.flush()

    def _grow_l1(self, need: int) -> None:
        if need * 8 > QCOW_MAX_L1_SIZE:
            raise UsageError("The new size is too large for this image's cluster size")
        self.flush()
        new_clusters = -(-need * 8 // self.cs)
        new_off = self.refcounts.alloc(new_clusters)
        self._flush_refcounts()
        table = array("Q", self.l1)
        table.extend([0] * (need - len(table)))
        self.host.pwrite(new_off, pack_be_u64_array(table))
        self.host.flush()
        old_off, old_size = self.header.l1_table_offset, self.header.l1_size
        header_io.set_l1_table(self.host, need, new_off)
        self.host.flush()
        self.header.l1_size, self.header.l1_table_offset = need, new_off
        self.l1 = table
        if old_size:
            self.refcounts.free(old_off, old_size * 8)
        self._flush_refcounts()

    # --- info ------------------------------------------------------------------------
    @requires_open
    def info(self) -> ImageInfo:
        h = self.header
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data["compression-type"] = COMPRESSION_TYPES[h.compression_type]
            data["lazy-refcounts"] = bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
            if self.bitmaps.entries:
                data["bitmaps"] = self.bitmaps.info()
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
        backing = h.backing_file
        full = None
        if backing is not None:
            try:
                full = str(self.policy.resolve(backing, self.host.path)) \
                    if not backing.startswith("/") else backing
            except Exception:  # info works without the backing file
                full = str(self.host.path.parent / backing)
        return ImageInfo(
            filename=self.filename,
            format="qcow2",
            virtual_size=self.size,
            actual_size=self.host.allocated_size(),
            dirty_flag=bool(h.incompatible_features & QCOW2_INCOMPAT_DIRTY),
            cluster_size=self.cs,
            encrypted=bool(h.crypt_method),
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

        sn = None
        for s in self.snapshot_list:
            if (snapshot_id is None or s.id == snapshot_id) and (name is None or s.name == name):
                sn = s
                break
        if sn is None:
            raise SnapshotNotFoundError(snapshot_id if snapshot_id is not None else str(name))
        view = object.__new__(Qcow2Image)
        view.__dict__.update(self.__dict__)
        view.read_only = True
        view._view_of = self
        view.owns_backing = False
        view.size = sn.disk_size if sn.disk_size is not None else self.size
        view.l1 = self.snapshots._read_l1(sn.l1_table_offset, sn.l1_size)
        view.l1_dirty = set()
        view.l2_cache = TableCache(self.host, self.cs, lambda b: L2Table(be_u64_array(b)),
                                   self.l2_cache.capacity, "L2 table")
        view._decoded = OrderedDict()
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
            clear_unknown_autoclear(self.host, self.header)
        res = check_image(self.host, self.header, repair)
        if repair is not None:
            self.header = Header.parse(self.host.pread(0, self.cs))
            self.l1 = be_u64_array(self.host.pread_exact(
                self.header.l1_table_offset, self.header.l1_size * 8, "L1 table"))
            self.l2_cache.clear()
            self._refcounts = None
            self.snapshot_list = self._read_snapshot_table(True)
        return res
