"""Creating qcow2 images laid out byte for byte as ``qemu-img create`` lays them out.

Layout of a new image: cluster 0 header (+ extensions, backing name), cluster 1 refcount
table, cluster 2 the first refcount block, then the L1 table at the first free cluster,
written only up to its last entry (so the file ends mid-cluster, as QEMU's does).
"""

from __future__ import annotations

from diskimg.errors import UsageError
from diskimg.hostio import open_host_file
from diskimg.qcow2 import entries as E
from diskimg.qcow2 import header_io
from diskimg.qcow2.entries import be_u64_array, pack_be_u64_array, u64_run
from diskimg.qcow2.layout import (
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_CRYPT_LUKS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH_COMPRESSION,
    Header,
    implied_preallocation,
    l1_entries_for,
    l1_fits,
    pack_feature_table,
)
from diskimg.qcow2.refcount import (
    RefBlock,
    refblock_entries,
    refcount_blocks_for,
    refcount_order_of,
)
from diskimg.units import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os
    from typing import Any


def _flag(options: dict[str, Any], name: str) -> bool:
    """Boolean option ``name`` taken from ``options`` (off when absent), parsed by the one
    bool parser (:func:`diskimg.options.parse_bool`) when given: a create without ``-o``
    loads no option parser (start-up, issue 20)."""
    value = options.pop(name, False)
    if value is False:
        return False
    from diskimg.options import parse_bool

    return parse_bool(name, value)


