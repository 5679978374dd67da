"""qcow2's mapper: the L1/L2 walk that answers "what lies at guest offset ``o``?" with a
:class:`~diskimg.plan.Run` (QEMU's qcow2-cluster.c ``qcow2_get_host_offset``), and the
block status derived from it.

The one place a standard or extended L2 entry becomes a run kind: every classification
goes through :func:`entries.cluster_type` / :func:`entries.subcluster_type`, every host
offset through :func:`check_data_offset`.  Invariants of :func:`lookup` (besides those
:func:`diskimg.plan.check_plan` checks): a run never crosses an L2 table; consecutive
clusters of one kind are merged into one run (DATA and ZERO-with-offset only when
host-contiguous), so a sequential read costs one run per progression of entries; a
COMPRESSED run is one cluster whose raw L2 entry is ``Run.entry``; ``Run.filename`` names
the external data file when there is one (the host offsets are in it), else None.
"""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import CorruptImageError
from diskimg.plan import Run, RunKind
from diskimg.qcow2 import entries as E
from diskimg.qcow2.cache import u64_run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2.image import Qcow2Image

__all__ = ["check_data_offset", "cluster_type", "l2_location", "lookup",
           "progression_end", "status", "unallocated_until"]

_DATA, _ZERO, _UNALLOC, _COMPRESSED = (RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED,
                                       RunKind.COMPRESSED)
_U64 = (1 << 64) - 1
_NORMAL, _UNALLOCATED, _ZERO_ALLOC = (E.ClusterType.NORMAL, E.ClusterType.UNALLOCATED,
                                      E.ClusterType.ZERO_ALLOC)
_CT_COMPRESSED = E.ClusterType.COMPRESSED
#: extended L2: the run kind of each subcluster type (INVALID and COMPRESSED apart)
_SC_KIND = {E.SubclusterType.NORMAL: _DATA, E.SubclusterType.ZERO_PLAIN: _ZERO,
            E.SubclusterType.ZERO_ALLOC: _ZERO, E.SubclusterType.UNALLOCATED_PLAIN: _UNALLOC,
            E.SubclusterType.UNALLOCATED_ALLOC: _UNALLOC}
#: extended L2: the subcluster types whose cluster has a host cluster
_SC_HAS_HOST = (E.SubclusterType.NORMAL, E.SubclusterType.ZERO_ALLOC,
                E.SubclusterType.UNALLOCATED_ALLOC)


def progression_end(ents: memoryview, i: int, stop: int, first: int, step: int) -> int:
    """The largest ``j`` in [i, stop] with ``ents[k] == first + (k - i) * step`` for every
    ``k`` in [i, j).  Slices of doubling length are compared at once (one C comparison
    each; a mismatch starts again at 8 entries), so the cost follows the run's length."""
    stop = min(stop, len(ents))
    if i >= stop or first + (stop - i) * step > _U64:
        return i
    j, size = i, 8
    while j < stop:
        k = min(stop, j + size)
        if ents[j:k] == u64_run(first + (j - i) * step, k - j, step):
            j, size = k, size * 2
        elif size > 8:
            size = 8
        else:
            while ents[j] == first + (j - i) * step:
                j += 1
            return j
    return j


def l2_location(img: Qcow2Image, cluster: int) -> tuple[int, int]:
    """(L1 index, L2 table host offset or 0) for guest cluster index ``cluster``."""
    l1i = cluster >> img.l2_bits
    if l1i >= len(img.l1):
        raise CorruptImageError(f"Guest cluster {cluster} lies beyond the L1 table "
                                f"({len(img.l1)} entries)")
    off = img.l1[l1i] & E.L1E_OFFSET_MASK
    if off % img.cs:
        raise CorruptImageError(f"L2 table offset {off:#x} in L1 entry {l1i} is not "
                                "cluster aligned",
                                offset=img.header.l1_table_offset + 8 * l1i)
    return l1i, off


def check_data_offset(img: Qcow2Image, host_off: int, l2_off: int, idx: int,
                      guest: int) -> None:
    """The host cluster of L2 entry ``idx`` (table at ``l2_off``) that holds guest
    cluster offset ``guest``: cluster aligned and, in an external data file, at the
    guest offset itself (data-file clusters are identity mapped; qemu refuses any
    other offset and marks a writable image corrupt).  Every reader, writer and map
    goes through here."""
    esize = 16 if img.extended else 8
    if host_off % img.cs:
        raise CorruptImageError(f"Cluster allocation offset {host_off:#x} unaligned "
                                f"(L2 table at {l2_off:#x}, entry {idx})",
                                offset=l2_off + idx * esize)
    if img._data_file_opened and host_off != guest:
        err = CorruptImageError(
            f"External data file host cluster offset {host_off:#x} does not match "
            f"guest cluster offset: {guest:#x}, L2 index: {idx:#x}) (L2 table at "
            f"{l2_off:#x})", offset=l2_off + idx * esize)
        img._mark_corrupt(err)
        raise err


def cluster_type(img: Qcow2Image, ent: int) -> int:
    """:func:`entries.cluster_type` with the image's extended-L2 and data-file flags."""
    return E.cluster_type(ent, extended=img.extended, has_data_file=img._data_file_opened)


