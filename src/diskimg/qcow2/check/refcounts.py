"""Comparing the counted references with the stored refcounts (``compare_refcounts``),
repairing leaks and errors, QCOW_OFLAG_COPIED, which must be set exactly when a
cluster's refcount is 1 (qemu's ``check_oflag_copied``), and the whole
``qcow2_check_refcounts`` (rebuilding the refcount structure, for ``-r all`` only, is
:mod:`diskimg.qcow2.check.rebuild`)."""

from __future__ import annotations

import struct

from diskimg.hostio import all_zero
from diskimg.qcow2.entries import be_u64_table, pack_be_u64_array
from diskimg.qcow2.check.state import (
    _NORMAL,
    _ZERO_ALLOC,
    INT_MAX,
    _Abort,
    _counts,
    _RefErr,
    _set_counts,
)
from diskimg.qcow2.check.walk import _Walk
from diskimg.qcow2.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    cluster_type,
)
from diskimg.qcow2.entries import QCOW_OFLAG_COPIED as OFLAG_COPIED


class _Copied(_Walk):
    def check_oflag_copied(self) -> None:
        res = self.res
        fix = self.fix
        if fix & 2:
            repair = True
        elif fix & 1:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        step = 2 if self.ext_l2 else 1
        for i in range(len(self.l1)):
            l1e = self.l1[i]
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off:
                continue
            try:
                rc = self.get_refcount(l2_off >> self.cbits)
            except _RefErr:
                rc = None
            if rc is not None and (rc == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                         f"refcount={rc}")
                self.find("oflag-copied", repair, table="active L1", index=i,
                          host_offset=l2_off, refcount=rc)
                if repair:
                    new = l1e | OFLAG_COPIED if rc == 1 else l1e & ~OFLAG_COPIED
                    self.l1[i] = new
                    # qemu writes the 512-byte L1 chunk holding the entry; check that range
                    sector = self.h.l1_table_offset + 8 * (i & ~63)
                    what = self.overlap("active L1 table", sector, 512)
                    if what is not None:
                        self.signal_corruption("Preventing invalid write on metadata "
                                               f"(overlaps with {what})")
                        res.check_errors += 1
                        raise _Abort("EIO")
                    self.write(self.h.l1_table_offset + 8 * i, struct.pack(">Q", new))
                    self.host.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = self.pread(l2_off, self.cs)
            if all_zero(raw):
                continue
            runs = self._plain_runs(l2_off, raw)
            if runs is not None and self._runs_copied_once(raw, runs):
                continue
            tab = be_u64_table(raw)
            dirty = 0
            for j in range(self.l2_size):
                e = tab[j * step]
                if not e:
                    continue
                typ = cluster_type(e, extended=self.ext_l2, has_data_file=self.data_file)
                if typ not in (_NORMAL, _ZERO_ALLOC):
                    continue
                if self.data_file:
                    rc = 1
                else:
                    try:
                        rc = self.get_refcount((e & L2E_OFFSET_MASK) >> self.cbits)
                    except _RefErr:
                        continue
                if (rc == 1) != bool(e & OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} "
                             f"refcount={rc}")
                    self.find("oflag-copied", repair, table="active L2", index=j,
                              host_offset=e & L2E_OFFSET_MASK,
                              guest_offset=(i * self.l2_size + j) * self.cs, refcount=rc)
                    if repair:
                        tab[j * step] = e | OFLAG_COPIED if rc == 1 else e & ~OFLAG_COPIED
                        dirty += 1
            if dirty:
                if not self.checked_write("active L2 table", l2_off, pack_be_u64_array(tab)):
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             "Input/output error")
                    res.check_errors += 1
                    raise _Abort("EIO")
                res.corruptions -= dirty
                res.corruptions_fixed += dirty


class _Refcounts(_Copied):
    def compare(self, fix: int) -> tuple[bool, int]:
        rebuild = False
        highest = 0
        res = self.res
        E = self.rb_entries
        imrt = self.imrt
        nb = self.nb
        for b in range((nb + E - 1) // E):
            lo = b * E
            hi = min(nb, lo + E)
            try:
                blk = self.refblock(b)
                bad = None
            except _RefErr as exc:
                blk, bad = None, exc
            if bad is not None:
                for i in range(lo, hi):
                    self.msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                continue
            comp = imrt[lo:hi]
            stored = blk[: hi - lo] if blk is not None else self.zeros(hi - lo)
            if stored == comp:
                for j in range(hi - lo - 1, -1, -1):
                    if comp[j]:
                        highest = lo + j
                        break
                continue
            for i in range(lo, hi):
                r1 = blk[i - lo] if blk is not None else 0
                r2 = imrt[i]
                if r1 or r2:
                    highest = i
                if r1 == r2:
                    continue
                counter = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & 1:
                    counter = "leaks_fixed"
                elif r1 < r2 and fix & 2:
                    counter = "corruptions_fixed"
                word = "Repairing" if counter else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {i} refcount={r1} reference={r2}")
                kind = "leak" if r1 > r2 else "refcount-too-low"
                if counter:
                    self.set_refcount(i, r2)
                    if r2 == 0:
                        try:
                            self.host.punch_hole(i << self.cbits, self.cs)
                        except (OSError, AttributeError):  # pragma: no cover
                            pass
                    if counter == "leaks_fixed":
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    self.find(kind, True, table="refcount", index=i,
                              host_offset=i << self.cbits, refcount=r1, reference=r2)
                    continue
                self.find(kind, table="refcount", index=i, host_offset=i << self.cbits,
                          refcount=r1, reference=r2)
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        return rebuild, highest

    def check_refcounts(self) -> None:
        res = self.res
        nb = self.size_to_clusters(self.file_len)
        if nb > INT_MAX:
            res.check_errors += 1
            raise _Abort("EFBIG")
        res.total_clusters = self.size_to_clusters((self.h.size // 512) * 512)
        self.grow_imrt(nb)
        rebuild = self.calculate_refcounts()
        pre = _counts(res)
        n_find = len(res.findings)
        r, highest = self.compare(0)
        rebuild = rebuild or r
        if rebuild and self.fix & 2:
            old = _counts(res)
            self.msg("Rebuilding refcount structure")
            from diskimg.qcow2.check.rebuild import rebuild_refcount_structure

            rebuild_refcount_structure(self)
            for f in res.findings[n_find:]:
                f["repaired"] = True
            res.corruptions = 0
            res.leaks = 0
            self.imrt = self.zeros(len(self.imrt))
            fix, self.fix = self.fix, 0
            rebuild = self.calculate_refcounts()
            self.fix = fix
            fresh_leaks = 0
            if self.fix & 1:
                saved = _counts(res)
                _set_counts(res, (0, 0, 0, 0, 0))
                r, highest = self.compare(1)
                if r:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                _set_counts(res, saved)
            if res.corruptions < old[1]:
                res.corruptions_fixed += old[1] - res.corruptions
            if res.leaks < old[2]:
                res.leaks_fixed += old[2] - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Abort("EIO")
            if res.leaks or res.corruptions:
                _set_counts(res, pre)
                # the messages of the dry comparison stay; findings are replaced
                del res.findings[n_find:]
                r, highest = self.compare(self.fix)
        self.check_oflag_copied()
        res.image_end_offset = (highest + 1) * self.cs