def plan_header(size: int, options: dict[str, Any], backing_file: str | None = None,
                backing_fmt: str | None = None) -> tuple[Header, str]:
    """Validate qemu-img's qcow2 ``-o`` options; returns the new header and preallocation.

    Consumes the options it knows from ``options``.
    """
    version = 3  # qemu-img's default, compat=1.1
    if "compat" in options:
        from diskimg.options import compat_version

        compat = str(options.pop("compat"))
        got = compat_version(compat)
        if got is None:
            raise UsageError(f"Parameter 'version' does not accept value '{compat}'")
        version = got
    cs_opt = options.pop("cluster_size", 65536)
    cs = cs_opt if isinstance(cs_opt, int) else parse_size(str(cs_opt))
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise UsageError("Cluster size must be a power of two between 512 and 2048k")
    cluster_bits = cs.bit_length() - 1
    rb = int(options.pop("refcount_bits", 16))
    refcount_order_of(rb)
    if version == 2 and rb != 16:
        raise UsageError("Different refcount widths than 16 bits require compatibility level "
                         "1.1 or above (use version=v3 or greater)")
    lazy = _flag(options, "lazy_refcounts")
    if lazy and version == 2:
        raise UsageError("Lazy refcounts only supported with compatibility level 1.1 and "
                         "above (use version=v3 or greater)")
    extl2 = _flag(options, "extended_l2")
    if extl2 and version == 2:
        raise UsageError("Extended L2 entries are only supported with compatibility level "
                         "1.1 and above (use version=v3 or greater)")
    if extl2 and cs < 16384:
        raise UsageError("Extended L2 entries are only supported with cluster sizes of at "
                         "least 16384 bytes")
    ctype_name = str(options.pop("compression_type", "zlib"))
    if ctype_name not in ("zlib", "zstd"):
        raise UsageError(f"Parameter 'compression-type' does not accept value '{ctype_name}'")
    ctype = 1 if ctype_name == "zstd" else 0
    if ctype and version == 2:
        raise UsageError("Non-zlib compression type is only supported with compatibility "
                         "level 1.1 and above (use version=v3 or greater)")
    prealloc = str(options.pop("preallocation", "off"))
    if prealloc != "off":  # (off: qemu-img's default, always allowed)
        from diskimg.options import PREALLOCATION_MODES, check_preallocation

        check_preallocation("qcow2", prealloc, PREALLOCATION_MODES)
    if backing_file is not None and prealloc != "off" and not extl2:
        # qemu: preallocated clusters would hide the backing file (only extended L2 entries
        # can mark them unallocated-but-preallocated)
        raise UsageError("Backing file and preallocation can only be used at the same time "
                         "if extended_l2 is on")
    data_file = options.pop("data_file", None) or None
    data_file_raw = _flag(options, "data_file_raw")
    if data_file_raw and data_file is None:
        raise UsageError("data-file-raw requires data-file")
    if data_file is not None and version == 2:
        raise UsageError("External data files are only supported with compatibility level "
                         "1.1 and above (use version=v3 or greater)")
    legacy = _flag(options, "encryption")
    enc_format = str(options.pop("encrypt.format", "aes" if legacy else "")) or None
    enc_opts = {k: options.pop(k) for k in list(options) if k.startswith("encrypt.")}
    if enc_format is None and enc_opts:
        raise UsageError("Missing encryption format (use encrypt.format=luks|aes)")
    if enc_format not in (None, "aes", "luks"):
        raise UsageError(f"Parameter 'encrypt.format' does not accept value '{enc_format}'")
    if enc_format is not None and "encrypt.key-secret" not in enc_opts:
        raise UsageError("Parameter 'encrypt.key-secret' is required for cipher")
    if size % 512:
        size = -(-size // 512) * 512  # qemu rounds the virtual size up to a sector
    l1_size = l1_entries_for(size, cs, 16 if extl2 else 8)
    if not l1_fits(l1_size):
        raise UsageError("The image size is too large for file format 'qcow2' (try using a "
                         "larger cluster size)")
    h = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
               l1_table_offset=0, refcount_table_offset=cs, refcount_table_clusters=1,
               refcount_order=rb.bit_length() - 1,
               header_length=V2_HEADER_LENGTH if version == 2 else V3_HEADER_LENGTH_COMPRESSION,
               compression_type=ctype)
    if version == 3:
        if lazy:
            h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
        if extl2:
            h.incompatible_features |= QCOW2_INCOMPAT_EXTL2
        if ctype:
            h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION
    if backing_file is not None or data_file is not None:
        from diskimg.hostio.names import raw_c_name  # (an image that names a file only)
    if backing_file is not None:
        h.backing_file = backing_file
        if backing_fmt is not None:
            h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, raw_c_name(backing_fmt, "Backing format"))
    if version == 3 and cs >= 8192:
        # observed: qemu-img 7.2 writes the feature-name table only for clusters >= 8 KiB
        h.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, pack_feature_table())
    if len(raw_c_name(backing_file, "Backing file name") if backing_file else b"") > 1023:
        raise UsageError("Backing file name too long")
    if enc_format is not None:
        h.crypt_method = 1 if enc_format == "aes" else 2
        options["_encrypt"] = enc_opts  # consumed by create_qcow2
    if data_file is not None:
        h.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE
        h.set_ext(QCOW2_EXT_MAGIC_DATA_FILE, raw_c_name(str(data_file), "Data file name"))
        if data_file_raw:
            h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
    return h, prealloc


