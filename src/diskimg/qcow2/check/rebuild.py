"""Rebuilding the refcount structure from the counted references (qemu's
``rebuild_refcount_structure`` with ``alloc_clusters_imrt`` and ``rebuild_refcounts_write_
refblocks``): new refcount blocks and a new refcount table written where the in-memory
refcounts have room, then the header switched to them.  Only ``check -r all`` of an image
whose refcount structure is broken gets here (diskimg.qcow2.check.refcounts)."""

from __future__ import annotations

from array import array

from diskimg import progname
from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import pack_be_u64_array
from diskimg.qcow2.check.state import _Abort
from diskimg.qcow2.refblock import encode_refblock

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.check.state import _Stored


def alloc_imrt(st: _Stored, count: int, first_free: list[int]) -> int:
    cluster = first_free[0]
    first_gap = True
    contig = 0
    imrt = st.imrt
    while cluster < st.nb and contig < count:
        if not imrt[cluster]:
            contig += 1
            if first_gap:
                first_free[0] = cluster
                first_gap = False
        elif contig:
            contig = 0
        cluster += 1
    if contig < count:
        st.grow_imrt(cluster + count - contig)
        imrt = st.imrt  # (a new, longer view)
    cluster -= contig
    for i in range(count):
        imrt[cluster + i] = 1
    return cluster << st.cbits


def write_refblocks(st: _Stored, first: int, end: int, reft: list[int]) -> bool:
    grown = False
    first_free = [0]
    E = st.rb_entries
    cluster = first
    while cluster < end:
        if not st.imrt[cluster]:
            cluster += 1
            continue
        idx = cluster >> st.rb_bits
        start = idx << st.rb_bits
        if len(reft) > idx and reft[idx]:
            rb_off = reft[idx]
        else:
            if first_free[0] < start:
                first_free[0] = start
            rb_off = alloc_imrt(st, 1, first_free)
            if rb_off // st.cs >= end:
                end = rb_off // st.cs + 1
            if len(reft) <= idx:
                n = -(-((idx + 1) * 8) // st.cs) * st.cs // 8
                reft.extend([0] * (n - len(reft)))
                grown = True
            reft[idx] = rb_off
        assert start + E <= len(st.imrt)
        if not st.checked_write("", rb_off, encode_refblock(st.imrt[start:start + E],
                                                            st.order)):
            st.msg(f"{progname.name()}: ERROR writing refblock: Input/output error")
            st.res.check_errors += 1
            raise _Abort("EIO")
        cluster = start + E
    return grown


def rebuild_refcount_structure(st: _Stored) -> None:
    """Write a new refcount structure for ``st.imrt`` and switch the header to it."""
    st.flush_refblocks()
    st.rb_cache.clear()
    reft: list[int] = []
    grown = write_refblocks(st, 0, st.nb, reft)
    assert grown
    rt_off = -1
    while True:
        length = len(reft) * 8
        clusters = st.size_to_clusters(length)
        rt_off = alloc_imrt(st, clusters, [0])
        s = rt_off >> st.cbits
        if not write_refblocks(st, s, s + clusters, reft):
            break
    if not st.checked_write("", rt_off, pack_be_u64_array(array("Q", reft))):
        st.msg(f"{progname.name()}: ERROR writing reftable: Input/output error")
        st.res.check_errors += 1
        raise _Abort("EIO")
    header_io.set_refcount_table(st.host, rt_off, clusters)
    st.host.flush()
    st.file_len = st.host.size()
    st.reftable = memoryview(array("Q", reft))
    st.reftable_offset = rt_off
    st.rb_cache.clear()
