"""``qemu-img measure`` arithmetic: the file size a new image needs (pure functions).

qemu-img 7.2's model, reproduced exactly (including where it over-estimates):

* ``fully-allocated`` = LUKS payload (rounded to clusters) + header cluster + every L2
  table + the L1 table (rounded to whole clusters of L1 entries) + refcount table and
  blocks covering all of that and the data (a fixed point) + the data, every cluster;
* ``required`` = ``fully-allocated`` minus the data clusters that would stay unallocated:
  with an input image, only clusters holding data (allocated, not zero) anywhere in its
  chain count; with ``backing_file`` or ``preallocation=falloc|full`` every cluster does;
* ``bitmaps`` (qcow2 v3 output from a qcow2 input only): the clusters the input's
  persistent bitmaps, their tables and the bitmap directory would take.

Sizes are bytes.  Nothing here does I/O except reading an input device's block status and
(for ``bitmaps``) its bitmap directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskimg.crypto.luks.header import luks_header_size, measured_payload  # noqa: F401 (re-exported)
from diskimg.errors import FormatError, UsageError
from diskimg.options import compat_version, parse_bool
from diskimg.qcow2 import bitmap_table as BT
from diskimg.qcow2.bitmaps import (
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    BitmapEntry,
    BitmapsExt,
)
from diskimg.qcow2.layout import l1_entries_for, l1_fits
from diskimg.qcow2.refcount import refcount_metadata_clusters, refcount_order_of
from diskimg.units import parse_size

if TYPE_CHECKING:
    from diskimg.device import BlockDevice
    from diskimg.qcow2.image import Qcow2Image

L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8
DEFAULT_CLUSTER_SIZE = 65536
MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 << 20
BME_TABLE_ENTRY_SIZE = 8
SECTOR = 512


@dataclass(frozen=True, slots=True)
class MeasureInfo:
    """qemu's ``BlockMeasureInfo``: bytes; ``bitmaps`` is None when qemu leaves it out."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"required": self.required,
                             "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        return d

    def human(self) -> str:
        """The lines ``qemu-img measure`` prints."""
        s = (f"required size: {self.required}\n"
             f"fully allocated size: {self.fully_allocated}\n")
        if self.bitmaps is not None:
            s += f"bitmaps size: {self.bitmaps}\n"
        return s


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _div_round_up(n: int, m: int) -> int:
    return -(-n // m)


# --- the pure arithmetic ------------------------------------------------------------


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> tuple[int, int]:
    """Bytes of refcount table plus blocks needed to count ``clusters`` host clusters
    and themselves (refcount.refcount_metadata_clusters); returns (bytes, refblock count)."""
    blocks, table = refcount_metadata_clusters(clusters, cluster_size, refcount_order,
                                               generous_increase)
    return (blocks + table) * cluster_size, blocks


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """File size of a fully preallocated image: metadata plus every data cluster."""
    aligned = _round_up(total_size, cluster_size)
    l2e = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta = cluster_size  # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    rc, _ = refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + rc + aligned


def data_clusters_bytes(runs: Iterable[tuple[int, int, bool]], cluster_size: int) -> int:
    """qemu's count of the input's data: ``runs`` are (offset, length, is_data) covering
    the input in order; every cluster touched by data counts whole."""
    required = 0
    skip_to = 0
    for off, length, is_data in runs:
        end = off + length
        if end <= skip_to or not is_data:
            continue
        off = max(off, skip_to)
        stop = _round_up(end, cluster_size)
        required += off % cluster_size + (stop - off)
        skip_to = stop
    return required


def bitmaps_size(bitmaps: Iterable[tuple[str, int, int]], cluster_size: int) -> int:
    """Bytes persistent bitmaps take in a qcow2 file of ``cluster_size``: ``bitmaps`` are
    (name, disk size, granularity)."""
    total = 0
    dir_size = 0
    for name, size, granularity in bitmaps:
        # one table entry per data cluster (the table codec's rule)
        nclusters = BT.table_size(size, granularity.bit_length() - 1, cluster_size)
        total += nclusters * cluster_size
        total += _round_up(nclusters * BME_TABLE_ENTRY_SIZE, cluster_size)
        dir_size += len(BitmapEntry(0, 0, 0, 1, 0, name).pack())  # its directory entry
    return total + _round_up(dir_size, cluster_size)


# --- option handling --------------------------------------------------------------


def _opt_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    v = options.get(key)
    if v is None:
        return default
    return parse_bool(key, v, strict=True)


def _opt_size(options: Mapping[str, Any], key: str, default: int) -> int:
    v = options.get(key)
    if v is None:
        return default
    return v if isinstance(v, int) else parse_size(str(v))


@dataclass(frozen=True, slots=True)
class Qcow2Plan:
    """The qcow2 creation options measure looks at, validated as qemu does."""

    cluster_size: int = DEFAULT_CLUSTER_SIZE
    version: int = 3
    refcount_order: int = 4
    extended_l2: bool = False
    preallocation: str = "off"
    backing_file: bool = False
    luks_payload: int = 0
    size: int = 0


def parse_qcow2_options(options: Mapping[str, Any],
                        has_secret: Callable[[str], bool] | None = None) -> Qcow2Plan:
    """Validate the ``-o`` values (already syntax-checked strings) in qemu's order, with
    qemu's messages; ``has_secret(id)`` says whether a ``--object secret`` exists."""
    extl2 = _opt_bool(options, "extended_l2", False)
    cs = _opt_size(options, "cluster_size", DEFAULT_CLUSTER_SIZE)
    if cs & (cs - 1) or not MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE:
        raise UsageError("Cluster size must be a power of two between 512 and 2048k")
    if extl2 and cs < 16384:
        raise UsageError("Extended L2 entries are only supported with cluster sizes of at "
                         "least 16384 bytes")
    compat = options.get("compat")
    version = 3 if compat is None else compat_version(compat, qapi_names=False)
    if version is None:
        raise UsageError(f"Invalid compatibility level: '{compat}'")
    rb = options.get("refcount_bits")
    bits = 16 if rb is None else int(str(rb), 0)
    refcount_order_of(bits)
    if version < 3 and bits != 16:
        raise UsageError("Different refcount widths than 16 bits require compatibility "
                         "level 1.1 or above (use compat=1.1 or greater)")
    prealloc = str(options.get("preallocation") or "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"invalid parameter value: {prealloc}")
    backing = options.get("backing_file") is not None
    luks = 0
    if str(options.get("encrypt.format") or "") == "luks":
        luks = _round_up(measured_payload(options, has_secret, "encrypt."), cs)
    size = _opt_size(options, "size", 0)
    return Qcow2Plan(cs, version, bits.bit_length() - 1, extl2, prealloc, backing, luks,
                     size)


# --- measuring --------------------------------------------------------------------


def _input_runs(dev: Any) -> Iterable[tuple[int, int, bool]]:
    """(offset, length, is_data) over the whole input, through its backing chain:
    data = allocated, reads data, not known zero (qemu's DATA|ALLOCATED without ZERO;
    holes under data clusters count as zero only in metadata-preallocated qcow2 images,
    which block status already takes care of)."""
    pos, size = 0, dev.size
    while pos < size:
        st, _depth = dev.block_status(pos, size - pos)
        n = st.length
        if n <= 0:
            raise AssertionError("block status made no progress")
        yield pos, n, bool(st.allocated and st.data and not st.zero)
        pos += n


def _qcow2_v3(dev: BlockDevice | None) -> Qcow2Image | None:
    """``dev`` when it is a qcow2 v3 image (the only images with persistent bitmaps)."""
    from diskimg.qcow2.image import Qcow2Image

    return dev if isinstance(dev, Qcow2Image) and dev.header.version >= 3 else None


def input_bitmaps(dev: Qcow2Image) -> list[tuple[str, int, int]]:
    """Persistent bitmaps of a qcow2 input device: (name, size, granularity)."""
    header, host = dev.header, dev.host
    bx = BitmapsExt.of(header)
    if bx is None or bx.directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        return []
    raw = host.pread(bx.directory_offset, bx.directory_size)
    out: list[tuple[str, int, int]] = []
    pos = 0
    for _ in range(bx.nb_bitmaps):
        try:
            e, n = BitmapEntry.parse(raw, pos, bx.directory_offset)
        except FormatError:
            break
        out.append((e.name, int(dev.size), 1 << e.granularity_bits))
        pos += n
    return out


def measure_qcow2(options: Mapping[str, Any], dev: BlockDevice | None = None,
                  has_secret: Callable[[str], bool] | None = None,
                  bitmap_dev: BlockDevice | None = None) -> MeasureInfo:
    """qcow2 output: from ``options['size']`` or from the open input device ``dev``
    (``bitmap_dev``: the image whose persistent bitmaps count, default ``dev``)."""
    p = parse_qcow2_options(options, has_secret)
    cs = p.cluster_size
    vsize = _round_up(p.size, cs)
    l2e = L2E_SIZE_EXTENDED if p.extended_l2 else L2E_SIZE_NORMAL
    if not l1_fits(l1_entries_for(vsize, cs, l2e)):
        raise UsageError("The image size is too large (try using a larger cluster size)")
    required = 0
    if dev is not None:
        vsize = _round_up(dev.size, cs)
        required = vsize if p.backing_file else data_clusters_bytes(_input_runs(dev), cs)
    if p.preallocation in ("full", "falloc"):
        required = vsize
    full = p.luks_payload + prealloc_size(vsize, cs, p.refcount_order, p.extended_l2)
    bitmaps = None
    src = bitmap_dev if bitmap_dev is not None else dev
    qsrc = _qcow2_v3(src) if p.version >= 3 else None
    if qsrc is not None:
        bitmaps = bitmaps_size(input_bitmaps(qsrc), cs)
    return MeasureInfo(full - vsize + required, full, bitmaps)


def measure_raw(options: Mapping[str, Any], dev: BlockDevice | None = None) -> MeasureInfo:
    """raw output: the input's length, or ``size`` rounded up to a sector."""
    if dev is not None:
        req = int(dev.size)
    else:
        req = _round_up(_opt_size(options, "size", 0), SECTOR)
    return MeasureInfo(req, req)


def measure_luks(options: Mapping[str, Any], dev: BlockDevice | None = None,
                 has_secret: Callable[[str], bool] | None = None) -> MeasureInfo:
    """luks output: the LUKS header and key material, then the input's length or
    ``size`` (not rounded), all of it allocated (qemu's block_crypto_measure)."""
    payload = measured_payload(options, has_secret)
    n = payload + (int(dev.size) if dev is not None else _opt_size(options, "size", 0))
    return MeasureInfo(n, n)


def measure(out_format: str, options: Mapping[str, Any] | None = None,
            dev: BlockDevice | None = None, *,
            size: int | None = None, has_secret: Callable[[str], bool] | None = None,
            bitmap_dev: BlockDevice | None = None) -> MeasureInfo:
    """``qemu-img measure``: sizes for a new ``out_format`` image holding ``dev``'s
    contents (an open device) or of ``size`` bytes.  ``options`` use ``-o`` names."""
    opts = dict(options or {})
    if size is not None:
        opts["size"] = size
    if out_format == "qcow2":
        return measure_qcow2(opts, dev, has_secret, bitmap_dev)
    if out_format == "raw":
        return measure_raw(opts, dev)
    if out_format == "luks":
        return measure_luks(opts, dev, has_secret)
    raise UsageError(f"Block driver '{out_format}' does not support size measurement")