def create_qcow2(path: str | os.PathLike[str], size: int, *, backing_file: str | None = None,
                 backing_fmt: str | None = None, options: dict[str, Any] | None = None,
                 secrets: dict[str, bytes] | None = None, lock: bool = True) -> None:
    """Write a new, empty qcow2 image at ``path`` (truncating it).  ``lock``: as
    :func:`diskimg.image_create.make_image`'s (for the image and its data file)."""
    opts = dict(options or {})
    opts.pop("size", None)
    opts.pop("backing_file", None)
    opts.pop("backing_fmt", None)
    h, prealloc = plan_header(size, opts, backing_file, backing_fmt)
    enc_opts: dict[str, Any] = opts.pop("_encrypt", {})
    passphrase = b""
    if h.crypt_method:
        key_id = str(enc_opts["encrypt.key-secret"])
        if key_id not in (secrets or {}):
            raise UsageError(f"No secret with id '{key_id}'")
        passphrase = (secrets or {})[key_id]
    if opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    # QEMU's lock on the image first: a refused create leaves it (and its data file) as
    # they were; the image is emptied only once the data file is made too
    host = open_host_file(path, True, create=True, truncate=False, lock_mode=lock)
    try:
        if h.data_file is not None:
            _create_data_file(path, h.data_file, h.size, lock)
        reserve = 0
        if prealloc != "off" and h.data_file is None:  # the file will hold every cluster
            from diskimg.qcow2.measure import prealloc_size

            reserve = prealloc_size(h.size, cs, h.refcount_order,
                                    bool(h.incompatible_features & QCOW2_INCOMPAT_EXTL2))
        host.empty(reserve)
        # clusters 0-2: header, refcount table, first refcount block (refcounts for 0..2).
        # The header cluster is written last: until then the file has no magic, so a crash
        # leaves no half-made image that qemu would open (B12)
        # (one entry: no ``array``, whose import loads ``collections``: start-up, issue 20)
        host.pwrite(cs, pack_be_u64_array(u64_run(2 * cs, 1, 0)).ljust(cs, b"\0"))
        # the L1 table follows, at cluster 3: counted in that first block when it fits
        # there and nothing else is allocated (no LUKS area), as the allocator would place
        # it; else the allocator places it
        at_3 = bool(h.l1_size) and not h.crypt_method and \
            3 + l1_clusters <= refblock_entries(cs, h.refcount_order)
        blk = RefBlock(h.refcount_order, bytes(cs))
        blk.fill(0, 3 + l1_clusters if at_3 else 3, 1)
        host.pwrite(2 * cs, blk.pack())
        if h.l1_size:
            if at_3:
                l1_off = 3 * cs
            else:
                from diskimg.qcow2.refcount import Refcounts

                rc = Refcounts(host, h)
                l1_off = rc.alloc(l1_clusters)
                rc.flush()
            host.pwrite(l1_off, bytes(h.l1_size * 8))
            h.l1_table_offset = l1_off
            if h.crypt_method == QCOW_CRYPT_LUKS:
                _add_luks_area(host, h, rc, passphrase, enc_opts)
        host.flush()
        host.pwrite(0, h.pack().ljust(cs, b"\0"))
        host.flush()
    finally:
        host.close()
    prealloc = implied_preallocation(h, prealloc)
    if prealloc in ("falloc", "full") and h.data_file is None:
        _preallocate_space(path, h, prealloc, lock)
    elif prealloc != "off":
        _preallocate(path, prealloc, lock)


def _create_data_file(image: str | os.PathLike[str], name: str, size: int,
                      lock: bool) -> None:
    """Create the external data file as an empty raw image of the virtual size.

    Unlike qemu-img (which resolves the name against the working directory) the name is
    resolved against the image's directory, where diskimg also looks for it on open."""
    from pathlib import Path

    from diskimg.raw import create_raw

    p = Path(name)
    if not p.is_absolute():
        p = Path(image).parent / p
    host = open_host_file(p, True, create=True, truncate=False, lock_mode=lock)
    try:
        create_raw(host, size)
    finally:
        host.close()


def _add_luks_area(host: Any, h: Header, rc: Any, passphrase: bytes,
                   enc_opts: dict[str, Any]) -> None:
    """Build a LUKS1 header with qemu's defaults in fresh clusters after the L1 table and
    point the full-disk-encryption extension at it (QEMU's layout)."""
    from diskimg.crypto.luks import create_luks, pack_fde_extension
    from diskimg.qcow2.layout import QCOW2_EXT_MAGIC_CRYPTO_HEADER

    opts = {k[len("encrypt."):]: v for k, v in enc_opts.items() if k != "encrypt.key-secret"}
    iter_time = int(opts.pop("iter-time", 2000))
    area, _cipher = create_luks(passphrase, opts, iter_time)
    cs = h.cluster_size
    nclusters = -(-len(area) // cs)
    off = rc.alloc(nclusters)
    rc.flush()
    host.pwrite(off, area.ljust(nclusters * cs, b"\0"))
    h.set_ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER, pack_fde_extension(off, len(area)))