def _classify(img: Qcow2Image, ent: int, l2_off: int, idx: int,
              base: int) -> tuple[RunKind, int | None]:
    """(run kind, host cluster offset or None) of a standard L2 entry (``idx`` in the
    table whose entry 0 maps guest offset ``base``)."""
    t = E.cluster_type(ent, extended=False, has_data_file=img._data_file_opened)
    if t is _NORMAL:
        host = ent & E.L2E_OFFSET_MASK
        check_data_offset(img, host, l2_off, idx, base + (idx << img.cb))
        return _DATA, host
    if t is _UNALLOCATED:
        return _UNALLOC, None
    if t is _CT_COMPRESSED:
        return _COMPRESSED, None
    if t is _ZERO_ALLOC:
        return _ZERO, ent & E.L2E_OFFSET_MASK  # keeps its host cluster
    return _ZERO, None


def lookup(img: Qcow2Image, offset: int, length: int) -> Run:
    """The run at guest ``offset`` (at most ``length`` > 0 bytes) of this layer; see the
    module docstring for what a run holds."""
    cs = img.cs
    cluster = offset >> img.cb
    in_off = offset & (cs - 1)
    _, l2_off = l2_location(img, cluster)
    idx = cluster & (img.l2_entries - 1)
    max_len = min(length, (img.l2_entries - idx) * cs - in_off)
    fname = img.data_file_name
    if not l2_off:
        return Run(offset, max_len, _UNALLOC, None, 0, fname)
    ents = img.l2_cache.get(l2_off).entries
    if img.extended:
        return _lookup_ext(img, ents, l2_off, idx, offset, max_len)
    ent = ents[idx]
    base = (cluster - idx) << img.cb  # guest offset of entry 0 of this table
    kind, host = _classify(img, ent, l2_off, idx, base)
    if kind is _COMPRESSED:
        return Run(offset, min(max_len, cs - in_off), _COMPRESSED, None, ent, fname)
    n = cs - in_off
    # entries equal to the first one plus k clusters (k times 0 for unallocated and
    # zero clusters) continue the run: compared a slice at a time, in C
    step = 0 if host is None else cs
    stop = idx + 1 + (max_len - n + cs - 1) // cs
    i = progression_end(ents, idx + 1, stop, ent + step, step)
    n += (i - idx - 1) * cs
    nxt = None if host is None else host + (i - idx) * cs
    while n < max_len:
        k2, h2 = _classify(img, ents[i], l2_off, i, base)
        if k2 is not kind or h2 != nxt:
            break
        n += cs
        if nxt is not None:
            nxt += cs
        i += 1
    return Run(offset, min(n, max_len), kind, None if host is None else host + in_off,
               ent, fname)


def _lookup_ext(img: Qcow2Image, ents: memoryview, l2_off: int, idx: int, offset: int,
                max_len: int) -> Run:
    """:func:`lookup` in an extended L2 table: runs of equal subclusters of one cluster."""
    scs = img.sc_size
    in_off = offset & (img.cs - 1)
    ent, bitmap = ents[2 * idx], ents[2 * idx + 1]
    sc = in_off // scs
    df = img._data_file_opened
    t = E.subcluster_type(ent, bitmap, sc, has_data_file=df)
    fname = img.data_file_name
    if t == E.SubclusterType.INVALID:
        raise CorruptImageError(f"Invalid extended L2 entry {idx} in table at {l2_off:#x}",
                                offset=l2_off + 16 * idx)
    if t == E.SubclusterType.COMPRESSED:
        return Run(offset, min(max_len, img.cs - in_off), _COMPRESSED, None, ent, fname)
    host: int | None = None
    if t in _SC_HAS_HOST:  # the cluster has a host cluster
        host = ent & E.L2E_OFFSET_MASK
        check_data_offset(img, host, l2_off, idx, offset - in_off)
        host += in_off
    n = scs - in_off % scs
    sc += 1
    while n < max_len and sc < E.SUBCLUSTERS_PER_CLUSTER:
        if E.subcluster_type(ent, bitmap, sc, has_data_file=df) != t:
            break
        n += scs
        sc += 1
    return Run(offset, min(n, max_len), _SC_KIND[t], host, ent, fname)


def unallocated_until(img: Qcow2Image, offset: int, end: int) -> int:
    """Past L1 entries without an L2 table (one pass over the L1 table)."""
    span = img.l2_entries * img.cs
    i = offset // span
    if offset % span or i >= len(img.l1):
        return offset
    last = min(len(img.l1), -(-end // span))
    mask = E.L1E_OFFSET_MASK
    j = next((k for k in range(i, last) if img.l1[k] & mask), last)
    if j == last == len(img.l1):
        return end  # unallocated to the end of the image
    return min(end, j * span)


def status(img: Qcow2Image, run: Run) -> Status:
    """QEMU's qcow2 block status of ``run`` (from :func:`lookup`): host offsets are
    valid for data, zero-allocated and allocated-but-unused subclusters, never for
    compressed or encrypted clusters; with a metadata-preallocated image (see
    ``Qcow2Image.metadata_preallocation``) a DATA run over holes of the host file is
    split there, the holes reading as zeros."""
    fname = img.data_file_name or img.filename  # the image as named (./x stays)
    host = None if img.header.crypt_method else run.host
    kind, n = run.kind, run.length
    if kind is _DATA:
        if host is None:
            return Status(n, True, True, False)
        if img.metadata_preallocation:
            for start, k, is_data in img.data_host.data_extents(host, n):
                return Status(k, True, True, not is_data, start, fname)
        return Status(n, True, True, False, host, fname)
    if kind is _COMPRESSED:
        return Status(n, True, True, False)
    name = None if host is None else fname
    if kind is _ZERO:
        return Status(n, True, False, True, host, name)
    return Status(n, False, False, img.backing is None, host, name)
