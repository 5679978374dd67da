"""qcow2 metadata rewrites done outside :class:`Qcow2Image`: ``amend``, emptying an image
after ``commit``, and replacing the backing file name for ``rebase``.

Every function here works on a :class:`HostFile` plus a parsed :class:`Header` of an
image nobody else has open (the caller closed or flushed its Qcow2Image first).  Write
ordering follows QEMU: new structures are written and synced before the header points at
them; clusters are freed only after nothing on disk refers to them.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Mapping
from typing import Any

from diskimg.crypto import wipe
from diskimg.crypto.luks import (
    KeySlotAmend,
    LuksCipher,
    LuksHeader,
    parse_fde_extension,
    plan_keyslot_amend,
)
from diskimg.errors import DiskImgError, MissingSecretError, UnsupportedFeatureError, UsageError
from diskimg.hostio import HostFile
from diskimg.options import compat_version, parse_bool
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import header_io
from diskimg.qcow2.bitmaps import BitmapsExt
from diskimg.qcow2.cache import be_u64_array, pack_be_u64_array
from diskimg.qcow2.image import clear_unknown_autoclear
from diskimg.qcow2.layout import (
    HDR_AUTOCLEAR_FEATURES,
    HDR_COMPATIBLE_FEATURES,
    HDR_INCOMPATIBLE_FEATURES,
    HDR_NB_SNAPSHOTS,
    HDR_REFCOUNT_ORDER,
    HDR_REFCOUNT_TABLE_CLUSTERS,
    HDR_REFCOUNT_TABLE_OFFSET,
    HDR_SNAPSHOTS_OFFSET,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_CRYPT_LUKS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Header,
    pack_feature_table,
)
from diskimg.qcow2.refcount import RefBlock, Refcounts

ProgressFn = Callable[[float], None]


def read_header(host: HostFile) -> Header:
    """Parse the header in cluster 0 of ``host``."""
    cs = Header.cluster_size_of(host.pread(0, 512))
    return Header.parse(host.pread(0, cs))


def write_header(host: HostFile, h: Header) -> None:
    """Write the whole header cluster (``Header.pack()``) in one pwrite and sync.  The
    rest of cluster 0 is zeroed, so no stale extension or name bytes remain."""
    data = h.pack()
    host.pwrite(0, data.ljust(h.cluster_size, b"\0"))
    host.flush()


def nb_bitmaps(h: Header) -> int:
    """Persistent bitmaps the header declares (0 without a valid bitmaps extension)."""
    bx = BitmapsExt.of(h)
    return 0 if bx is None else bx.nb_bitmaps


# --- emptying (qemu's bdrv_make_empty after commit) -----------------------------------


def make_empty(host: HostFile, h: Header, data_host: HostFile | None = None) -> None:
    """Drop every guest cluster of the image so it reads entirely from its backing file.

    A v3 image without snapshots, bitmaps, LUKS or data file is rebuilt from scratch as
    QEMU does (header, one-cluster refcount table, one refcount block, zeroed L1 table,
    file truncated after it); any other image has every active L2 entry cleared and its
    clusters freed (shared L2 tables are copied first).  ``data_host`` is the image's
    external data file (opened writable): the clusters the cleared entries held there are
    deallocated, as qemu's full discard does."""
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    per_block = cs * 8 // h.refcount_bits
    clear_unknown_autoclear(host, h)
    if (h.version >= 3 and not h.nb_snapshots and not nb_bitmaps(h)
            and 3 + l1_clusters <= per_block and h.crypt_method != QCOW_CRYPT_LUKS
            and not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE):
        _make_completely_empty(host, h, l1_clusters)
    else:
        _discard_all(host, h, data_host)


