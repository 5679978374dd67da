"""qcow2 persistent dirty bitmaps: the bitmap directory, and keeping bitmaps true.

A program that writes to an image must either keep its "auto" (enabled) bitmaps up to
date or leave them marked inconsistent.  diskimg keeps them: on the first write the
enabled bitmaps are flagged IN_USE on disk (so a crash leaves them visibly
inconsistent, as QEMU does), writes set their bits in memory, and closing the image
merges those bits into the bitmap data and clears IN_USE.  Bitmap data is LSB-first:
bit ``i`` of byte ``j`` covers guest bytes from ``(8 * j + i) << granularity_bits``.
"""

from __future__ import annotations

import builtins
import struct

from diskimg.errors import FormatError, UnsupportedFeatureError, UsageError
from diskimg.hostio.names import name_text, raw_name
from diskimg.qcow2 import bitmap_table as BT
from diskimg.qcow2 import header_io
from diskimg.qcow2.layout import QCOW2_AUTOCLEAR_BITMAPS, QCOW2_EXT_MAGIC_BITMAPS, Header
from diskimg.slotted import FrozenRecord, Record, set_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, Self

    from diskimg.qcow2.metadata import MetadataImage

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_TABLE_OFFSET_MASK = BT.TABLE_OFFSET_MASK
BME_MAX_NAME_SIZE = 1023
# QEMU's limits (qcow2.h), the ones qemu-img applies on open and in check
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")
#: Size of the fixed part of a bitmap directory entry (docs/interop/qcow2.txt).
BITMAP_DIR_ENTRY_SIZE = _ENTRY.size


class BitmapsExt(FrozenRecord):
    """The bitmaps header extension (0x23852875): bitmap count and directory location
    (docs/interop/qcow2.txt, "Bitmaps extension")."""

    __slots__ = ("nb_bitmaps", "reserved", "directory_size", "directory_offset")
    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int

    SIZE = _EXT.size

    def __init__(self, nb_bitmaps: int, reserved: int, directory_size: int,
                 directory_offset: int) -> None:
        set_field(self, "nb_bitmaps", nb_bitmaps)
        set_field(self, "reserved", reserved)
        set_field(self, "directory_size", directory_size)
        set_field(self, "directory_offset", directory_offset)

    @classmethod
    def parse(cls, data: bytes) -> Self | None:
        """The record, or None when ``data`` is too short to hold one."""
        if len(data) < _EXT.size:
            return None
        return cls(*_EXT.unpack_from(data))

    def pack(self) -> bytes:
        return _EXT.pack(self.nb_bitmaps, self.reserved, self.directory_size,
                         self.directory_offset)

    @classmethod
    def of(cls, h: Header) -> Self | None:
        """The extension of ``h`` when the autoclear bit says it is valid, else None."""
        ext = h.ext(QCOW2_EXT_MAGIC_BITMAPS)
        if ext is None or not h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return None
        return cls.parse(ext.data)


class BitmapEntry(Record):
    """One bitmap directory entry (``extra`` kept verbatim)."""

    __slots__ = ("table_offset", "table_size", "flags", "type", "granularity_bits", "name",
                 "extra")
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes

    def __init__(self, table_offset: int, table_size: int, flags: int, type: int,
                 granularity_bits: int, name: str, extra: bytes = b"") -> None:
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.type = type
        self.granularity_bits = granularity_bits
        self.name = name
        self.extra = extra

    @classmethod
    def parse(cls, buf: bytes, pos: int, where: int) -> tuple[Self, int]:
        if pos + _ENTRY.size > len(buf):
            raise FormatError(f"Bitmap directory entry at {where + pos:#x} is truncated",
                              offset=where + pos)
        t_off, t_size, flags, typ, gbits, nlen, xlen = _ENTRY.unpack_from(buf, pos)
        end = pos + _ENTRY.size + xlen + nlen
        if end > len(buf):
            raise FormatError(f"Bitmap directory entry at {where + pos:#x} runs past the "
                              "directory", offset=where + pos)
        extra = bytes(buf[pos + _ENTRY.size : pos + _ENTRY.size + xlen])
        name = name_text(bytes(buf[end - nlen : end]))
        length = end - pos
        return cls(t_off, t_size, flags, typ, gbits, name, extra), length + (-length) % 8

    def pack(self) -> bytes:
        name = raw_name(self.name)
        out = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), len(self.extra)) + self.extra + name
        return out + b"\0" * ((-len(out)) % 8)

    def info(self) -> dict[str, Any]:
        """qemu-img info's entry: flags, name, granularity."""
        flags = []
        if self.flags & BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            flags.append("auto")
        return {"flags": flags, "name": self.name, "granularity": 1 << self.granularity_bits}


