"""qcow2 snapshot table records: the codec of the table (docs/interop/qcow2.txt,
"Snapshot table").  :class:`EntryHeader` is the fixed 40-byte part of an entry,
:class:`Snapshot` a whole entry; :func:`parse_table` / :func:`pack_table` the table.
:class:`TableWalk` is QEMU's walk over the entries (where each lies, its 1024-byte cap
on extra data, the 64 MiB cap on the table), shared by the open path and the checker.
The operations on snapshots live in :mod:`diskimg.qcow2.snapshot`."""

from __future__ import annotations

import struct

from diskimg.errors import FormatError
from diskimg.hostio.names import name_text, raw_name
from diskimg.qcow2.layout import (
    HDR_NB_SNAPSHOTS,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_SNAPSHOTS,
    require_table_pointer,
)
from diskimg.qcow2.layout import check_table_pointer as check_table_pointer  # (the checker's)
from diskimg.slotted import FrozenRecord, Record, set_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Self

    from diskimg.hostio.host import Host
    from diskimg.qcow2.metadata import MetadataImage

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
_INT_MAX = (1 << 31) - 1
#: how qemu-img's hints name the program (the hints are part of the messages)
def repair_hint() -> str:
    """The repair command qemu's messages name, with the running program's name."""
    from diskimg import progname

    return f"{progname.name()} check -r all"


class EntryHeader(FrozenRecord):
    """The fixed 40 bytes that start every snapshot table entry (docs/interop/qcow2.txt,
    "Snapshot table entry", bytes 0-39); the variable part (extra data, id, name) follows.
    The one parse of those bytes: :meth:`Snapshot.parse` and the checker use it."""

    __slots__ = ("l1_table_offset", "l1_size", "id_len", "name_len", "date_sec", "date_nsec",
                 "vm_clock_nsec", "vm_state_size32", "extra_data_size")
    l1_table_offset: int
    l1_size: int
    id_len: int
    name_len: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size32: int
    extra_data_size: int

    SIZE = _ENTRY.size

    def __init__(self, l1_table_offset: int, l1_size: int, id_len: int, name_len: int,
                 date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size32: int,
                 extra_data_size: int) -> None:
        set_field(self, "l1_table_offset", l1_table_offset)
        set_field(self, "l1_size", l1_size)
        set_field(self, "id_len", id_len)
        set_field(self, "name_len", name_len)
        set_field(self, "date_sec", date_sec)
        set_field(self, "date_nsec", date_nsec)
        set_field(self, "vm_clock_nsec", vm_clock_nsec)
        set_field(self, "vm_state_size32", vm_state_size32)
        set_field(self, "extra_data_size", extra_data_size)

    @classmethod
    def parse(cls, raw: bytes) -> Self:
        """``raw``: exactly :attr:`SIZE` bytes."""
        return cls(*_ENTRY.unpack(raw))

    def pack(self) -> bytes:
        return _ENTRY.pack(self.l1_table_offset, self.l1_size, self.id_len, self.name_len,
                           self.date_sec, self.date_nsec, self.vm_clock_nsec,
                           self.vm_state_size32, self.extra_data_size)

    def var_size(self) -> int:
        """Bytes of extra data, id and name after the fixed part (no padding)."""
        return self.extra_data_size + self.id_len + self.name_len


class EntryPlace(Record):
    """Where one entry lies, in bytes from the start of the table: its fixed part at
    ``start`` (8-byte aligned), then extra data, id and name up to ``end``.  ``extra_len``
    is the extra data that counts: ``extra_data_size``, cut to 1024 bytes by a repair."""

    __slots__ = ("index", "start", "header", "extra_len", "end")
    index: int
    start: int
    header: EntryHeader
    extra_len: int
    end: int

    def __init__(self, index: int, start: int, header: EntryHeader, extra_len: int,
                 end: int) -> None:
        self.index = index
        self.start = start
        self.header = header
        self.extra_len = extra_len
        self.end = end

    @property
    def cut(self) -> bool:
        """True when the extra data is longer than QEMU keeps (a repair cuts it)."""
        return self.extra_len < self.header.extra_data_size


def place_entry(eh: EntryHeader, index: int, start: int, table_offset: int,
                repair: bool = False) -> EntryPlace:
    """Place entry ``index`` whose fixed part ``eh`` is at ``start``.  More than 1024
    bytes of extra data are refused in qemu's words, or with ``repair`` cut to 1024."""
    extra = eh.extra_data_size
    if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
        if not repair:
            raise FormatError(f"Too much extra metadata in snapshot table entry {index}\n"
                              f"You can force-remove this extra metadata with {repair_hint()}",
                              offset=table_offset + start + 36, field="extra_data_size")
        extra = QCOW_MAX_SNAPSHOT_EXTRA_DATA
    return EntryPlace(index, start, eh, extra, start + EntryHeader.SIZE + eh.var_size())