def _make_completely_empty(host: HostFile, h: Header, l1_clusters: int) -> None:
    cs = h.cluster_size
    # mark dirty: until the new refcounts are in place the old ones are wrong
    dirty = h.version >= 3 and not h.incompatible_features & QCOW2_INCOMPAT_DIRTY
    if dirty:
        header_io.set_incompat(host, h.incompatible_features | QCOW2_INCOMPAT_DIRTY)
        host.flush()
    host.pwrite(h.l1_table_offset, bytes(l1_clusters * cs))
    host.pwrite(cs, bytes((2 + l1_clusters) * cs))
    host.flush()
    header_io.set_tables(host, l1_offset=3 * cs, reftable_offset=cs, reftable_clusters=1)
    host.flush()
    host.pwrite(cs, struct.pack(">Q", 2 * cs))
    host.flush()
    blk = RefBlock(h.refcount_order, bytes(cs))
    for c in range(3 + l1_clusters):
        blk[c] = 1
    host.pwrite(2 * cs, blk.pack())
    host.flush()
    if dirty:
        header_io.set_incompat(host, h.incompatible_features)
        host.flush()
    host.truncate((3 + l1_clusters) * cs)
    host.flush()
    h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters = 3 * cs, cs, 1


def _free_entry(rc: Refcounts, host: HostFile, ent: int, cb: int, extended: bool,
                data_file: bool, data_host: HostFile | None) -> None:
    """Drop the reference an L2 entry holds (data, zero-allocated or compressed).  The
    clusters of an external data file carry no refcount: there the host cluster is only
    deallocated in ``data_host`` (when given)."""
    if data_file:
        t = E.cluster_type(ent, extended=extended, has_data_file=True)
        if data_host is not None and t in (E.ClusterType.NORMAL, E.ClusterType.ZERO_ALLOC):
            data_host.punch_hole(ent & E.L2E_OFFSET_MASK, 1 << cb)
        return
    t = E.cluster_type(ent, extended=extended, has_data_file=False)
    if t == E.ClusterType.COMPRESSED:
        off, n = E.decode_compressed(ent, cb)
        first, last = (off & ~511) >> cb, (off + n - 1) >> cb
        for c in range(first, last + 1):
            rc.update(c, -1)
        return
    off = ent & E.L2E_OFFSET_MASK
    if off and rc.update(off >> cb, -1) == 0:
        host.punch_hole(off, 1 << cb)


def _discard_all(host: HostFile, h: Header, data_host: HostFile | None) -> None:
    """qemu's full discard of every active cluster (v2, snapshots, bitmaps, ...)."""
    cs, cb = h.cluster_size, h.cluster_bits
    extended = h.extended_l2
    data_file = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
    rc = Refcounts(host, h)
    l1 = be_u64_array(host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table"))
    step = 2 if extended else 1
    freed_tables: list[int] = []
    for i in range(len(l1)):
        l2_off = l1[i] & E.L1E_OFFSET_MASK
        if not l2_off:
            continue
        ents = be_u64_array(host.pread_exact(l2_off, cs, "L2 table"))
        if not l1[i] & E.QCOW_OFLAG_COPIED:
            # shared with a snapshot: give the active image its own copy first
            new_off = rc.alloc(1)
            rc.flush()
            host.flush()
            host.pwrite(new_off, pack_be_u64_array(ents))
            host.flush()
            l1[i] = new_off | E.QCOW_OFLAG_COPIED
            host.pwrite(h.l1_table_offset + 8 * i, struct.pack(">Q", l1[i]))
            host.flush()
            freed_tables.append(l2_off)
            l2_off = new_off
        old = array("Q", ents)
        changed = False
        for j in range(0, len(ents), step):
            if ents[j] or (extended and ents[j + 1]):
                ents[j] = 0
                if extended:
                    ents[j + 1] = 0
                changed = True
        if changed:
            host.pwrite(l2_off, pack_be_u64_array(ents))
            host.flush()
            for j in range(0, len(old), step):
                if old[j]:
                    _free_entry(rc, host, old[j], cb, extended, data_file, data_host)
    for off in freed_tables:
        rc.update(off >> cb, -1)
    rc.flush()
    host.flush()


# --- backing file ---------------------------------------------------------------------


def set_backing(host: HostFile, backing_file: str | None, backing_fmt: str | None) -> None:
    """Rewrite the backing file name and format in the header (qcow2 ``change_backing_file``):
    ``backing_file`` None removes both.  Other extensions are kept."""
    h = read_header(host)
    if backing_file is not None and len(backing_file.encode()) > 1023:
        raise UsageError("Backing file name too long")
    h.backing_file = backing_file or None
    if backing_file and backing_fmt:
        h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_fmt.encode())
    else:
        h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, None)
    try:
        h.pack()
    except DiskImgError:
        raise UnsupportedFeatureError("Could not change the backing file: the header does "
                                      "not fit in one cluster") from None
    clear_unknown_autoclear(host, h)
    write_header(host, h)