def _in_use_error(name: str) -> UsageError:
    return UsageError(f"Bitmap '{name}' is inconsistent and cannot be used\n"
                      "Try block-dirty-bitmap-remove to delete this bitmap from disk")


class Bitmaps:
    """The persistent bitmaps of one open image: their directory, the public operations
    (``qemu-img bitmap``'s actions) and dirty tracking.

    Every operation is one crash-safe change: new tables, data clusters and directory go
    to freshly allocated clusters, one header write switches to them, and only then are
    the old clusters freed, so a crash at any point leaves at most leaked clusters."""

    def __init__(self, img: MetadataImage) -> None:
        self.img = img
        self.entries: list[BitmapEntry] = []
        self.dir_offset = 0
        #: bits set by writes since tracking started, by bitmap name (flagged IN_USE by us)
        self.tracked: dict[str, bytearray] = {}
        self.tracking = False
        #: True while a resize rewrites the bitmaps: its own zeroing marks nothing (as
        #: in qemu, where the driver zeroes below the dirty bitmaps)
        self.suspended = False
        h = img.header
        ext = h.ext(QCOW2_EXT_MAGIC_BITMAPS)
        if ext is None or not h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return
        bx = BitmapsExt.parse(ext.data)
        if bx is None:
            raise FormatError("Bitmaps header extension is too short", offset=0)
        nb, dsize, doff = bx.nb_bitmaps, bx.directory_size, bx.directory_offset
        if nb > QCOW2_MAX_BITMAPS or dsize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise FormatError(f"Too many bitmaps ({nb}) or bitmap directory too large "
                              f"({dsize} bytes)")
        if doff % img.cs:
            raise FormatError(f"Bitmap directory offset {doff:#x} is not cluster aligned",
                              offset=doff)
        buf = img.host.pread_exact(doff, dsize, "bitmap directory")
        pos = 0
        for _ in range(nb):
            e, n = BitmapEntry.parse(buf, pos, doff)
            self.entries.append(e)
            pos += n
        self.dir_offset = doff

    # --- queries ----------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        return [e.info() for e in self.entries]

    def list(self) -> list[BitmapEntry]:
        """The bitmaps in directory order (``flags``, ``name``, ``granularity_bits``;
        :meth:`BitmapEntry.info` gives qemu-img info's form)."""
        self.img.check_open()
        return [e.replace() for e in self.entries]

    def _find(self, name: str) -> BitmapEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise UsageError(f"Dirty bitmap '{name}' not found")

    def _usable(self, name: str) -> BitmapEntry:
        e = self._find(name)
        if e.flags & BME_FLAG_IN_USE and name not in self.tracked:
            raise _in_use_error(name)
        return e

    def bits(self, name: str) -> tuple[bytearray, int]:
        """Bitmap ``name`` as a bit array (writes of this session included) and its
        granularity bits."""
        self.img.check_open()
        e = self._usable(name)
        bits = BT.load(self.img, e)
        if name in self.tracked:
            BT.merge_into(bits, e.granularity_bits, self.tracked[name], e.granularity_bits,
                          self.img.size)
        return bits, e.granularity_bits

    def dirty_extents(self, name: str) -> Iterator[tuple[int, int]]:
        """The dirty guest ranges (offset, length) of bitmap ``name``, merged, in order,
        clipped to the disk size."""
        bits, gbits = self.bits(name)
        return BT.extents(bits, gbits, self.img.size)

    # --- operations (qemu-img bitmap's actions) --------------------------------------
    def _begin(self) -> None:
        """Every refusal is behind: persist this session's tracked bits first, so the
        directory below is the one on disk."""
        self.img.begin_change()
        if self.tracked:
            self.store()

    def add(self, name: str, granularity: int | None = None, *,
            disabled: bool = False) -> None:
        """Add an empty bitmap (qemu's default granularity: the cluster size, within
        4 KiB..64 KiB); enabled bitmaps track every later write."""
        img = self.img
        img.check_writable()
        gran = granularity or min(65536, max(4096, img.cs))
        if not name:
            raise UsageError("Bitmap name cannot be empty")
        if gran < 512 or gran & (gran - 1) or gran > 1 << BT.MAX_GRANULARITY_BITS:
            raise UsageError("Granularity must be power of 2 and at least 512")
        size = len(raw_name(name, "Bitmap name"))
        if any(e.name == name for e in self.entries):
            raise UsageError(f"Bitmap already exists: {name}")
        where = f"Can't make bitmap '{name}' persistent in '{img.host.path}': "
        if img.header.version < 3:
            raise UnsupportedFeatureError(where + "Cannot store dirty bitmaps in qcow2 v2 "
                                          "files")
        if size > BME_MAX_NAME_SIZE:
            raise UsageError(where + f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} "
                             "characters)")
        if not img.size:  # qemu-img "adds" it, warns, and stores nothing
            raise UnsupportedFeatureError(where + "the disk is empty (size 0)")
        if len(self.entries) >= QCOW2_MAX_BITMAPS:
            raise UsageError(where + "Maximum number of persistent bitmaps is already "
                             "reached")
        gbits = gran.bit_length() - 1
        new = BitmapEntry(0, BT.table_size(img.size, gbits, img.cs),
                          0 if disabled else BME_FLAG_AUTO, 1, gbits, name)
        if (sum(len(e.pack()) for e in self.entries) + len(new.pack())
                > QCOW2_MAX_BITMAP_DIRECTORY_SIZE):
            raise UsageError(where + "Not enough space in the bitmap directory")
        self._fits_header()
        self._begin()
        new.table_offset, new.table_size = BT.store(img, BT.empty(img.size, gbits))
        self._commit([*self.entries, new], [])

    def remove(self, name: str) -> None:
        """Delete bitmap ``name`` and free its clusters (an inconsistent one too)."""
        self.img.check_writable()
        BT.read_table(self.img, self._find(name))  # a broken table is refused before
        self._begin()
        e = self._find(name)
        self._commit([x for x in self.entries if x is not e], BT.host_ranges(self.img, e))

    def clear(self, name: str) -> None:
        """Reset every bit of bitmap ``name``."""
        self.img.check_writable()
        self._usable(name)
        self._begin()
        e = self._find(name)
        self._replace(e, BT.empty(self.img.size, e.granularity_bits), e.flags)

    def enable(self, name: str) -> None:
        """Make bitmap ``name`` track writes (the ``auto`` flag)."""
        self._set_flags(name, BME_FLAG_AUTO, 0)

    def disable(self, name: str) -> None:
        """Stop bitmap ``name`` tracking writes."""
        self._set_flags(name, 0, BME_FLAG_AUTO)

    def merge(self, name: str, source_name: str, source_image: Any = None) -> None:
        """Set in bitmap ``name`` every bit dirty in bitmap ``source_name`` of this image
        or of ``source_image`` (an open qcow2 image of the same size)."""
        img = self.img
        img.check_writable()
        dst = self._usable(name)
        src_bitmaps = self if source_image is None else source_image.bitmaps
        if src_bitmaps is None:  # a format without bitmaps has NoBitmaps (not found)
            raise UsageError(f"Dirty bitmap '{source_name}' not found")
        src_size = source_image.size if source_image is not None else img.size
        src_bits, src_gbits = src_bitmaps.bits(source_name)
        if src_size != img.size:
            raise UsageError(f"Bitmaps are of different sizes (destination size is "
                             f"{img.size}, source size is {src_size}) and can't be merged")
        self._begin()
        dst = self._find(name)
        bits = BT.load(img, dst)
        BT.merge_into(bits, dst.granularity_bits, src_bits, src_gbits, img.size)
        self._replace(dst, bits, dst.flags)

    def _set_flags(self, name: str, on: int, off: int) -> None:
        self.img.check_writable()
        e = self._usable(name)
        if (e.flags | on) & ~off == e.flags:
            return
        self._begin()
        e = self._find(name)
        changed = e.replace(flags=(e.flags | on) & ~off)
        self._commit([changed if x is e else x for x in self.entries], [])

    def _replace(self, e: BitmapEntry, bits: bytearray, flags: int) -> None:
        """Store ``bits`` as bitmap ``e``'s new table and data, then switch to them."""
        old = BT.host_ranges(self.img, e)
        off, size = BT.store(self.img, bits)
        new = e.replace(table_offset=off, table_size=size, flags=flags)
        self._commit([new if x is e else x for x in self.entries], old)

    def _fits_header(self) -> None:
        h = self.img.header
        if h.ext(QCOW2_EXT_MAGIC_BITMAPS) is None:
            probe = h.replace(extensions=list(h.extensions))
            probe.set_ext(QCOW2_EXT_MAGIC_BITMAPS, bytes(BitmapsExt.SIZE))
            probe.pack()  # raises when the header would no longer fit its cluster

    def _commit(self, entries: builtins.list[BitmapEntry],
                freed: builtins.list[tuple[int, int]], *, flush: bool = True,
                size: int | None = None) -> None:
        """Write ``entries`` as a new directory, switch the header to it with one write,
        then free the old directory and ``freed`` (host ranges nothing points at now) in
        the image's next flush (now, with ``flush``).  ``size``: the same header write
        sets the new virtual disk size (a resize), so the directory on disk always fits
        the size on disk."""
        img = self.img
        h = img.header
        cs = img.cs
        old = [] if not self.entries else [(self.dir_offset, max(1, self._dir_size()))]
        data = b"".join(e.pack() for e in entries)
        if entries:
            off = img.refcounts.alloc(-(-len(data) // cs))
            img.flush_refcounts()
            img.host.pwrite(off, data)
            img.host.flush()
            h.set_ext(QCOW2_EXT_MAGIC_BITMAPS, BitmapsExt(len(entries), 0, len(data),
                                                          off).pack())
            h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS
        else:
            off = 0
            h.set_ext(QCOW2_EXT_MAGIC_BITMAPS, None)
            h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS
        if size is not None:
            h.size = size
        header_io.write_header(img.host, h)
        self.entries, self.dir_offset = entries, off
        self.tracking = False  # the next write flags the (new) enabled bitmaps IN_USE
        if old or freed:
            _ = img.refcounts  # loaded: the flush applies pending frees only then
        for host, length in old + freed:
            img.free_after_flush(host, length)
        if flush:
            img.flush()

    def _dir_size(self) -> int:
        return sum(len(e.pack()) for e in self.entries)

    # --- dirty tracking ---------------------------------------------------------------
    def _write_directory(self) -> None:
        self.img.host.pwrite(self.dir_offset, b"".join(e.pack() for e in self.entries))

    def mark(self, offset: int, length: int) -> None:
        """Record that guest bytes [offset, offset+length) changed."""
        if not self.entries or length <= 0 or self.suspended:
            return
        if not self.tracking:
            self._start()
        for name, bits in self.tracked.items():
            BT.set_range(bits, self._find(name).granularity_bits, offset, length)

    def _start(self) -> None:
        """Flag enabled, consistent bitmaps IN_USE on disk before the first change."""
        flagged = False
        for e in self.entries:
            if e.flags & BME_FLAG_AUTO and not e.flags & BME_FLAG_IN_USE:
                # qemu refuses such an image on open: never size a bit array from it
                BT.check_entry(e, self.img.size, self.img.cs)
        self.tracking = True
        for e in self.entries:
            if e.flags & BME_FLAG_AUTO and not e.flags & BME_FLAG_IN_USE and e.type == 1:
                self.tracked[e.name] = BT.empty(self.img.size, e.granularity_bits)
                e.flags |= BME_FLAG_IN_USE
                flagged = True
        if flagged:
            self._write_directory()
            self.img.host.flush()

    def store(self) -> None:
        """Merge the tracked bits into the bitmaps' data and clear IN_USE (on close, and
        before any operation).  The replaced clusters are freed by the next flush."""
        if not self.tracked:
            return
        img = self.img
        entries = list(self.entries)
        freed: builtins.list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            bits = self.tracked.get(e.name)
            if bits is None:
                continue
            have = BT.load(img, e)
            BT.merge_into(have, e.granularity_bits, bits, e.granularity_bits, img.size)
            freed += BT.host_ranges(img, e)
            off, size = BT.store(img, have)
            entries[i] = e.replace(table_offset=off, table_size=size,
                                   flags=e.flags & ~BME_FLAG_IN_USE)
        self.tracked.clear()
        self._commit(entries, freed, flush=False)

    # --- resize -------------------------------------------------------------------------
    def check_resize(self) -> None:
        """Refuse a resize qemu refuses (an inconsistent bitmap) or whose bitmaps cannot
        be read; changes nothing."""
        for e in self.entries:
            self._usable(e.name)
            BT.read_table(self.img, e)

    def prepare_resize(self, new_size: int) -> Resized:
        """Every bitmap at ``new_size`` (bits past the old end clear, bits past the new
        end dropped), stored in new clusters; nothing on disk points at them until
        :meth:`finish_resize`.  Call after :meth:`check_resize` and ``begin_change``,
        while the image still has its old size."""
        entries, freed = [], []
        for e in self.entries:
            bits, gbits = self.bits(e.name)
            nbits = BT.nb_bits(new_size, gbits)
            new = BT.empty(new_size, gbits)
            keep = bits[: len(new)]
            new[: len(keep)] = keep
            if nbits % 8 and len(new):
                new[-1] &= (1 << (nbits % 8)) - 1
            freed += BT.host_ranges(self.img, e)
            off, size = BT.store(self.img, new)
            entries.append(e.replace(table_offset=off, table_size=size,
                                     flags=e.flags & ~BME_FLAG_IN_USE))
        self.tracked.clear()
        self.suspended = True
        return Resized(entries, freed)

    def finish_resize(self, resized: Resized, new_size: int) -> None:
        """One header write: the new size and the resized bitmaps' directory; then the
        old bitmap clusters are freed."""
        self.suspended = False
        self._commit(resized.entries, resized.freed, size=new_size)


class Resized(Record):
    """Bitmaps stored for a new disk size (:meth:`Bitmaps.prepare_resize`)."""

    __slots__ = ("entries", "freed")
    entries: list[BitmapEntry]
    freed: list[tuple[int, int]]

    def __init__(self, entries: list[BitmapEntry], freed: list[tuple[int, int]]) -> None:
        self.entries = entries
        self.freed = freed
