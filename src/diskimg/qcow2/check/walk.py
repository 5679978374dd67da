"""Counting references: the L1/L2 walk of the active and snapshot tables
(``check_refcounts_l1``/``_l2``), bitmaps, and ``calculate_refcounts``.  L2 entries are
classified by :func:`diskimg.qcow2.entries.cluster_type`, compressed descriptors decoded by
:func:`~diskimg.qcow2.entries.decode_compressed` (the one copy of each rule)."""

from __future__ import annotations

import struct
import sys

from diskimg.errors import FormatError
from diskimg.hostio import all_zero
from diskimg.qcow2.entries import be_u64_table
from diskimg.qcow2.check.state import _Abort
from diskimg.qcow2.check.state import (
    _COMPRESSED,
    _NORMAL,
    _UNALLOCATED,
    _ZERO_ALLOC,
    _hexc,
)
from diskimg.qcow2.check.state import _Stored
from diskimg.qcow2.entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2_BITMAP_ALL_ALLOC,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    bitmap_conflicts,
    bitmap_with_zero,
    cluster_type,
    decode_compressed,
)
from diskimg.qcow2.entries import QCOW_OFLAG_COPIED as OFLAG_COPIED
from diskimg.qcow2.entries import QCOW_OFLAG_ZERO as OFLAG_ZERO
from diskimg.qcow2.layout import (
    QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER,
    QCOW_MAX_L1_SIZE,
)
from diskimg.qcow2.entries import TableBreaks, lanes



def _tables_bad(tables: list[tuple[int, int]], cs: int) -> bool:
    return any(t_off & (cs - 1) or t_size * 8 > QCOW_MAX_L1_SIZE for t_off, t_size in tables)


