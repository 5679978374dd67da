"""The refcounts stored in the image, as the check reads and repairs them: refcount blocks
through the one codec (:mod:`diskimg.qcow2.refblock`), a write-back block cache, and
qemu's ``check_refblocks`` (references of the refcount blocks themselves)."""

from __future__ import annotations

from diskimg.hostio.file import trailing_zeros
from diskimg.qcow2.check.state import _RefErr
from diskimg.qcow2.check.state import (
    INT64_MAX,
    MAX_IMRT_BYTES,
    REFT_RESERVED_MASK,
    _hexc,
    _State,
)
from diskimg.qcow2.refblock import (
    REFT_OFFSET_MASK,
    decode_refblock,
    encode_refblock,
)


class _Stored(_State):
    def refblock(self, idx: int, *, quiet: bool = False) -> memoryview | None:
        """Stored refcount block ``idx`` decoded, or None when it is not allocated.

        An unusable block offset (unaligned, or negative as a file offset) is reported and
        raises _RefErr; with ``quiet`` it reads as None and nothing is reported (for a
        fast path that leaves such tables to the full check)."""
        if idx >= len(self.reftable):
            return None
        off = self.reftable[idx] & REFT_OFFSET_MASK
        if not off:
            return None
        unaligned = off & (self.cs - 1)
        if unaligned or off > INT64_MAX - self.cs:
            if quiet:
                return None
            if unaligned:
                self.signal_corruption(f"Refblock offset {_hexc(off)} unaligned (reftable "
                                       f"index: {_hexc(idx)})")
            raise _RefErr(off)  # qemu: a negative file offset reads as EIO
        blk = self.rb_cache.get(off)
        if blk is None:
            blk = decode_refblock(self.pread(off, self.cs), self.order)
            self.rb_cache[off] = blk
        return blk

    def get_refcount(self, cluster: int) -> int:
        blk = self.refblock(cluster >> self.rb_bits)
        return 0 if blk is None else blk[cluster & (self.rb_entries - 1)]

    def set_refcount(self, cluster: int, value: int) -> None:
        """Change one stored refcount (its block must exist) in the write-back cache."""
        idx = cluster >> self.rb_bits
        off = self.reftable[idx] & REFT_OFFSET_MASK
        blk = self.refblock(idx)
        assert blk is not None
        blk[cluster & (self.rb_entries - 1)] = value
        self.rb_dirty.add(off)

    def flush_refblocks(self) -> None:
        """Write back changed refcount blocks (qemu's refcount block cache flush)."""
        for off in sorted(self.rb_dirty):
            if self.dead:
                break
            self.checked_write("refcount block", off,
                               encode_refblock(self.rb_cache[off], self.order))
        self.rb_dirty.clear()
        if not self.dead:
            self.host.flush()

    def check_refblocks(self) -> bool:
        rebuild = False
        fix_errors = bool(self.fix & 2)
        rt = self.reftable
        n = len(rt)
        if self.nb > 0:  # then an entry of 0 (no refcount block) has nothing to check:
            # stop after the last non-zero one (most of a small image's table is zeros)
            raw = rt.tobytes()
            n = -(-(len(raw) - trailing_zeros(raw)) // 8)
        for i in range(n):
            ent = rt[i]
            off = ent & REFT_OFFSET_MASK
            cluster = off >> self.cbits
            if ent & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.find("reftable-reserved-bits", table="refcount table", index=i)
                rebuild = True
                continue
            if off & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                self.res.corruptions += 1
                self.find("refblock-unaligned", table="refcount table", index=i,
                          host_offset=off)
                rebuild = True
                continue
            if cluster >= self.nb:
                self.res.corruptions += 1
                self.msg(f"{'Repairing' if fix_errors else 'ERROR'} refcount block {i} is "
                         "outside image")
                if fix_errors and off <= INT64_MAX - self.cs and \
                        off + self.cs <= self.file_len + MAX_IMRT_BYTES:
                    self.host.truncate(off + self.cs)
                    self.file_len = self.host.size()
                    self.grow_imrt(max(self.nb, self.size_to_clusters(self.file_len)))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.find("refblock-outside-image", True, table="refcount table",
                              index=i, host_offset=off)
                    self.inc(off, self.cs, "refcount block")
                    continue
                if fix_errors:
                    rebuild = True
                    why = "Invalid argument" if off > INT64_MAX - self.cs else "File too large"
                    self.msg(f"ERROR could not resize image: {why}")
                self.find("refblock-outside-image", table="refcount table", index=i,
                          host_offset=off)
                continue
            if off:
                self.inc(off, self.cs, "refcount block")
                rc = self.imrt[cluster]
                if rc != 1:
                    self.msg(f"ERROR refcount block {i} refcount={rc}")
                    self.res.corruptions += 1
                    self.find("refblock-refcount", table="refcount table", index=i,
                              host_offset=off)
                    rebuild = True
        return rebuild