class TableWalk:
    """QEMU's walk over the ``count`` entries of a snapshot table (``read_fixed(pos)``:
    the 40 bytes at ``pos`` from the start of the table, zeros past the end of the file).

    The table may hold 64 MiB (each entry counted from its 8-byte aligned start with its
    extra data as kept) and no entry may end past 2 GiB.  Without ``repair`` a table over
    either limit, or an entry with more than 1024 bytes of extra data, is refused in
    qemu's words; with it, the extra data is cut (``cut``: those entries, a dropped one
    included) and the entries from the one over the limit on are dropped (``discarded``).
    ``places`` are the entries kept and ``size`` the bytes they span (to the end of the
    last name)."""

    def __init__(self, read_fixed: Callable[[int], bytes], count: int, table_offset: int,
                 repair: bool = False) -> None:
        self.places: list[EntryPlace] = []
        self.cut: list[EntryPlace] = []  # entries whose extra data is cut, in order
        self.discarded = 0
        pos = length = 0
        for i in range(count):
            start = (pos + 7) & ~7
            p = place_entry(EntryHeader.parse(read_fixed(start)), i, start, table_offset,
                            repair)
            if p.cut:
                self.cut.append(p)
            length = ((length + 7) & ~7) + EntryHeader.SIZE + p.extra_len + \
                p.header.id_len + p.header.name_len
            if length > QCOW_MAX_SNAPSHOTS_SIZE or p.end > _INT_MAX:
                if not repair:
                    raise FormatError(
                        f"Snapshot table is too big\nYou can force-remove all {count - i} "
                        f"overhanging snapshots with {repair_hint()}",
                        offset=HDR_NB_SNAPSHOTS.offset, field="nb_snapshots")
                self.discarded = count - i
                break
            self.places.append(p)
            pos = p.end
        self.size = pos


class Snapshot(Record):
    """One snapshot table entry.  ``extra`` keeps extra-data bytes beyond the 24 QEMU
    defines, unchanged, so foreign tools' data survives a rewrite."""

    __slots__ = ("id", "name", "l1_table_offset", "l1_size", "date_sec", "date_nsec",
                 "vm_clock_nsec", "vm_state_size", "disk_size", "icount", "extra_data_size",
                 "extra")
    _repr_hidden = ("extra",)
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra_data_size: int
    extra: bytes

    def __init__(self, id: str, name: str, l1_table_offset: int, l1_size: int, date_sec: int = 0,
                 date_nsec: int = 0, vm_clock_nsec: int = 0, vm_state_size: int = 0,
                 disk_size: int | None = None, icount: int | None = None, extra_data_size: int = 24,
                 extra: bytes = b"") -> None:
        self.id = id
        self.name = name
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount
        self.extra_data_size = extra_data_size
        self.extra = extra

    @classmethod
    def parse(cls, buf: bytes, offset: int, table_offset: int,
              limit: int | None = None, cut_extra: bool = False,
              index: int = 0) -> tuple[Self, int]:
        """Parse the entry at ``offset`` of the table bytes; returns it and its length.

        ``limit`` is the table's maximum length: bytes between ``len(buf)`` (the end of the
        file) and ``limit`` read as zeros, as QEMU reads past the end of an image file, so
        a table cut short by truncation still opens (``check`` reports it incomplete).
        Id and name are C strings: they end at the first NUL byte, as QEMU shows them.
        ``cut_extra`` keeps the first 1024 bytes of oversized extra data (``check -r all``)
        instead of refusing the entry (``index``: its place in the table, for the error)."""
        where = table_offset + offset
        limit = len(buf) if limit is None else limit
        if offset + EntryHeader.SIZE > limit:
            raise FormatError(f"Snapshot table entry at {where:#x} is truncated", offset=where)
        eh = EntryHeader.parse(_zero_padded(buf, offset, EntryHeader.SIZE))
        return cls.decode(buf, place_entry(eh, index, offset, table_offset, cut_extra),
                          table_offset, limit)

    @classmethod
    def decode(cls, buf: bytes, place: EntryPlace, table_offset: int,
               limit: int | None = None) -> tuple[Self, int]:
        """The entry at ``place`` in the table bytes ``buf``: it and its length (as
        :meth:`parse`)."""
        offset, eh = place.start, place.header
        where = table_offset + offset
        limit = len(buf) if limit is None else limit
        l1_off, l1_size, id_len = eh.l1_table_offset, eh.l1_size, eh.id_len
        extra_len = eh.extra_data_size
        pos = offset + EntryHeader.SIZE
        end = pos + eh.var_size()
        if end > limit:
            raise FormatError(f"Snapshot table entry at {where:#x} runs past the end of the "
                              "table", offset=where)
        var = _zero_padded(buf, pos, end - pos)  # extra data, id, name
        extra = var[: place.extra_len]
        vm_state = eh.vm_state_size32
        disk_size = icount = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            ic = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if ic == (1 << 64) - 1 else ic
        sid = c_string(var[extra_len : extra_len + id_len])
        name = c_string(var[extra_len + id_len :])
        if l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise FormatError(f"Snapshot L1 table too large ({l1_size} entries) in entry at "
                              f"{where:#x}", offset=where)
        length = end - offset
        length += (-length) % 8
        return cls(sid, name, l1_off, l1_size, eh.date_sec, eh.date_nsec, eh.vm_clock_nsec,
                   vm_state, disk_size, icount, len(extra), bytes(extra[24:])), length

    def pack(self) -> bytes:
        """The on-disk snapshot table entry: fixed header, ``extra_data_size`` bytes of
        extra data (VM state size, disk size, icount, then any unknown bytes kept from
        parsing), id, name, zero-padded to a multiple of 8 bytes."""
        sid, name = raw_name(self.id), raw_name(self.name)
        extra = struct.pack(">QQQ", self.vm_state_size,
                            self.disk_size if self.disk_size is not None else 0,
                            (1 << 64) - 1 if self.icount is None else self.icount)
        extra = (extra + self.extra)[: max(self.extra_data_size, 24)] \
            if self.extra_data_size >= 24 else extra[: self.extra_data_size]
        vm32 = self.vm_state_size if self.vm_state_size < (1 << 32) else 0
        out = EntryHeader(self.l1_table_offset, self.l1_size, len(sid), len(name),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                          len(extra)).pack() + extra + sid + name
        return out + b"\0" * ((-len(out)) % 8)

    def to_json(self) -> dict[str, Any]:
        """qemu-img info's keys for one snapshot."""
        d: dict[str, Any] = {}
        if self.icount is not None:
            d["icount"] = self.icount
        d.update({
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        })
        return d