# --- amend ------------------------------------------------------------------------------

def set_feature_bits(host: HostFile, h: Header) -> None:
    """Write the v3 feature fields (incompatible, compatible, autoclear) in place."""
    header_io.set_feature_fields(host, h.incompatible_features, h.compatible_features,
                                 h.autoclear_features)
    host.flush()


def check_downgradable(h: Header) -> None:
    """Refuse what a v2 header cannot express (before ``amend`` writes anything)."""
    if h.refcount_order != 4:
        raise UsageError("compat=0.10 requires refcount_bits=16")
    if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
        raise UsageError("Cannot downgrade an image with a data file")
    bad = h.incompatible_features & ~(QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_DIRTY)
    if bad:
        raise UsageError(f"Cannot downgrade an image with incompatible features {bad:#x} set")
    if h.compression_type != 0:
        # qemu-img 7.2 downgrades and silently loses the compression type; refuse instead
        raise UsageError("Cannot downgrade an image with incompatible features "
                         f"{QCOW2_INCOMPAT_COMPRESSION:#x} set")


def downgrade_to_v2(host: HostFile, h: Header) -> None:
    """compat=0.10: refuse what v2 cannot express, expand zero clusters, rewrite the
    header as version 2 (no feature table, no v3 fields)."""
    check_downgradable(h)
    expand_zero_clusters(host, h)
    h2 = read_header(host)
    h2.version = 2
    h2.header_length = V2_HEADER_LENGTH
    h2.incompatible_features = h2.compatible_features = h2.autoclear_features = 0
    h2.refcount_order = 4
    h2.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, None)
    h2.compression_type = 0
    write_header(host, h2)
    h.version, h.header_length = 2, V2_HEADER_LENGTH
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    h.extensions = h2.extensions


def upgrade_to_v3(host: HostFile, h: Header) -> None:
    """compat=1.1: a v3 header with the feature-name table (as qemu writes it)."""
    h2 = read_header(host)
    h2.version = 3
    h2.header_length = V3_HEADER_LENGTH + 8
    h2.refcount_order = 4
    if h2.ext(QCOW2_EXT_MAGIC_FEATURE_TABLE) is None and h2.cluster_size >= 8192:
        h2.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, pack_feature_table())
    write_header(host, h2)
    h.version, h.header_length, h.extensions = 3, h2.header_length, h2.extensions


def _zero_cluster_indices(host: HostFile, h: Header, l1: array[int]
                          ) -> list[tuple[int, int, int]]:
    """(L1 index, L2 offset, entry index) of every zero-flagged entry in ``l1``."""
    cs = h.cluster_size
    data_file = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
    out = []
    for i in range(len(l1)):
        l2_off = l1[i] & E.L1E_OFFSET_MASK
        if not l2_off:
            continue
        ents = be_u64_array(host.pread_exact(l2_off, cs, "L2 table"))
        for j, ent in enumerate(ents):
            if E.cluster_type(ent, extended=h.extended_l2, has_data_file=data_file) in (
                    E.ClusterType.ZERO_PLAIN, E.ClusterType.ZERO_ALLOC):
                out.append((i, l2_off, j))
    return out