def _preallocate_space(path: str | os.PathLike[str], h: Header, mode: str,
                       lock: bool) -> None:
    """``preallocation=falloc|full`` laid out as qemu-img 7.2 lays it out.

    QEMU first moves the refcount table to the end of the file, sized (with new refcount
    blocks in front of it) to count every cluster the preallocation will add, then puts
    the data clusters after it in one run (fallocated, or written as zeros for ``full``),
    and only then allocates the L2 tables: the first one in the freed cluster of the old
    refcount table, the others after the data.  Invariant: every cluster the file uses
    has refcount 1 and everything else 0, so ``check`` finds no leaks."""
    from array import array  # (here: a plain create does not load it)

    cs = h.cluster_size
    order = h.refcount_order
    per_block = refblock_entries(cs, order)
    step = 2 if h.incompatible_features & QCOW2_INCOMPAT_EXTL2 else 1  # u64 words an entry
    per_l2 = cs // (8 * step)
    host = open_host_file(path, True, lock_mode=lock)
    try:
        old_end = -(-host.size() // cs)  # clusters in use (the file ends mid-cluster)
        n_data = -(-h.size // cs)
        n_l2 = -(-n_data // per_l2) + 1  # QEMU's estimate: one more for a head/tail
        n_blocks = refcount_blocks_for(old_end + n_data + n_l2, cs, order)
        table_entries = -(-n_blocks // (cs // 8)) * (cs // 8)
        table_clusters = table_entries * 8 // cs
        # every refcount block the file has so far (a LUKS header can span several)
        raw = host.pread(h.refcount_table_offset, h.refcount_table_clusters * cs)
        old = be_u64_array(raw)
        table = [0] * table_entries
        blocks: dict[int, RefBlock] = {}
        for i, off in enumerate(old):
            if off:
                table[i] = off
                blocks[i] = RefBlock(order, host.pread(off, cs))
        nxt = old_end
        for i in range(n_blocks):
            if not table[i]:
                table[i] = nxt * cs
                blocks[i] = RefBlock(order, bytes(cs))
                nxt += 1
        table_at = nxt
        data_at = table_at + table_clusters
        old_table_cluster = h.refcount_table_offset // cs
        # L2 tables: the old refcount table's cluster first, then after the data
        l2_at = [old_table_cluster, *range(data_at + n_data, data_at + n_data + n_l2 - 1)]
        n_tables = -(-n_data // per_l2)
        # in use: the new refcount blocks, the table and the data, then the L2 tables
        used = [(old_end, data_at + n_data)] + [(c, c + 1) for c in l2_at[:n_tables]]
        for c in range(old_table_cluster, old_table_cluster + h.refcount_table_clusters):
            blocks[c // per_block][c % per_block] = 0
        for lo, hi in used:
            while lo < hi:
                i, j = divmod(lo, per_block)
                k = min(hi - lo, per_block - j)
                blocks[i].fill(j, j + k, 1)
                lo += k
        for i, b in sorted(blocks.items()):
            host.pwrite(table[i], b.pack())
        host.pwrite(table_at * cs, pack_be_u64_array(array("Q", table)))
        header_io.set_refcount_table(host, table_at * cs, table_clusters)
        h.refcount_table_offset, h.refcount_table_clusters = table_at * cs, table_clusters
        data_end = (data_at + n_data) * cs
        if mode == "full":
            host.write_zeros(data_at * cs, n_data * cs)
        else:
            host.preallocate(data_at * cs, n_data * cs)
        if host.size() < data_end:
            host.truncate(data_end)
        l1 = array("Q", bytes(h.l1_size * 8))
        for t in range(n_tables):
            first = t * per_l2
            entries = array("Q", bytes(cs))
            for j in range(min(per_l2, n_data - first)):
                entries[j * step] = ((data_at + first + j) * cs) | E.QCOW_OFLAG_COPIED
            host.pwrite(l2_at[t] * cs, pack_be_u64_array(entries))
            l1[t] = (l2_at[t] * cs) | E.QCOW_OFLAG_COPIED
        host.pwrite(h.l1_table_offset, pack_be_u64_array(l1))
        host.flush()
    finally:
        host.close()


def _preallocate(path: str | os.PathLike[str], mode: str, lock: bool) -> None:
    """Allocate every L2 table and data cluster (``metadata``), then optionally the bytes."""
    from diskimg.qcow2.image import Qcow2Image

    host = open_host_file(path, True, lock_mode=lock)
    img = Qcow2Image(host)
    try:
        img.preallocate(0, img.size, mode)
    finally:
        img.close()