def _zero_padded(buf: bytes, pos: int, n: int) -> bytes:
    """``n`` bytes of ``buf`` from ``pos``, zeros where ``buf`` ends first."""
    part = bytes(buf[pos : pos + n])
    return part + bytes(n - len(part))


def c_bytes(raw: bytes) -> bytes:
    """A C string field (id or name): its bytes up to the first NUL, as QEMU shows it."""
    return raw.split(b"\0", 1)[0]


def c_string(raw: bytes) -> str:
    """A C string field (id or name) as text: its bytes up to the first NUL
    (:func:`c_bytes`) by :func:`~diskimg.hostio.names.name_text`."""
    return name_text(c_bytes(raw))


def parse_table(buf: bytes, count: int, table_offset: int,
                limit: int | None = None, cut_extra: bool = False) -> list[Snapshot]:
    """The ``count`` entries of a snapshot table; ``limit`` and ``cut_extra`` as in
    :meth:`Snapshot.parse`."""
    if count > QCOW_MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large", offset=HDR_NB_SNAPSHOTS.offset,
                          field="nb_snapshots")
    walk = TableWalk(lambda pos: _zero_padded(buf, pos, EntryHeader.SIZE), count,
                     table_offset, cut_extra)
    return [Snapshot.decode(buf, p, table_offset, limit)[0] for p in walk.places]


def pack_table(snaps: list[Snapshot]) -> bytes:
    return b"".join(s.pack() for s in snaps)


def read_table(img: MetadataImage) -> list[Snapshot]:
    """Read the snapshot table named by the header, bounded by QEMU's limits.  The part
    of the table past the end of the file reads as zeros, as in QEMU."""
    h = img.header
    require_table_pointer(h, img.cs)
    if not h.nb_snapshots:
        return []
    # the largest table the count allows (entry: 40 + 1024 + 2 * 65535 + padding bytes),
    # capped at QEMU's 64 MiB; only the part inside the file is read
    limit = min(QCOW_MAX_SNAPSHOTS_SIZE, h.nb_snapshots * (40 + 1024 + 2 * 65535 + 8))
    return read_entries(img.host, h.snapshots_offset, h.nb_snapshots, limit)


def read_entries(host: Host, offset: int, count: int, limit: int,
                 cut_extra: bool = False) -> list[Snapshot]:
    """The ``count`` entries of the table at ``offset``, at most ``limit`` bytes long:
    only the part inside the file is read, the rest reads as zeros."""
    buf = host.pread(offset, min(limit, max(0, host.size() - offset)))
    return parse_table(buf, count, offset, limit, cut_extra)


def pack_table_exact(snaps: list[Snapshot]) -> bytes:
    """:func:`pack_table` without the last entry's padding: the bytes QEMU writes (every
    entry starts 8-byte aligned, the table ends with the last name)."""
    data = pack_table(snaps)
    last = snaps[-1]
    used = 40 + last.extra_data_size + len(raw_name(last.id)) + len(raw_name(last.name))
    return data[: len(data) - (-used) % 8]
