"""qcow2 on-disk constants and records: the header and its extensions.

Names follow QEMU (``qcow2.h``, ``docs/interop/qcow2.txt``).  Records (:mod:`diskimg.slotted`) have
``parse(bytes)`` / ``pack()`` and no I/O.  All integers are big-endian.
"""

from __future__ import annotations

import struct

from diskimg.errors import (
    CorruptImageError,
    FormatError,
    UnsupportedFeatureError,
    WrongFormatError,
)
from diskimg.slotted import FrozenRecord, Record, set_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, Self

QCOW_MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_L1_SIZE = 0x2000000  # bytes
QCOW_MAX_REFTABLE_SIZE = 0x800000  # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1
BACKING_FILE_NAME_MAX = 1023



def l1_entries_for(size: int, cluster_size: int, l2_entry_size: int = 8) -> int:
    """L1 entries that map ``size`` guest bytes: one per L2 table of ``cluster_size //
    l2_entry_size`` entries (8 bytes, 16 with extended L2)."""
    return -(-size // (cluster_size * (cluster_size // l2_entry_size)))


def l1_fits(entries: int) -> bool:
    """Whether an L1 table of ``entries`` is within the spec's limit (QCOW_MAX_L1_SIZE)."""
    return entries * 8 <= QCOW_MAX_L1_SIZE


QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

# incompatible feature bits
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F
# compatible / autoclear
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW  # known bits

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

# header extension types
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
# the extensions qemu knows: each read into one field (the last one wins), written once
_SINGLE_EXTENSIONS = frozenset({
    QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER, QCOW2_EXT_MAGIC_BITMAPS, QCOW2_EXT_MAGIC_DATA_FILE})

#: The feature-name table QEMU 7.2 writes into every v3 header, in its order: (type,
#: bit, name as the bytes stored)
FEATURE_NAMES: list[tuple[int, int, bytes]] = [
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
]

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
V3_HEADER_LENGTH_COMPRESSION = 112
_EXT_HDR = struct.Struct(">II")


class HeaderField(FrozenRecord):
    """One header field: its byte offset and big-endian struct code."""

    __slots__ = ("name", "offset", "code")
    name: str
    offset: int
    code: str

    def __init__(self, name: str, offset: int, code: str) -> None:
        set_field(self, "name", name)
        set_field(self, "offset", offset)
        set_field(self, "code", code)

    @property
    def size(self) -> int:
        return struct.calcsize(">" + self.code)


def _fields(fmt: str, names: tuple[str, ...], base: int) -> dict[str, HeaderField]:
    out, pos = {}, base
    for code, name in zip(fmt.lstrip(">"), names, strict=True):
        out[name] = HeaderField(name, pos, code)
        pos += struct.calcsize(">" + code)
    return out


# Header field offsets, derived from the structs Header.parse uses (docs/interop/qcow2.txt,
# "Header": bytes 0-71 are the version 2 header, 72-103 the version 3 additions).
_FIELDS = _fields(_V2.format, (
    "magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
    "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
    "refcount_table_clusters", "nb_snapshots", "snapshots_offset"), 0)
_FIELDS.update(_fields(_V3.format, (
    "incompatible_features", "compatible_features", "autoclear_features", "refcount_order",
    "header_length"), V2_HEADER_LENGTH))
HDR_SIZE = _FIELDS["size"]
HDR_L1_SIZE = _FIELDS["l1_size"]
HDR_L1_TABLE_OFFSET = _FIELDS["l1_table_offset"]
HDR_REFCOUNT_TABLE_OFFSET = _FIELDS["refcount_table_offset"]
HDR_REFCOUNT_TABLE_CLUSTERS = _FIELDS["refcount_table_clusters"]
HDR_NB_SNAPSHOTS = _FIELDS["nb_snapshots"]
HDR_SNAPSHOTS_OFFSET = _FIELDS["snapshots_offset"]
HDR_INCOMPATIBLE_FEATURES = _FIELDS["incompatible_features"]
HDR_COMPATIBLE_FEATURES = _FIELDS["compatible_features"]
HDR_AUTOCLEAR_FEATURES = _FIELDS["autoclear_features"]
HDR_REFCOUNT_ORDER = _FIELDS["refcount_order"]
HDR_HEADER_LENGTH = _FIELDS["header_length"]

#: the fixed part of a snapshot table entry (snapshot_table.EntryHeader.SIZE)
SNAPSHOT_ENTRY_HEADER_SIZE = 40


def implied_preallocation(h: Header, mode: str) -> str:
    """The preallocation a create or grow of ``h``'s image makes when asked for ``mode``:
    a raw data file (``data_file_raw``) is mapped one to one from the start, so qemu
    turns ``off`` into ``metadata`` (every new guest cluster mapped at its own offset)."""
    if mode == "off" and h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        return "metadata"
    return mode


def check_table_pointer(count: int, offset: int, cluster_size: int) -> str | None:
    """qemu's check of the header's snapshot table fields (count, offset): None when
    they are usable, else what is wrong ("too large" or "offset invalid")."""
    if count > QCOW_MAX_SNAPSHOTS:
        return "too large"
    if offset % cluster_size or offset > (1 << 63) - 1 - count * SNAPSHOT_ENTRY_HEADER_SIZE:
        return "offset invalid"
    return None


def require_table_pointer(h: Header, cluster_size: int) -> None:
    """:func:`check_table_pointer` on an open (made even with no snapshots): a
    :class:`FormatError` naming the field that is wrong."""
    bad = check_table_pointer(h.nb_snapshots, h.snapshots_offset, cluster_size)
    if bad is not None:
        at = HDR_NB_SNAPSHOTS if bad == "too large" else HDR_SNAPSHOTS_OFFSET
        raise FormatError(f"Snapshot table {bad}", offset=at.offset, field=at.name)
HDR_COMPRESSION_TYPE = V3_HEADER_LENGTH  # one byte, present when header_length > 104


def read_fields(host: Any, *fields: HeaderField) -> tuple[int, ...]:
    """Header fields (contiguous, in offset order) as they are on disk now, unsigned
    (``host.pread``).  Re-exported by :mod:`diskimg.qcow2.header_io`, the writer; here so
    that a reader (the checker) does not load the writer."""
    start = fields[0].offset
    end = fields[-1].offset + fields[-1].size
    code = ">" + "".join(f.code for f in fields)
    if struct.calcsize(code) != end - start:
        raise ValueError(f"header fields not contiguous from {fields[0].name}")
    raw = host.pread(start, end - start).ljust(end - start, b"\0")
    return tuple(int(v) for v in struct.unpack(code, raw))


class Extension(Record):
    """One header extension; ``data`` unpadded."""

    __slots__ = ("type", "data")
    type: int
    data: bytes

    def __init__(self, type: int, data: bytes) -> None:
        self.type = type
        self.data = data

    def pack(self) -> bytes:
        pad = (-len(self.data)) % 8
        return _EXT_HDR.pack(self.type, len(self.data)) + self.data + b"\0" * pad


def _stored_name(data: bytes) -> str:
    """The name a header extension or the backing file name field stores: its bytes up
    to the first NUL, as text.  Every stored name follows the one rule of
    :mod:`diskimg.hostio.names`, imported where a name is read or written (an image
    without a backing file, data file or feature table never loads it: start-up)."""
    from diskimg.hostio.names import name_text

    return name_text(data.split(b"\0", 1)[0])


def pack_feature_table(names: list[tuple[int, int, bytes]] = FEATURE_NAMES) -> bytes:
    """The feature-name table extension's data: 48 bytes an entry (a name of at most 46
    bytes, NUL-padded)."""
    return b"".join(struct.pack(">BB46s", t, b, n) for t, b, n in names)


def _feature_entries(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, bit, name) of each 48-byte entry of a feature-name table, a short last
    entry padded with zeros, up to the first entry whose name is empty (as qemu reads it)."""
    data = data + bytes(-len(data) % 48)
    for i in range(0, len(data), 48):
        t, b, raw = struct.unpack_from(">BB46s", data, i)
        name = raw.split(b"\0", 1)[0]
        if not name:
            return
        yield t, b, name


def parse_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    from diskimg.hostio.names import name_text

    return {(t, b): name_text(name) for t, b, name in _feature_entries(data)}


def unsupported_features_message(unknown: int, table: bytes | None) -> str:
    """qemu's refusal of the unknown incompatible feature bits ``unknown``: those the
    feature-name table ``table`` names, in its order, then the rest as a hex mask."""
    from diskimg.hostio.names import name_text

    parts = []
    for t, bit, name in _feature_entries(table or b""):
        if t == 0 and bit < 64 and unknown >> bit & 1:
            parts.append(name_text(name))  # printed as its bytes, as qemu does
            unknown &= ~(1 << bit)
    if unknown:
        parts.append(f"Unknown incompatible feature: {unknown:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(parts)


def _walk_extensions(buf: bytes, start: int, end: int) -> Iterator[Extension]:
    """The header extensions in ``buf[start:end]`` before the end marker, in file order;
    raises FormatError at one that runs past ``end`` (or the buffer)."""
    off = start
    while off + 8 <= min(end, len(buf)):
        etype, elen = _EXT_HDR.unpack_from(buf, off)
        if etype == QCOW2_EXT_MAGIC_END:
            return
        if off + 8 + elen > end or off + 8 + elen > len(buf):
            raise FormatError(f"Header extension {etype:#x} at {off:#x} too large "
                              f"(length {elen})", offset=off)
        yield Extension(etype, bytes(buf[off + 8 : off + 8 + elen]))
        off += 8 + elen + ((-elen) % 8)


def _last_feature_table(buf: bytes, start: int, end: int) -> bytes | None:
    """The feature-name table qemu names unknown features from: the last one before
    the end marker or the first extension that does not fit."""
    table = None
    try:
        for e in _walk_extensions(buf, start, end):
            if e.type == QCOW2_EXT_MAGIC_FEATURE_TABLE:
                table = e.data
    except FormatError:
        pass
    return table


class Header(Record):
    """The qcow2 header (v2 or v3) plus its extensions and backing file name.

    ``extensions`` keeps every extension except the end marker, in file order, unknown ones
    included, so ``pack()`` preserves them; a known extension given twice is kept once,
    with the last one's data (see ``_add_extension``).  The backing file name is stored after them.
    """

    __slots__ = ("version", "cluster_bits", "size", "l1_size", "l1_table_offset",
                 "refcount_table_offset", "refcount_table_clusters", "crypt_method",
                 "nb_snapshots", "snapshots_offset", "incompatible_features",
                 "compatible_features", "autoclear_features", "refcount_order", "header_length",
                 "compression_type", "backing_file", "backing_file_offset", "extensions")
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    crypt_method: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_file_offset: int  # as read; recomputed by pack()
    extensions: list[Extension]

    def __init__(self, version: int, cluster_bits: int, size: int, l1_size: int,
                 l1_table_offset: int, refcount_table_offset: int, refcount_table_clusters: int,
                 crypt_method: int = 0, nb_snapshots: int = 0, snapshots_offset: int = 0,
                 incompatible_features: int = 0, compatible_features: int = 0,
                 autoclear_features: int = 0, refcount_order: int = 4,
                 header_length: int = V3_HEADER_LENGTH_COMPRESSION, compression_type: int = 0,
                 backing_file: str | None = None, backing_file_offset: int = 0,
                 extensions: list[Extension] | None = None) -> None:
        self.version = version
        self.cluster_bits = cluster_bits
        self.size = size
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.crypt_method = crypt_method
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.backing_file = backing_file
        self.backing_file_offset = backing_file_offset
        self.extensions = [] if extensions is None else extensions

    # --- derived ---------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def ext(self, ext_type: int) -> Extension | None:
        for e in self.extensions:
            if e.type == ext_type:
                return e
        return None

    def set_ext(self, ext_type: int, data: bytes | None) -> None:
        """Replace, add (in qemu's order) or remove (data None) an extension."""
        order = [QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_DATA_FILE,
                 QCOW2_EXT_MAGIC_CRYPTO_HEADER, QCOW2_EXT_MAGIC_FEATURE_TABLE,
                 QCOW2_EXT_MAGIC_BITMAPS]
        exts = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            new = Extension(ext_type, data)
            rank = order.index(ext_type) if ext_type in order else len(order)
            pos = len(exts)
            for i, e in enumerate(exts):
                r = order.index(e.type) if e.type in order else len(order)
                if r > rank:
                    pos = i
                    break
            exts.insert(pos, new)
        self.extensions = exts

    @property
    def backing_format(self) -> str | None:
        e = self.ext(QCOW2_EXT_MAGIC_BACKING_FORMAT)
        return _stored_name(e.data) if e else None

    @property
    def data_file(self) -> str | None:
        e = self.ext(QCOW2_EXT_MAGIC_DATA_FILE)
        return _stored_name(e.data) if e else None

    # --- parse / pack ----------------------------------------------------------------
    @staticmethod
    def cluster_size_of(buf: bytes) -> int:
        """Validate magic, version and cluster_bits of the first bytes; the cluster size."""
        if len(buf) < 8 or struct.unpack_from(">I", buf, 0)[0] != QCOW_MAGIC:
            raise WrongFormatError("Image is not in qcow2 format", offset=0)
        if len(buf) < V2_HEADER_LENGTH:
            raise FormatError("Could not read qcow2 header: file too short (header at 0x0)",
                              offset=0)
        version, cluster_bits = struct.unpack_from(">I", buf, 4)[0], buf[20:24]
        if version not in (2, 3):
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version} (field "
                                          "'version' at 0x4)", offset=4)
        bits = int(struct.unpack(">I", cluster_bits)[0])
        if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
            raise FormatError(f"Unsupported cluster size: 2^{bits} (field 'cluster_bits' at "
                              "0x14)", offset=20)
        return 1 << bits

    @classmethod
    def parse(cls, buf: bytes, file_size: int | None = None) -> Self:
        """Parse the header from the first cluster (or at least the first bytes) of a file.

        Validates every field against QEMU's limits; raises FormatError subclasses that
        name the field and its offset.
        """
        cls.cluster_size_of(buf)
        (_, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf, 0)
        h = cls(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, crypt_method=crypt, nb_snapshots=nb_snap,
                snapshots_offset=snap_off, backing_file_offset=bf_off)
        cs = 1 << cluster_bits
        if version == 2:
            h.header_length = V2_HEADER_LENGTH
            h.refcount_order = 4
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        else:
            if len(buf) < V3_HEADER_LENGTH:
                raise FormatError("Could not read qcow2 header: file too short for a v3 header"
                                  " (header at 0x0)", offset=0)
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
            if h.header_length < V3_HEADER_LENGTH or h.header_length > cs:
                raise FormatError(f"qcow2 header too short or too long: header_length "
                                  f"{h.header_length} (field at 0x64)", offset=100)
            if h.header_length > len(buf):
                raise FormatError("Could not read qcow2 header: header_length past end of "
                                  "file (field at 0x64)", offset=100)
            if h.header_length >= 105:
                h.compression_type = buf[104]
        end = cs if h.backing_file_offset == 0 else min(cs, h.backing_file_offset)
        h._validate(file_size, lambda: _last_feature_table(buf, h.header_length, end))
        for e in _walk_extensions(buf, h.header_length, end):
            h._add_extension(e)
        if bf_off:
            if bf_size > BACKING_FILE_NAME_MAX:
                raise FormatError(f"Backing file name too long ({bf_size} bytes, field "
                                  "'backing_file_size' at 0x10)", offset=16)
            if bf_off + bf_size > cs or bf_off + bf_size > len(buf):
                raise FormatError(f"Invalid backing file offset {bf_off:#x} (field "
                                  "'backing_file_offset' at 0x8)", offset=8)
            name = bytes(buf[bf_off : bf_off + bf_size])
            if b"\0" in name:
                raise FormatError(f"Backing file name at {bf_off:#x} contains a NUL byte",
                                  offset=bf_off)
            h.backing_file = _stored_name(name)
        if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE and h.data_file is None:
            # allowed by qemu only with an explicit data-file option; we require the name
            pass
        return h

    def _add_extension(self, e: Extension) -> None:
        """Append an extension read from the file.  A known extension that appears again
        replaces the earlier one in its place: qemu reads each into one field, so the last
        wins, and writes it once when it rewrites the header.  Unknown ones are all kept."""
        if e.type in _SINGLE_EXTENSIONS:
            for i, old in enumerate(self.extensions):
                if old.type == e.type:
                    self.extensions[i] = e
                    return
        self.extensions.append(e)

    def _validate(self, file_size: int | None,
                  feature_table: Callable[[], bytes | None] = lambda: None) -> None:
        """Check the fields in qemu's order (compression type first; unknown incompatible
        features are named from ``feature_table()``, the feature-name extension)."""
        cs = self.cluster_size
        if self.compression_type not in COMPRESSION_TYPES:
            raise UnsupportedFeatureError(
                f"qcow2: unknown compression type: {self.compression_type}",
                offset=HDR_COMPRESSION_TYPE, field="compression_type")
        if bool(self.compression_type) != bool(
                self.incompatible_features & QCOW2_INCOMPAT_COMPRESSION):
            # bit 3 (compression type) is set exactly when the type is not zlib
            must = "must" if self.compression_type else "must not"
            raise FormatError(f"qcow2: Compression type incompatible feature bit {must} be "
                              "set", offset=HDR_INCOMPATIBLE_FEATURES.offset,
                              field="incompatible_features")
        unknown = self.incompatible_features & ~QCOW2_INCOMPAT_MASK
        if unknown:
            raise UnsupportedFeatureError(
                unsupported_features_message(unknown, feature_table()),
                offset=HDR_INCOMPATIBLE_FEATURES.offset, field="incompatible_features")
        if self.refcount_order > 6:
            raise FormatError(f"Reference count entry width too large; may not exceed 64 bits "
                              f"(refcount_order {self.refcount_order} at 0x60)", offset=96)
        if self.crypt_method not in (0, 1, 2):
            raise UnsupportedFeatureError(
                f"Unsupported encryption method: {self.crypt_method} (field 'crypt_method' "
                "at 0x20)", offset=32)
        if self.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise FormatError(f"Active L1 table too large: {self.l1_size} entries (field "
                              "'l1_size' at 0x24)", offset=36)
        span = cs * (cs // (16 if self.extended_l2 else 8))  # guest bytes per L1 entry
        # qemu's size_to_l1, in its 64-bit arithmetic (a size within one span of 2**64
        # wraps to a small count: qemu then fails on the size, below)
        needed = ((self.size + span - 1) & ((1 << 64) - 1)) // span
        if needed > (1 << 31) - 1:  # qemu's l1_vm_state_index > INT_MAX
            raise FormatError("Image is too big", offset=HDR_SIZE.offset, field="size")
        if self.l1_size < needed:
            raise FormatError("L1 table is too small", offset=HDR_L1_SIZE.offset,
                              field="l1_size")
        if self.size > (1 << 63) - 1:  # qemu: the sector count of the size is refused
            raise FormatError("Could not refresh total sector count: File too large",
                              offset=HDR_SIZE.offset, field="size")
        if self.l1_size and (self.l1_table_offset % cs or
                             self.l1_table_offset > (1 << 63) - 1 - self.l1_size * 8):
            raise FormatError(f"L1 table offset invalid: {self.l1_table_offset:#x} (field "
                              "'l1_table_offset' at 0x28)", offset=40)
        if self.refcount_table_clusters == 0:
            raise FormatError("Image does not contain a reference count table (field "
                              "'refcount_table_clusters' at 0x38)", offset=56)
        if self.refcount_table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
            raise FormatError(f"Reference count table too large: {self.refcount_table_clusters}"
                              " clusters (field 'refcount_table_clusters' at 0x38)", offset=56)
        if self.refcount_table_offset % cs or self.refcount_table_offset == 0:
            raise FormatError(f"Invalid reference count table offset "
                              f"{self.refcount_table_offset:#x} (field at 0x30)", offset=48)
        # the snapshot table fields are checked where the table is read
        # (snapshot.read_table), so that check can open an image whose table is broken
        if file_size is not None:
            rt_end = self.refcount_table_offset + self.refcount_table_clusters * cs
            if rt_end > file_size:
                raise CorruptImageError(
                    f"Reference count table at {self.refcount_table_offset:#x} lies past the "
                    f"end of the file ({file_size} bytes)", offset=self.refcount_table_offset)
            if self.l1_size and self.l1_table_offset + self.l1_size * 8 > file_size:
                raise CorruptImageError(
                    f"L1 table at {self.l1_table_offset:#x} ({self.l1_size} entries) lies past "
                    f"the end of the file ({file_size} bytes)", offset=self.l1_table_offset)

    def pack(self) -> bytes:
        """Header, extensions (v3 adds QEMU's feature table if absent), end marker, backing
        name — exactly as QEMU lays out cluster 0.  Raises if it does not fit one cluster."""
        cs = self.cluster_size
        body = bytearray()
        if self.version >= 3:
            body += _V3.pack(self.incompatible_features, self.compatible_features,
                             self.autoclear_features, self.refcount_order, self.header_length)
            body += bytes(self.header_length - V3_HEADER_LENGTH)  # compression byte below
        hdr_len = V2_HEADER_LENGTH if self.version == 2 else self.header_length
        bf = b""
        if self.backing_file:
            from diskimg.hostio.names import raw_c_name

            bf = raw_c_name(self.backing_file, "Backing file name")
        kept = self.extensions
        exts = b"".join(e.pack() for e in kept) + _EXT_HDR.pack(QCOW2_EXT_MAGIC_END, 0)
        if hdr_len + len(exts) + len(bf) > cs:
            # QEMU leaves out the (optional) feature-name table when it does not fit
            kept = [e for e in kept if e.type != QCOW2_EXT_MAGIC_FEATURE_TABLE]
            exts = b"".join(e.pack() for e in kept) + _EXT_HDR.pack(QCOW2_EXT_MAGIC_END, 0)
        bf_off = hdr_len + len(exts) if bf else 0
        if hdr_len + len(exts) + len(bf) > cs:
            raise FormatError("qcow2 header, extensions and backing file name do not fit in "
                              "the first cluster")
        head = _V2.pack(QCOW_MAGIC, self.version, bf_off, len(bf), self.cluster_bits,
                        self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                        self.refcount_table_offset, self.refcount_table_clusters,
                        self.nb_snapshots, self.snapshots_offset)
        out = bytearray(head) + body
        if self.version >= 3 and self.header_length > V3_HEADER_LENGTH:
            out[104] = self.compression_type
        return bytes(out + exts + bf)

    def copy(self) -> Header:
        return self.replace(extensions=[Extension(e.type, e.data) for e in self.extensions])
