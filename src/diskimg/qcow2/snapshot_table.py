"""qcow2 snapshot table records: the codec of the table (docs/interop/qcow2.txt,
"Snapshot table").  :class:`EntryHeader` is the fixed 40-byte part of an entry,
:class:`Snapshot` a whole entry; :func:`parse_table` / :func:`pack_table` the table.
The operations on snapshots live in :mod:`diskimg.qcow2.snapshot`."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from diskimg.errors import FormatError
from diskimg.qcow2.layout import QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS

if TYPE_CHECKING:
    from diskimg.hostio.host import Host
    from diskimg.qcow2.metadata import MetadataImage

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024


@dataclass(frozen=True, slots=True)
class EntryHeader:
    """The fixed 40 bytes that start every snapshot table entry (docs/interop/qcow2.txt,
    "Snapshot table entry", bytes 0-39); the variable part (extra data, id, name) follows.
    The one parse of those bytes: :meth:`Snapshot.parse` and the checker use it."""

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


@dataclass(slots=True)
class Snapshot:
    """One snapshot table entry.  ``extra`` keeps extra-data bytes beyond the 24 QEMU
    defines, unchanged, so foreign tools' data survives a rewrite."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra_data_size: int = 24
    extra: bytes = field(default=b"", repr=False)

    @classmethod
    def parse(cls, buf: bytes, offset: int, table_offset: int,
              limit: int | None = None, cut_extra: bool = False) -> tuple[Self, int]:
        """Parse the entry at ``offset`` of the table bytes; returns it and its length.

        ``limit`` is the table's maximum length: bytes between ``len(buf)`` (the end of the
        file) and ``limit`` read as zeros, as QEMU reads past the end of an image file, so
        a table cut short by truncation still opens (``check`` reports it incomplete).
        Id and name are C strings: they end at the first NUL byte, as QEMU shows them.
        ``cut_extra`` keeps the first 1024 bytes of oversized extra data (``check -r all``)
        instead of refusing the entry."""
        where = table_offset + offset
        limit = len(buf) if limit is None else limit
        if offset + EntryHeader.SIZE > limit:
            raise FormatError(f"Snapshot table entry at {where:#x} is truncated", offset=where)
        eh = EntryHeader.parse(_zero_padded(buf, offset, EntryHeader.SIZE))
        l1_off, l1_size, id_len = eh.l1_table_offset, eh.l1_size, eh.id_len
        extra_len = eh.extra_data_size
        if extra_len > QCOW_MAX_SNAPSHOT_EXTRA_DATA and not cut_extra:
            raise FormatError(f"Too much extra metadata in snapshot table entry at {where:#x} "
                              f"({extra_len} bytes)", offset=where)
        pos = offset + EntryHeader.SIZE
        end = pos + eh.var_size()
        if end > limit:
            raise FormatError(f"Snapshot table entry at {where:#x} runs past the end of the "
                              "table", offset=where)
        var = _zero_padded(buf, pos, end - pos)  # extra data, id, name
        extra = var[: min(extra_len, QCOW_MAX_SNAPSHOT_EXTRA_DATA)]
        vm_state = eh.vm_state_size32
        disk_size = icount = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            ic = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if ic == (1 << 64) - 1 else ic
        sid = _c_string(var[extra_len : extra_len + id_len])
        name = _c_string(var[extra_len + id_len :])
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


def _c_string(raw: bytes) -> str:
    """A C string field as text; bytes that are not UTF-8 survive as lone surrogates
    (``surrogateescape``), so the name is rewritten byte for byte (:func:`raw_name`)."""
    return c_bytes(raw).decode("utf-8", "surrogateescape")


def raw_name(text: str) -> bytes:
    """The on-disk bytes of a snapshot id or name (the inverse of reading it)."""
    return text.encode("utf-8", "surrogateescape")


def parse_table(buf: bytes, count: int, table_offset: int,
                limit: int | None = None, cut_extra: bool = False) -> list[Snapshot]:
    """The ``count`` entries of a snapshot table; ``limit`` and ``cut_extra`` as in
    :meth:`Snapshot.parse`."""
    if count > QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots: {count} (field 'nb_snapshots' at 0x3c)",
                          offset=60)
    out = []
    pos = 0
    for _ in range(count):
        sn, n = Snapshot.parse(buf, pos, table_offset, limit, cut_extra)
        out.append(sn)
        pos += n
    return out


def pack_table(snaps: list[Snapshot]) -> bytes:
    return b"".join(s.pack() for s in snaps)


def read_table(img: MetadataImage) -> list[Snapshot]:
    """Read the snapshot table named by the header, bounded by QEMU's limits.  The part
    of the table past the end of the file reads as zeros, as in QEMU."""
    h = img.header
    if not h.nb_snapshots:
        return []
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots: {h.nb_snapshots} (field 'nb_snapshots' at "
                          "0x3c)", offset=60)
    if h.snapshots_offset % img.cs:
        raise FormatError(f"Snapshot table offset invalid: {h.snapshots_offset:#x} (field "
                          "'snapshots_offset' at 0x40)", offset=64)
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
