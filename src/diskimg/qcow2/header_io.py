"""The one writer of qcow2 header fields in place (no module writes header bytes itself).

Field offsets are :mod:`diskimg.qcow2.layout`'s ``HDR_*`` (derived from the header struct,
docs/interop/qcow2.txt "Header").  Fields that change together are written by ONE
``pwrite`` of the contiguous byte range that holds them, so a crash leaves either the old
or the new set (e.g. L1 size + offset, refcount table offset + clusters).  Callers flush
when their ordering needs it; nothing here flushes.
"""

from __future__ import annotations

import struct

from diskimg.qcow2.layout import (
    HDR_AUTOCLEAR_FEATURES,
    HDR_COMPATIBLE_FEATURES,
    HDR_INCOMPATIBLE_FEATURES,
    HDR_L1_SIZE,
    HDR_L1_TABLE_OFFSET,
    HDR_NB_SNAPSHOTS,
    HDR_REFCOUNT_TABLE_CLUSTERS,
    HDR_REFCOUNT_TABLE_OFFSET,
    HDR_SIZE,
    HDR_SNAPSHOTS_OFFSET,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    Header,
    HeaderField,
    pack_feature_table,
    read_fields,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # the hosts' types are the type checker's: no classes to build at run
    from typing import Protocol  # time (start-up, issue 20)

    class _Host(Protocol):
        def pread(self, offset: int, length: int) -> bytes: ...

        def pwrite(self, offset: int, data: bytes) -> int | None: ...

    class _SyncHost(_Host, Protocol):
        def flush(self) -> None: ...

__all__ = [
    "read_fields",
    "read_incompat",
    "set_autoclear",
    "set_feature_fields",
    "set_incompat",
    "set_l1_table",
    "set_refcount_table",
    "set_size",
    "set_snapshots",
    "set_snapshots_count",
    "set_tables",
    "update_incompat",
    "write_fields",
    "write_header",
]


def write_fields(host: _Host, *values: tuple[HeaderField, int]) -> None:
    """Write header fields, given in offset order and contiguous, with one ``pwrite``."""
    start = values[0][0].offset
    pos, code, args = start, ">", []
    for f, v in values:
        if f.offset != pos:
            raise ValueError(f"header fields not contiguous at {f.name} (offset {f.offset})")
        code += f.code
        args.append(v)
        pos += f.size
    host.pwrite(start, struct.pack(code, *args))


def set_size(host: _Host, size: int) -> None:
    """The virtual disk size (bytes 24-31)."""
    write_fields(host, (HDR_SIZE, size))


def set_l1_table(host: _Host, l1_size: int, l1_offset: int) -> None:
    """The active L1 table: entry count and offset together (bytes 36-47)."""
    write_fields(host, (HDR_L1_SIZE, l1_size), (HDR_L1_TABLE_OFFSET, l1_offset))


def set_refcount_table(host: _Host, offset: int, clusters: int) -> None:
    """The refcount table: offset and length in clusters together (bytes 48-59)."""
    write_fields(host, (HDR_REFCOUNT_TABLE_OFFSET, offset),
                 (HDR_REFCOUNT_TABLE_CLUSTERS, clusters))


def set_snapshots(host: _Host, nb_snapshots: int, offset: int) -> None:
    """The snapshot table: count and offset together (bytes 60-71)."""
    write_fields(host, (HDR_NB_SNAPSHOTS, nb_snapshots), (HDR_SNAPSHOTS_OFFSET, offset))


def set_snapshots_count(host: _Host, nb_snapshots: int) -> None:
    """The snapshot count alone (bytes 60-63): a table cut short where it lies."""
    write_fields(host, (HDR_NB_SNAPSHOTS, nb_snapshots))


def set_tables(host: _Host, *, l1_offset: int, reftable_offset: int,
               reftable_clusters: int, snapshots: tuple[int, int] | None = None) -> None:
    """Active L1 offset, refcount table and optionally the snapshot table (count, offset)
    in one write (bytes 40-59, or 40-71): a switch of all of them is atomic."""
    vals = [(HDR_L1_TABLE_OFFSET, l1_offset), (HDR_REFCOUNT_TABLE_OFFSET, reftable_offset),
            (HDR_REFCOUNT_TABLE_CLUSTERS, reftable_clusters)]
    if snapshots is not None:
        vals += [(HDR_NB_SNAPSHOTS, snapshots[0]), (HDR_SNAPSHOTS_OFFSET, snapshots[1])]
    write_fields(host, *vals)


def set_incompat(host: _Host, bits: int) -> None:
    """The incompatible feature bits (bytes 72-79; v3 only -- the caller checks)."""
    write_fields(host, (HDR_INCOMPATIBLE_FEATURES, bits))


def read_incompat(host: _Host) -> int:
    """The incompatible feature bits as they are on disk now."""
    return read_fields(host, HDR_INCOMPATIBLE_FEATURES)[0]


def update_incompat(host: _Host, *, set_bits: int = 0, clear_bits: int = 0) -> bool:
    """Set/clear incompatible bits on disk relative to what is there now (mark dirty,
    corrupt, clean); writes only if something changes.  True if it wrote."""
    cur = read_incompat(host)
    new = (cur | set_bits) & ~clear_bits
    if new == cur:
        return False
    set_incompat(host, new)
    return True


def set_autoclear(host: _Host, bits: int) -> None:
    """The autoclear feature bits (bytes 88-95)."""
    write_fields(host, (HDR_AUTOCLEAR_FEATURES, bits))


def set_feature_fields(host: _Host, incompat: int, compat: int, autoclear: int) -> None:
    """All three v3 feature fields in one write (bytes 72-95)."""
    write_fields(host, (HDR_INCOMPATIBLE_FEATURES, incompat),
                 (HDR_COMPATIBLE_FEATURES, compat), (HDR_AUTOCLEAR_FEATURES, autoclear))


def write_header(host: _SyncHost, h: Header) -> None:
    """Write the whole header cluster (``Header.pack()``: header, extensions, backing file
    name) in one pwrite and sync.  The rest of cluster 0 is zeroed, so no stale extension
    or name bytes remain.  Like qemu's whole-header rewrite, a v3 header with clusters of
    8 KiB or more gets qemu's own feature-name table, whatever table the file had."""
    if _wants_qemu_table(h):
        h.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, pack_feature_table())
    data = h.pack()
    host.pwrite(0, data.ljust(h.cluster_size, b"\0"))
    host.flush()


def _wants_qemu_table(h: Header) -> bool:
    # observed (qemu-img 7.2): only v3 headers with clusters of 8 KiB or more carry it
    return h.version >= 3 and h.cluster_size >= 8192


def refresh_feature_table(host: _SyncHost, h: Header) -> None:
    """Rewrite the header (``h``, as in the file) when its feature-name table is not qemu's
    own, as qemu-img's ``amend`` does whatever its options change."""
    e = h.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE)
    if _wants_qemu_table(h) and (e is None or e.data != pack_feature_table()):
        write_header(host, h)
