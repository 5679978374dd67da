"""QCOW_OFLAG_COPIED must be set exactly when a cluster's refcount is 1
(qemu's ``check_oflag_copied``)."""

from __future__ import annotations

import struct

from diskimg.hostio import all_zero
from diskimg.qcow2.cache import be_u64_table, pack_be_u64_array
from diskimg.qcow2.check.state import _Abort, _RefErr
from diskimg.qcow2.check.state import (
    _NORMAL,
    _ZERO_ALLOC,
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