def expand_zero_clusters(host: HostFile, h: Header) -> None:
    """Replace every zero cluster (active and snapshot tables) by an explicit cluster of
    zeros.  A zero-allocated cluster keeps its host cluster, written with zeros, when
    only its L2 table refers to it; one that another table (a snapshot) still reads is
    left alone and the entry gets its own cluster of zeros (or none without a backing
    file), so the snapshot keeps its data (qemu 7.2 zeroes the shared cluster)."""
    cs, cb = h.cluster_size, h.cluster_bits
    rc = Refcounts(host, h)
    tables: list[array[int]] = [be_u64_array(host.pread_exact(
        h.l1_table_offset, h.l1_size * 8, "L1 table"))]
    if h.nb_snapshots:
        from diskimg.qcow2.snapshot import parse_table

        raw = host.pread(h.snapshots_offset, 64 << 20)
        tables += [be_u64_array(host.pread_exact(sn.l1_table_offset, sn.l1_size * 8,
                                                 "snapshot L1 table"))
                   for sn in parse_table(raw, h.nb_snapshots, h.snapshots_offset)]
    backed = h.backing_file is not None
    data_file = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
    done: dict[int, array[int]] = {}
    released: list[tuple[int, int]] = []
    for l1 in tables:
        for i in range(len(l1)):
            l2_off = l1[i] & E.L1E_OFFSET_MASK
            if not l2_off or l2_off in done:
                continue
            ents = be_u64_array(host.pread_exact(l2_off, cs, "L2 table"))
            changed = False
            for j, ent in enumerate(ents):
                t = E.cluster_type(ent, extended=h.extended_l2, has_data_file=data_file)
                if t == E.ClusterType.ZERO_ALLOC:
                    off = ent & E.L2E_OFFSET_MASK
                    l2_ref = rc.get(l2_off >> cb)
                    if rc.get(off >> cb) <= l2_ref:
                        # only this L2 table refers to the cluster: zero it in place
                        host.pwrite(off, bytes(cs))
                        ents[j] = off | (E.QCOW_OFLAG_COPIED if l2_ref == 1 else 0)
                        changed = True
                        continue
                    # another table (a snapshot) still reads the cluster's data: qemu 7.2
                    # zeroes it in place and destroys that data.  Give this entry its
                    # own zeros instead and drop its references to the shared cluster
                    # once the L2 table no longer points at it.
                    released.append((off, l2_ref))
                    if not backed:
                        ents[j] = 0
                        changed = True
                        continue
                    t = E.ClusterType.ZERO_PLAIN
                if t == E.ClusterType.ZERO_PLAIN:
                    if not backed:
                        ents[j] = 0  # unallocated reads as zeros without a backing file
                        changed = True
                        continue
                    l2_ref = rc.get(l2_off >> cb)
                    off = rc.alloc(1)
                    if l2_ref > 1:
                        # referenced once per table sharing this L2 table
                        rc.set(off >> cb, l2_ref)
                    rc.flush()
                    host.flush()
                    host.pwrite(off, bytes(cs))
                    ents[j] = off | (E.QCOW_OFLAG_COPIED if l2_ref == 1 else 0)
                    changed = True
            if changed:
                rc.flush()
                host.flush()
                host.pwrite(l2_off, pack_be_u64_array(ents))
                host.flush()
            for off, n in released:
                rc.update(off >> cb, -n)
            released.clear()
            done[l2_off] = ents
    rc.flush()
    host.flush()


def set_lazy_refcounts(host: HostFile, h: Header, on: bool) -> None:
    if on:
        if h.version < 3:
            raise UsageError("Lazy refcounts only supported with compatibility level 1.1 "
                             "and above (use compat=1.1 or greater)")
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
    else:
        h.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
    if h.version >= 3:
        set_feature_bits(host, h)


