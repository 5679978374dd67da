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

Also the execution of a read plan (QEMU's qcow2_co_preadv_part; :func:`readinto`, here and
not in a module of its own, which every read of a qcow2 would load: start-up, issue 20):
the runs of :func:`lookup` covering the request, each dispatched on its
:class:`~diskimg.plan.RunKind`: DATA read from the (data) file, decrypted when the image
is encrypted; ZERO filled; UNALLOCATED read from the backing file (zeros past its end or
without one); COMPRESSED decoded, several clusters at once on the decompression pool.
"""

from __future__ import annotations

from diskimg.device import Status
from diskimg.errors import CorruptImageError
from diskimg.hostio import zero_fill
from diskimg.plan import Run, RunKind
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import lazy_modules
from diskimg.qcow2.entries import TableBreaks as TableBreaks  # (it lived here)
from diskimg.qcow2.entries import u64_run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.qcow2 import compressed, crypt
    from diskimg.qcow2.image import Qcow2Image
else:  # compressed clusters and encryption: imported on first use (a plain image's
    # convert does without them: start-up, issue 20)
    lazy_modules(globals(), "diskimg.qcow2", compressed="compressed", crypt="crypt")

__all__ = ["TableBreaks", "check_data_offset", "l2_location", "lookup", "plan",
           "progression_end", "read_backing", "readinto", "runs", "status", "statuses",
           "unallocated_until"]

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
    """(L1 index, L2 table host offset or 0) for guest cluster index ``cluster``
    (:func:`entries.l2_offset` on the image's L1 table)."""
    return E.l2_offset(img.l1, cluster, img.l2_bits, img.cs, img.header.l1_table_offset)


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


def runs(img: Qcow2Image, offset: int, length: int) -> list[Run]:
    """The runs successive :func:`lookup` calls give from guest ``offset`` (over at most
    ``length`` > 0 bytes) up to the end of its L2 table, found with one pass over the
    table (:class:`TableBreaks`): the cost of a table's runs is a few big-integer operations
    and one ``find`` and one :func:`_classify` per run, not a lookup each.  Every run
    starts with :func:`_classify` of its first entry (so :func:`check_data_offset` checks
    it); it goes on over the entries equal to the first (unallocated and zero runs) or to
    the first plus ``k`` clusters (data and zero runs with a host cluster) and, where
    the raw entries differ, over entries :func:`_classify` finds of the same kind, host
    contiguous: :func:`lookup`'s rule."""
    fname = img.data_file_name
    return [Run(pos, n, kind, host, ent, fname)
            for pos, n, kind, host, ent in _runs(img, offset, length)]


def _runs(img: Qcow2Image, offset: int,
          length: int) -> list[tuple[int, int, RunKind, int | None, int]]:
    """:func:`runs` as (offset, length, kind, host, entry) tuples."""
    cs = img.cs
    cluster = offset >> img.cb
    in_off = offset & (cs - 1)
    _, l2_off = l2_location(img, cluster)
    idx = cluster & (img.l2_entries - 1)
    if not l2_off or img.extended:
        r = lookup(img, offset, length)
        return [(r.offset, r.length, r.kind, r.host, r.entry)]
    ents = img.l2_cache.get(l2_off).entries
    breaks = TableBreaks(ents, cs)
    end = offset + min(length, (img.l2_entries - idx) * cs - in_off)
    stop = idx + -(-(in_off + end - offset) // cs)  # past the last entry in range
    base = (cluster - idx) << img.cb  # guest offset of entry 0 of this table
    out = []
    pos, i, skip = offset, idx, in_off
    ent = ents[i]
    kind, host = _classify(img, ent, l2_off, i, base)
    step_m = same_m = zero_m = None  # (each made on first use; b"": unavailable)
    while True:
        j = i + 1
        k2: RunKind | None = None
        mask, d = None, 1
        if kind is _COMPRESSED:
            pass
        elif host is not None:
            if step_m is None:
                step_m = breaks.stepped() or b""
            mask = step_m
        elif ent:
            if same_m is None:
                same_m = breaks.same() or b""
            mask = same_m
        else:
            if zero_m is None:
                zero_m = breaks.nonzero() or b""
            mask, d = zero_m, 0
        if not mask and kind is not _COMPRESSED:
            n = lookup(img, pos, end - pos).length
            host = None if host is None else host + skip
            j = i + -(-(skip + n) // cs)
        else:
            if mask:
                last = 8 * (stop - d)  # (breaks past entry stop - 1 are out of range)
                while j < stop:
                    b = mask.find(1, 8 * (j - d), last)
                    if b < 0:
                        j = stop
                        break
                    j = (b >> 3) + d  # entry j breaks the raw run: same kind and host?
                    k2, h2 = _classify(img, ents[j], l2_off, j, base)
                    if k2 is not kind or h2 != (None if host is None else
                                                host + (j - i) * cs):
                        break
                    k2 = None
                    j += 1
            n = min((j - i) * cs - skip, end - pos)
            host = None if host is None else host + skip
        out.append((pos, n, kind, host, ent))
        if j >= stop:
            return out
        pos, i, skip, ent = pos + n, j, 0, ents[j]
        if k2 is None:  # (entry j is classified once: as the break, or here)
            kind, host = _classify(img, ent, l2_off, j, base)
        else:
            kind, host = k2, h2


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
    j = E.first_masked(img.l1, i, last, E.L1E_OFFSET_MASK)
    if j == last == len(img.l1):
        return end  # unallocated to the end of the image
    return min(end, j * span)


def statuses(img: Qcow2Image, offset: int, length: int) -> list[Status]:
    """The block status of each of :func:`runs` (``BlockDevice._status_batch``), stopping
    after one that :func:`status` shortened (a data run over a hole of a
    metadata-preallocated file), the last one taken on past unallocated L2 tables."""
    out = []
    fname = img.data_file_name or img.filename
    crypt = img.header.crypt_method
    for pos, n, kind, host, _ in _runs(img, offset, length):
        st = _status(img, kind, n, None if crypt else host, fname)
        out.append(st)
        if st.length < n:
            break
    out[-1] = img._status_coarse(pos, offset + length - pos, out[-1])
    return out


def status(img: Qcow2Image, run: Run) -> Status:
    """QEMU's qcow2 block status of ``run`` (from :func:`lookup`): host offsets are
    valid for data, zero-allocated and allocated-but-unused subclusters, never for
    compressed or encrypted clusters; with a metadata-preallocated image (see
    ``Qcow2Image.metadata_preallocation``) a DATA run over holes of the host file is
    split there, the holes reading as zeros."""
    host = None if img.header.crypt_method else run.host
    return _status(img, run.kind, run.length, host, img.data_file_name or img.filename)


def _status(img: Qcow2Image, kind: RunKind, n: int, host: int | None,
            fname: str) -> Status:
    """:func:`status` of a run of ``kind``, ``n`` bytes from ``host`` (None in an
    encrypted image) in the file named ``fname`` (the image's as named, ./x stays, or
    its data file's)."""
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


def plan(img: Qcow2Image, offset: int, length: int) -> list[Run]:
    """The runs covering [offset, offset + length) (merged as :func:`lookup` merges)."""
    runs = []
    pos, end = offset, offset + length
    while pos < end:
        r = lookup(img, pos, end - pos)
        runs.append(r)
        pos += r.length
    return runs


def readinto(img: Qcow2Image, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with the guest bytes at ``offset``: plan, then execute by kind."""
    crypt_method = img.header.crypt_method
    if crypt_method:
        crypt.cipher(img)  # data access needs the key, allocated or not
    runs = plan(img, offset, len(buf))
    todo = [r.entry for r in runs if r.kind is _COMPRESSED]
    if todo:  # (the decoded-cluster cache is made by the first compressed read only)
        cache = img._decoded
        todo = [e for e in todo if e not in cache]
    decoded = compressed.decode_many(img, list(dict.fromkeys(todo))) if len(todo) > 1 \
        else {}
    mask = img.cs - 1
    for r in runs:
        pos = r.offset - offset
        dst = buf[pos : pos + r.length]
        kind = r.kind
        if kind is _DATA:
            assert r.host is not None  # DATA always has a host cluster
            if crypt_method:
                crypt.read_encrypted(img, r.offset, r.host, dst)
            else:
                img.data_host.preadinto(r.host, dst)
        elif kind is _ZERO:
            zero_fill(dst)
        elif kind is _UNALLOC:
            read_backing(img, r.offset, dst)
        else:
            data = decoded.get(r.entry) or compressed.decode_cached(img, r.entry)
            c_off = r.offset & mask
            dst[:] = data[c_off : c_off + r.length]


def read_backing(img: Qcow2Image, offset: int, dst: memoryview) -> None:
    """The backing file's bytes at ``offset`` (zeros past its end, or without one)."""
    b = img.backing
    n = len(dst)
    if b is None or offset >= b.size:
        zero_fill(dst)
        return
    k = min(n, b.size - offset)
    b.readinto(offset, dst[:k])
    if k < n:
        zero_fill(dst[k:])