class _Walk(_Stored):
    def _plain_runs(self, l2_off: int, raw: bytes) -> list[tuple[int, int]] | None:
        """The runs of host-contiguous clusters of a standard L2 table whose every
        entry is 0 or a plain data cluster (no flag but COPIED, no reserved bit, a
        non-zero cluster-aligned offset inside the file): (first host cluster, clusters)
        each, in table order, the unallocated entries between them left out.  None when
        any entry needs the entry-by-entry check (or the image has extended L2 entries
        or a data file).

        Decided and found for the whole table at once: one big-integer AND over its
        entries (the bits no plain entry has: 56-62 and those below the cluster size),
        the map's break masks (:class:`diskimg.qcow2.entries.TableBreaks`) and two ``find``
        per run, so a clean table costs no Python work per entry.  Kept by table offset
        (with its bytes) for the OFLAG_COPIED pass, which reads the table again."""
        if self.ext_l2 or self.data_file:
            return None
        hit = self._plain.get(l2_off)
        if hit is not None and hit[0] == raw:
            return hit[1]
        runs = self._find_plain_runs(raw)
        self._plain[l2_off] = (raw, runs)
        return runs

    def _find_plain_runs(self, raw: bytes) -> list[tuple[int, int]] | None:
        n = len(raw) // 8
        breaks = TableBreaks(raw, self.cs, big=True)  # (the bytes as read: no decode)
        # the bits no plain entry has (56-62 and those below the cluster size), each lane
        bad, = lanes((((1 << 63) - (1 << 56)) | (self.cs - 1),), breaks.n, n)
        if breaks.value() & bad:
            return None
        nonzero, stepped = breaks.nonzero(), breaks.stepped()
        if stepped is None:
            return None
        cb = self.cbits
        runs = []
        b = nonzero.find(1)
        last = 8 * (n - 1)
        while b >= 0:
            j = b >> 3  # a run from entry j, to before entry e
            b = stepped.find(1, 8 * j, last)
            e = n if b < 0 else (b >> 3) + 1
            first = int.from_bytes(raw[8 * j : 8 * j + 8], "big") & L2E_OFFSET_MASK
            if not first:  # COPIED alone (no host offset), first in its run
                return None
            runs.append((first >> cb, e - j))
            b = nonzero.find(1, 8 * e)
        if not runs or (max(c + k for c, k in runs) - 1) << cb >= self.file_len:
            return None  # (a cluster at or past the end of the file: the full check)
        return runs

    def _ones(self) -> memoryview:
        """An L2 table's worth of refcounts of 1, in the form of :attr:`imrt`."""
        if not len(self._ones_buf):
            one = (1).to_bytes(self.itemsize, sys.byteorder)
            self._ones_buf = memoryview(bytearray(one * self.l2_size)).cast(self.tc)
        return self._ones_buf

    def _count_runs(self, runs: list[tuple[int, int]], frag: bool) -> None:
        """check_l2 for a table of plain data clusters (:meth:`_plain_runs`): one
        reference each (a run of clusters not referenced yet set to 1 at once, any other
        counted by :meth:`inc`, cluster by cluster, as the full check counts), the
        allocation and fragmentation counts (a run not right after the previous one
        starts a fragment)."""
        need = max(c + k for c, k in runs)
        if need > self.nb:
            self.grow_imrt(need)
        imrt, cb, ones = self.imrt, self.cbits, self._ones()
        zeros = self.zeros(self.l2_size)
        nxt, frags, total = runs[0][0], 0, 0
        for c, k in runs:
            if imrt[c : c + k] == zeros[:k]:
                imrt[c : c + k] = ones[:k]
            else:
                self.inc(c << cb, k << cb, "data")
            frags += c != nxt
            nxt = c + k
            total += k
        self.count_work(total)
        if frag:
            self.res.allocated_clusters += total
            self.res.fragmented_clusters += frags

    def _runs_copied_once(self, raw: bytes, runs: list[tuple[int, int]]) -> bool:
        """True when every entry of a plain table (:meth:`_plain_runs`) has COPIED set
        and a stored refcount of exactly 1: check_oflag_copied has nothing to say about
        it.  Reads refcount blocks quietly (:meth:`refblock`), so answering False has no
        side effect but filling the block cache."""
        if raw[::8].count(0x80) != sum(k for _, k in runs):
            return False
        rb_bits, m, ones = self.rb_bits, self.rb_entries - 1, self._ones()
        cur, blk = -1, None
        for c, k in runs:
            while k:
                i = c & m
                piece = min(k, m + 1 - i)
                if c >> rb_bits != cur:
                    cur = c >> rb_bits
                    blk = self.refblock(cur, quiet=True)
                if blk is None or blk[i : i + piece] != ones[:piece]:
                    return False
                c, k = c + piece, k - piece
        return True

    def check_l1(self, l1_offset: int, l1_size: int, frag: bool, active: bool,
                 label: str) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8, f"{label} L1")
        l1 = self.l1 if active else self._read_u64s(l1_offset, l1_size)
        self.count_work(l1_size)
        for i, e in enumerate(l1):
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
                self.find("l1-reserved-bits", table=f"{label} L1", index=i,
                          host_offset=l1_offset + 8 * i)
            l2_off = e & L1E_OFFSET_MASK
            self.inc(l2_off, self.cs, f"{label} L2")
            if l2_off & (self.cs - 1):
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry "
                         "corrupted")
                self.res.corruptions += 1
                self.find("l2-unaligned", table=f"{label} L1", index=i, host_offset=l2_off)
            self.check_l2(l2_off, i, frag, active, label)

    def check_l2(self, l2_off: int, l1_index: int, frag: bool, active: bool,
                 label: str) -> None:
        raw = self.pread(l2_off, self.cs)
        if all_zero(raw):
            return
        runs = self._plain_runs(l2_off, raw)
        if runs is not None:
            self._count_runs(runs, frag)
            return
        tab = be_u64_table(raw)
        res = self.res
        cs = self.cs
        step = 2 if self.ext_l2 else 1
        next_contig = 0
        nonzero = 0
        for i in range(self.l2_size):
            e = tab[i * step]
            bm = tab[i * step + 1] if self.ext_l2 else 0
            if not e and not bm:
                continue
            nonzero += 1
            typ = cluster_type(e, extended=self.ext_l2, has_data_file=self.data_file)
            guest = ((l1_index * self.l2_size + i) * cs) if active else None
            if typ != _COMPRESSED and e & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
                self.find("l2-reserved-bits", table=f"{label} L2", index=i,
                          host_offset=l2_off + i * self.l2e_size, guest_offset=guest)
            if typ == _COMPRESSED:
                if e & OFLAG_COPIED:
                    coff = decode_compressed(e, self.cbits)[0]
                    self.msg(f"ERROR: coffset=0x{coff:x}: copied flag must "
                             "never be set for compressed clusters")
                    e &= ~OFLAG_COPIED
                    res.corruptions += 1
                    self.find("compressed-copied", table=f"{label} L2", index=i,
                              host_offset=coff, guest_offset=guest)
                if self.data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
                    res.corruptions += 1
                    self.find("compressed-with-data-file", table=f"{label} L2", index=i,
                              guest_offset=guest)
                    continue
                if bm:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{e:x}")
                    res.corruptions += 1
                    self.find("compressed-bitmap", table=f"{label} L2", index=i,
                              guest_offset=guest)
                    continue
                self.inc(*decode_compressed(e, self.cbits), "compressed data")
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif typ in (_NORMAL, _ZERO_ALLOC):
                off = e & L2E_OFFSET_MASK
                if bitmap_conflicts(bm):
                    res.corruptions += 1
                    self.msg(f"ERROR offset={off:x}: Allocated cluster has corrupted "
                             "subcluster allocation bitmap")
                    self.find("l2-bitmap", table=f"{label} L2", index=i, host_offset=off,
                              guest_offset=guest)
                if off & (cs - 1):
                    res.corruptions += 1
                    if self.ext_l2:
                        has_data = bool(bm & L2_BITMAP_ALL_ALLOC)
                    else:
                        has_data = not e & OFLAG_ZERO
                    if not has_data:
                        fixing = bool(self.fix & 2)
                        self.msg(f"{'Repairing' if fixing else 'ERROR'} offset={off:x}: "
                                 "Preallocated cluster is not properly aligned; L2 entry "
                                 "corrupted.")
                        self.find("data-unaligned", fixing, table=f"{label} L2", index=i,
                                  host_offset=off, guest_offset=guest)
                        if fixing:
                            if self.ext_l2:
                                nbm = bitmap_with_zero(bm, bm & L2_BITMAP_ALL_ALLOC)
                                new = struct.pack(">QQ", 0, nbm)
                            else:
                                new = struct.pack(">Q", OFLAG_ZERO)
                            ign = "active L2 table" if active else "inactive L2 table"
                            if not self.checked_write(ign, l2_off + i * self.l2e_size, new):
                                self.msg("ERROR: Overlap check failed")
                                res.check_errors += 1
                                raise _Abort("EIO")
                            self.host.flush()
                            res.corruptions -= 1
                            res.corruptions_fixed += 1
                            continue
                    else:
                        self.msg(f"ERROR offset={off:x}: Data cluster is not properly "
                                 "aligned; L2 entry corrupted.")
                        self.find("data-unaligned", table=f"{label} L2", index=i,
                                  host_offset=off, guest_offset=guest)
                if frag:
                    res.allocated_clusters += 1
                    if next_contig and off != next_contig:
                        res.fragmented_clusters += 1
                    next_contig = off + cs
                if not self.data_file:
                    self.inc(off, cs, "data")
            elif typ == _UNALLOCATED:
                if bm & L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation "
                             "map")
                    self.find("l2-bitmap", table=f"{label} L2", index=i, guest_offset=guest)
        self.count_work(nonzero)

    def check_bitmaps(self) -> None:
        if self.h.ext(QCOW2_EXT_MAGIC_BITMAPS) is None:
            return  # (the bitmap modules load only for an image with the extension)
        from diskimg.qcow2.bitmap_table import entry_invalid
        from diskimg.qcow2.bitmaps import BME_TABLE_OFFSET_MASK as BME_TABLE_ENTRY_OFFSET_MASK
        from diskimg.qcow2.bitmaps import (
            QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
            BitmapEntry,
            BitmapsExt,
        )

        bx = BitmapsExt.of(self.h)
        if bx is None or not bx.nb_bitmaps:
            return
        nb, dsize, doff = bx.nb_bitmaps, bx.directory_size, bx.directory_offset
        self.inc(doff, dsize, "bitmap directory")
        if dsize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or doff & (self.cs - 1):
            self.res.corruptions += 1
            self.find("bitmap-directory", table="bitmap directory", host_offset=doff)
            raise _Abort("EINVAL")
        d = self.pread(doff, dsize)
        pos = 0
        tables: list[tuple[int, int]] = []
        while len(tables) < nb:
            try:
                bme, n = BitmapEntry.parse(d, pos, doff)
            except FormatError:  # truncated or runs past the directory: qemu's broken_dir
                break
            tables.append((bme.table_offset, bme.table_size))
            pos += n
        if len(tables) != nb or _tables_bad(tables, self.cs):
            self.res.corruptions += 1
            self.find("bitmap-directory", table="bitmap directory", host_offset=doff)
            raise _Abort("EINVAL")
        for t_off, t_size in tables:
            self.inc(t_off, t_size * 8, "bitmap table")
            tab = self._read_u64s(t_off, t_size)
            for e in tab:
                off = e & BME_TABLE_ENTRY_OFFSET_MASK
                if entry_invalid(e, self.cs):
                    self.res.corruptions += 1
                    self.find("bitmap-entry", table="bitmap table", host_offset=off)
                    continue
                if off:
                    self.inc(off, self.cs, "bitmap data")

    def calculate_refcounts(self) -> bool:
        if not self.nb:
            self.grow_imrt(self.size_to_clusters(self.file_len))
        h = self.h
        self.inc(0, self.cs, "header")
        self.check_l1(h.l1_table_offset, h.l1_size, True, True, "active")
        if self.data_file and self.snapshots:
            self.msg(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
            self.find("snapshots-with-data-file", table="snapshot-table")
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) "
                         f"l1_offset={_hexc(sn.l1_table_offset)}: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                self.find("snapshot-l1-unaligned", table="snapshot-table",
                          host_offset=sn.l1_table_offset, snapshot=sn.id_str)
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) "
                         f"l1_size={_hexc(sn.l1_size)}: L1 table is too large; snapshot "
                         "table entry corrupted")
                self.res.corruptions += 1
                self.find("snapshot-l1-too-large", table="snapshot-table",
                          snapshot=sn.id_str)
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, False, False,
                          f"snapshot {sn.id_str}")
        self.inc(self.snapshots_offset, self.snapshots_size, "snapshot table")
        self.inc(self.reftable_offset, len(self.reftable) * 8, "refcount table")
        ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        if ext is not None:
            from diskimg.crypto.luks.fde import fde_fields  # only images that have one

            fields = fde_fields(ext.data)
            if fields is not None and fields[1]:
                self.inc(fields[0], fields[1], "crypto header")
        self.check_bitmaps()
        return self.check_refblocks()