def rebuild_refcounts(host: HostFile, h: Header, new_order: int) -> None:
    """Change the refcount width: compute every cluster's refcount (from the current
    structures), write a new table and new blocks of the new width at the end of the file,
    switch the header to them, then free the old structures."""
    cs, cb = h.cluster_size, h.cluster_bits
    old = Refcounts(host, h)
    end_cluster = -(-host.size() // cs)
    counts = [old.get(c) for c in range(end_cluster)]
    # old refcount structures are freed after the switch
    old_structs = [h.refcount_table_offset >> cb]
    old_structs += [h.refcount_table_offset // cs + k
                    for k in range(1, h.refcount_table_clusters)]
    for ent in old.table:
        off = ent & ~0x1FF
        if off:
            old_structs.append(off >> cb)
    for c in old_structs:
        if c < len(counts):
            counts[c] = max(0, counts[c] - 1)
    max_new = (1 << (1 << new_order)) - 1
    if any(v > max_new for v in counts):
        raise UsageError(f"Cannot decrease refcount entry width to {1 << new_order} bits: "
                         "A refcount would be too large")
    per_block = cs * 8 >> new_order
    start = end_cluster
    # fixed point: blocks + table covering every cluster including themselves
    nblocks = ntable = 0
    while True:
        total = start + nblocks + ntable
        nb = -(-total // per_block)
        nt = -(-nb * 8 // cs)
        if (nb, nt) == (nblocks, ntable):
            break
        nblocks, ntable = nb, nt
    counts.extend([0] * (start + nblocks + ntable - len(counts)))
    for c in range(start, start + nblocks + ntable):
        counts[c] = 1
    table = array("Q", [0] * (ntable * cs // 8))
    for b in range(nblocks):
        blk = RefBlock(new_order, bytes(cs))
        base = b * per_block
        for k in range(per_block):
            if base + k < len(counts) and counts[base + k]:
                blk[k] = counts[base + k]
        host.pwrite((start + b) * cs, blk.pack())
        table[b] = (start + b) * cs
    host.pwrite((start + nblocks) * cs, pack_be_u64_array(table))
    host.flush()
    h.refcount_order = new_order
    h.refcount_table_offset = (start + nblocks) * cs
    h.refcount_table_clusters = ntable
    # one write switches table and width together (bytes 48..100): a crash between two
    # writes would make qemu read the new blocks at the old width (B11)
    header_io.write_fields(
        host, (HDR_REFCOUNT_TABLE_OFFSET, h.refcount_table_offset),
        (HDR_REFCOUNT_TABLE_CLUSTERS, h.refcount_table_clusters),
        (HDR_NB_SNAPSHOTS, h.nb_snapshots), (HDR_SNAPSHOTS_OFFSET, h.snapshots_offset),
        (HDR_INCOMPATIBLE_FEATURES, h.incompatible_features),
        (HDR_COMPATIBLE_FEATURES, h.compatible_features),
        (HDR_AUTOCLEAR_FEATURES, h.autoclear_features), (HDR_REFCOUNT_ORDER, h.refcount_order))
    host.flush()


def data_file_raw_flag(h: Header) -> bool:
    return bool(h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)


__all__ = [
    "QCOW2_INCOMPAT_COMPRESSION",
    "QCOW2_INCOMPAT_EXTL2",
    "downgrade_to_v2",
    "expand_zero_clusters",
    "make_empty",
    "read_header",
    "rebuild_refcounts",
    "set_backing",
    "set_lazy_refcounts",
    "upgrade_to_v3",
    "write_header",
]


# --- orchestration ----------------------------------------------------------------------

#: qcow2 options ``amend`` accepts (qemu-img 7.2's amend option list)
AMENDABLE = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
             "encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret",
             "encrypt.old-secret", "encrypt.state", "lazy_refcounts", "refcount_bits", "size")

AMEND_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""


def qemu_number(name: str, text: str) -> int:
    """A ``num`` option value as qemu's ``qemu_strtou64`` reads it (decimal, ``0x`` hex,
    leading-``0`` octal; a ``-`` wraps modulo 2^64), with qemu's messages."""
    t = text.strip()
    neg = t.startswith("-")
    body = t[1:] if neg or t.startswith("+") else t
    try:
        if body[:2].lower() == "0x":
            v = int(body[2:], 16)
        elif len(body) > 1 and body[0] == "0":
            v = int(body[1:], 8)
        else:
            if not body.isdigit():
                raise ValueError(body)
            v = int(body, 10)
    except ValueError:
        raise UsageError(f"Parameter '{name}' expects a number") from None
    if v > 0xFFFFFFFFFFFFFFFF:
        raise UsageError(f"Value '{text}' is too large for parameter '{name}'")
    return (-v) & 0xFFFFFFFFFFFFFFFF if neg else v


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def validate_amend_options(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Names and value syntax as qemu-img amend checks them (create-only options get the
    "only supported for image creation" hint)."""
    from diskimg.options import schema, validate

    create_names = {d.name for d in schema("qcow2")}
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in AMENDABLE:
            if k in create_names:
                raise UsageError(f"Invalid parameter '{k}'\n"
                                 "This option is only supported for image creation")
            raise UsageError(f"Invalid parameter '{k}'")
        if k in ("encrypt.keyslot", "encrypt.iter-time"):
            out[k] = str(_int64(qemu_number(k, v)))
            continue
        if k.startswith("encrypt."):
            out[k] = v
            continue
        out.update(validate("qcow2", [(k, v)]))
    return out


# --- LUKS key slots (amend -o encrypt.*) ----------------------------------------------


def keyslot_request(options: Mapping[str, str]) -> KeySlotAmend:
    """The ``encrypt.*`` entries of validated amend options as a :class:`KeySlotAmend`."""
    ks = options.get("encrypt.keyslot")
    it = options.get("encrypt.iter-time")
    return KeySlotAmend(state=options.get("encrypt.state"),
                        new_secret=options.get("encrypt.new-secret"),
                        old_secret=options.get("encrypt.old-secret"),
                        keyslot=None if ks is None else int(ks),
                        iter_time=None if it is None else int(it))


def _secret_lookup(secrets: Mapping[str, bytes]) -> Callable[[str], bytes]:
    def lookup(sid: str) -> bytes:
        if sid not in secrets:
            raise MissingSecretError(f"No secret with id '{sid}'")
        return secrets[sid]
    return lookup


def check_encryption_amendable(h: Header) -> None:
    """qemu's refusals for ``encrypt.*`` amend options on this image."""
    if not h.crypt_method:
        raise UsageError("Can't amend encryption options - encryption not present")
    if h.crypt_method != QCOW_CRYPT_LUKS:
        raise UnsupportedFeatureError("Only LUKS encryption options can be amended")


def amend_keyslots(dev: Any, req: KeySlotAmend, secrets: Mapping[str, bytes], *,
                   force: bool = False) -> LuksHeader:
    """Apply a key slot change to the open, writable LUKS qcow2 ``dev`` (unlocked with its
    ``encrypt.key-secret``); returns the new LUKS header.

    The master key is taken from the open image (no second PBKDF2 run), copied into a
    ``bytearray`` and wiped once the plan is made.  Each planned write goes to the LUKS
    area inside the image file and is flushed before the next one (key material before
    the slot header that activates it; an erase writes the header first)."""
    h = read_header(dev.host)
    check_encryption_amendable(h)
    if dev.read_only:
        raise UsageError("Cannot amend key slots of an image opened read-only")
    cipher = dev.cipher  # MissingSecretError without encrypt.key-secret
    if not isinstance(cipher, LuksCipher):
        raise UnsupportedFeatureError("Only LUKS encryption options can be amended")
    off, length = luks_area(h, dev.host.size())
    area = dev.host.pread_exact(off, length, "LUKS header (FDE extension)")
    header = LuksHeader.parse(area, len(area))
    mk = cipher.export_master_key()
    try:
        new, writes = plan_keyslot_amend(header, area, mk, req, _secret_lookup(secrets),
                                         force)
    finally:
        wipe(mk)
    for w in writes:
        dev.host.pwrite(off + w.offset, w.data)
        dev.host.flush()
    return new


def luks_area(h: Header, file_size: int | None) -> tuple[int, int]:
    """(offset, length) of the LUKS area the FDE header extension points at."""
    ext = h.ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    return parse_fde_extension(ext.data if ext is not None else None, h.cluster_size,
                               file_size)


def _keyslot_api(path: Any, secret: bytes, req: KeySlotAmend,
                 secrets: dict[str, bytes], force: bool, untrusted: bool
                 ) -> tuple[LuksHeader, LuksHeader]:
    from diskimg import api

    with api.open(path, "r+", "qcow2", backing=False, untrusted=untrusted,
                  secrets={**secrets, "\0unlock": secret},
                  options={"encrypt.key-secret": "\0unlock"}) as dev:
        h = read_header(dev.host)  # type: ignore[attr-defined]
        check_encryption_amendable(h)
        off, length = luks_area(h, None)
        before = LuksHeader.parse(dev.host.pread_exact(  # type: ignore[attr-defined]
            off, length, "LUKS header (FDE extension)"), length)
        after = amend_keyslots(dev, req, secrets, force=force)
    return before, after


def luks_add_key(path: Any, secret: bytes, new_secret: bytes, *,
                 keyslot: int | None = None, iter_time_ms: int | None = None,
                 force: bool = False, untrusted: bool = False) -> int:
    """Add ``new_secret`` as a key of the LUKS qcow2 at ``path`` unlocked with ``secret``
    (qemu-img amend ``encrypt.state=active``); returns the key slot used.

    ``keyslot`` None takes the first free slot; an active slot is replaced only with
    ``force``.  ``iter_time_ms`` (default 2000) is the PBKDF2 time of the new slot.
    Raises :class:`InvalidPassphraseError` when ``secret`` opens no slot."""
    before, after = _keyslot_api(
        path, secret, KeySlotAmend("active", new_secret="new", keyslot=keyslot,
                                   iter_time=iter_time_ms),
        {"new": new_secret}, force, untrusted)
    changed = [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
               if b.active and (not a.active or a.salt != b.salt)]
    assert len(changed) == 1
    return changed[0]


def luks_remove_keys(path: Any, secret: bytes, *, keyslot: int | None = None,
                     old_secret: bytes | None = None, force: bool = False,
                     untrusted: bool = False) -> list[int]:
    """Erase key slots of the LUKS qcow2 at ``path`` unlocked with ``secret`` (qemu-img
    amend ``encrypt.state=inactive``): slot ``keyslot``, and/or every slot ``old_secret``
    opens.  Erasing the last active slot is refused unless ``force`` (the data would be
    lost for ever).  Returns the erased slots."""
    before, after = _keyslot_api(
        path, secret, KeySlotAmend("inactive", keyslot=keyslot,
                                   old_secret=None if old_secret is None else "old"),
        {} if old_secret is None else {"old": old_secret}, force, untrusted)
    return [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
            if a.active and not b.active]


def amend(path: Any, options: dict[str, str], *, format: str | None = None,  # noqa: A002
          fmt: str | None = None, force: bool = False, secrets: Mapping[str, bytes] | None = None,
          untrusted: bool = False, image_options: Mapping[str, str] | None = None,
          device: Any = None) -> None:
    """``qemu-img amend`` for qcow2: ``compat``, ``lazy_refcounts``, ``refcount_bits``,
    ``size`` (grow or shrink), ``backing_file``/``backing_fmt`` (only their current
    values; use rebase to change them) and LUKS key slots (``encrypt.state``,
    ``encrypt.new-secret``, ``encrypt.old-secret``, ``encrypt.keyslot``,
    ``encrypt.iter-time``; secrets are ids into ``secrets``, the image is unlocked with
    ``image_options['encrypt.key-secret']``).

    Every option is checked before anything is written (qemu writes key slots before it
    checks ``lazy_refcounts`` against ``compat``).  Steps in qemu's order: key slots,
    upgrade, refcount width, lazy refcounts, size, downgrade.  ``device``: the image
    already open read-write (the CLI's), which amend closes."""
    from diskimg import api
    from diskimg.hostio import open_host_file
    from diskimg.params import renamed  # fmt= is format='s deprecated spelling

    secrets = dict(secrets or {})
    iopts = dict(image_options or {})
    dev: Any = device if device is not None else api.open(
        path, "r+", renamed("format", format, "fmt", fmt), backing=False,
        untrusted=untrusted, secrets=secrets,
        options=iopts)  # opening r+ also repairs a dirty image
    try:
        if dev.format != "qcow2":
            raise UsageError(f"Format driver '{dev.format}' does not support option "
                             "amendment")
        h = read_header(dev.host)
        plan = _validate(h, options)
        if plan[1] < plan[0]:
            after = h.copy()
            after.refcount_order = plan[2].bit_length() - 1  # the width it will have
            check_downgradable(after)
        if any(k.startswith("encrypt.") for k in options):
            amend_keyslots(dev, keyslot_request(options), secrets, force=force)
        clear_unknown_autoclear(dev.host, h)  # after every refusal
        if plan[1] > plan[0] and dev.snapshots.upgrade_for_v3():
            h = read_header(dev.host)  # the table moved: the steps below use ``h``
    finally:
        dev.close()
    cur_version, new_version, new_bits, lazy_on = plan
    host = open_host_file(path, True)
    try:
        if new_version > cur_version:
            upgrade_to_v3(host, h)
        if new_bits != h.refcount_bits:
            rebuild_refcounts(host, h, new_bits.bit_length() - 1)
        if lazy_on is not None and lazy_on != bool(
                h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS):
            set_lazy_refcounts(host, h, lazy_on)
    finally:
        host.close()
    if "size" in options:
        new_size = int(options["size"])
        with api.open(path, "r+", "qcow2", backing=False, untrusted=untrusted,
                      secrets=secrets, options=iopts) as dev:
            if new_size != dev.size:
                dev.resize(new_size, shrink=True)
    if new_version < cur_version:
        host = open_host_file(path, True)
        try:
            h = read_header(host)
            downgrade_to_v2(host, h)
        finally:
            host.close()


def _validate(h: Header, options: dict[str, str]) -> tuple[int, int, int, bool | None]:
    """Every refusal qemu-img amend makes for these options on this header, before any
    write; returns (current version, new version, new refcount bits, lazy refcounts)."""
    cur_version = h.version
    compat = options.get("compat")
    new_version = cur_version
    if compat is not None:
        version = compat_version(compat)
        if version is None:
            raise UsageError(f"Unknown compatibility level {compat}")
        new_version = version
    if "data_file" in options:
        if not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            raise UsageError("data-file can only be set for images that use an external "
                             "data file")
        if options["data_file"] != (h.data_file or ""):
            raise UsageError("Changing the data file is not supported")
    if "data_file_raw" in options:
        raise UsageError("data-file-raw cannot be set on existing images")
    if any(k.startswith("encrypt.") for k in options):
        check_encryption_amendable(h)
    bf = options.get("backing_file")
    bfmt = options.get("backing_fmt")
    if ("backing_file" in options or "backing_fmt" in options) and (
            bf != h.backing_file or bfmt != h.backing_format):
        raise UsageError("Cannot amend the backing file\n"
                         "You can use 'diskimg rebase' instead.")
    rb = options.get("refcount_bits")
    new_bits = h.refcount_bits
    if rb is not None:
        bits = int(rb, 0)
        if bits <= 0 or bits > 64 or bits & (bits - 1):
            raise UsageError("Refcount width must be a power of two and may not exceed 64 "
                             "bits")
        new_bits = bits
    if new_version < 3 and new_bits != 16:
        if rb is None:  # qemu's message when only the downgrade asks for it
            raise UsageError("compat=0.10 requires refcount_bits=16")
        raise UsageError("Refcount widths other than 16 bits require compatibility level "
                         "1.1 or above (use compat=1.1 or greater)")
    lazy = options.get("lazy_refcounts")
    lazy_on = None if lazy is None else parse_bool("lazy_refcounts", lazy)
    if lazy_on and new_version < 3:
        raise UsageError("Lazy refcounts only supported with compatibility level 1.1 and "
                         "above (use compat=1.1 or greater)")
    return cur_version, new_version, new_bits, lazy_on
