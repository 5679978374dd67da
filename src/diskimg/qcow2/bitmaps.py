"""qcow2 persistent dirty bitmaps: the bitmap directory, and keeping bitmaps true.

A program that writes to an image must either keep its "auto" (enabled) bitmaps up to
date or leave them marked inconsistent.  diskimg keeps them: on the first write the
enabled bitmaps are flagged IN_USE on disk (so a crash leaves them visibly
inconsistent, as QEMU does), writes set their bits in memory, and closing the image
merges those bits into the bitmap data and clears IN_USE.  Bitmap data is LSB-first:
bit ``i`` of byte ``j`` covers guest bytes from ``(8 * j + i) << granularity_bits``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from diskimg.errors import FormatError
from diskimg.qcow2.layout import QCOW2_AUTOCLEAR_BITMAPS, QCOW2_EXT_MAGIC_BITMAPS, Header

if TYPE_CHECKING:
    from diskimg.qcow2.metadata import MetadataImage

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# QEMU's limits (qcow2.h), the ones qemu-img applies on open and in check
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")
#: Size of the fixed part of a bitmap directory entry (docs/interop/qcow2.txt).
BITMAP_DIR_ENTRY_SIZE = _ENTRY.size


@dataclass(frozen=True, slots=True)
class BitmapsExt:
    """The bitmaps header extension (0x23852875): bitmap count and directory location
    (docs/interop/qcow2.txt, "Bitmaps extension")."""

    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int

    SIZE = _EXT.size

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


@dataclass(slots=True)
class BitmapEntry:
    """One bitmap directory entry (``extra`` kept verbatim)."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes = b""

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
        name = bytes(buf[end - nlen : end]).decode("utf-8", "replace")
        length = end - pos
        return cls(t_off, t_size, flags, typ, gbits, name, extra), length + (-length) % 8

    def pack(self) -> bytes:
        name = self.name.encode()
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


class Bitmaps:
    """The persistent bitmaps of one open image, and their dirty tracking."""

    def __init__(self, img: MetadataImage) -> None:
        self.img = img
        self.entries: list[BitmapEntry] = []
        self.dir_offset = 0
        self.tracked: dict[int, bytearray] = {}
        self.tracking = False
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

    def info(self) -> list[dict[str, Any]]:
        return [e.info() for e in self.entries]

    def _write_directory(self) -> None:
        self.img.host.pwrite(self.dir_offset, b"".join(e.pack() for e in self.entries))

    def mark(self, offset: int, length: int) -> None:
        """Record that guest bytes [offset, offset+length) changed."""
        if not self.entries or length <= 0:
            return
        if not self.tracking:
            self._start()
        for i, bits in self.tracked.items():
            g = self.entries[i].granularity_bits
            first, last = offset >> g, (offset + length - 1) >> g
            for b in range(first, last + 1):
                bits[b >> 3] |= 1 << (b & 7)

    def _start(self) -> None:
        """Flag enabled, consistent bitmaps IN_USE on disk before the first change."""
        self.tracking = True
        size = self.img.size
        for i, e in enumerate(self.entries):
            if e.flags & BME_FLAG_AUTO and not e.flags & BME_FLAG_IN_USE and e.type == 1:
                nbits = -(-size >> e.granularity_bits) if size else 0
                self.tracked[i] = bytearray(-(-nbits // 8) or 1)
                e.flags |= BME_FLAG_IN_USE
        if self.tracked:
            self._write_directory()
            self.img.host.flush()

    def store(self) -> None:
        """Merge the tracked bits into the bitmaps' data and clear IN_USE (on close)."""
        if not self.tracked:
            return
        img = self.img
        cs = img.cs
        for i, bits in self.tracked.items():
            e = self.entries[i]
            if e.table_size * 8 > 64 << 20 or e.table_offset % cs:
                raise FormatError(f"Bitmap '{e.name}' has an invalid table", offset=e.table_offset)
            raw = img.host.pread_exact(e.table_offset, e.table_size * 8, "bitmap table")
            table = list(struct.unpack(f">{e.table_size}Q", raw))
            for j in range(e.table_size):
                chunk = bits[j * cs : (j + 1) * cs]
                if not any(chunk):
                    continue
                ent = table[j]
                off = ent & BME_TABLE_OFFSET_MASK
                if off:
                    data = bytearray(img.host.pread_exact(off, cs, "bitmap data"))
                elif ent & 1:
                    continue  # all ones already
                else:
                    data = bytearray(cs)
                for k, b in enumerate(chunk):
                    data[k] |= b
                old = off
                if not off or img.refcounts.get(off // cs) != 1:
                    off = img.refcounts.alloc(1)  # never write over a shared cluster
                    img.flush_refcounts()
                img.host.pwrite(off, data)
                table[j] = off
                if old and old != off:
                    img.free_after_flush(old, cs)
            img.host.flush()
            img.host.pwrite(e.table_offset, struct.pack(f">{e.table_size}Q", *table))
            e.flags &= ~BME_FLAG_IN_USE
        img.host.flush()
        self._write_directory()
        img.host.flush()
        self.tracked.clear()
