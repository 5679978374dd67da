"""The records a block device answers with: :class:`MapEntry` (one run of
``qemu-img map``, merged by :func:`mergeable`), :class:`Status` (block status of one run
of one layer) and :class:`ImageInfo` (``qemu-img info``).  Field names and JSON keys are
qemu's; the records hold values only (no I/O)."""

from __future__ import annotations

from diskimg.slotted import FrozenRecord, Record, set_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ImageInfo", "MapEntry", "Status", "mergeable"]


class MapEntry(FrozenRecord):
    """One run of ``qemu-img map --output=json``; field names are qemu's JSON keys."""

    __slots__ = ("start", "length", "depth", "present", "zero", "data", "offset", "filename")
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None  # host file the offset refers to (for human map output)

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool,
                 data: bool, offset: int | None = None, filename: str | None = None) -> None:
        set_field(self, "start", start)
        set_field(self, "length", length)
        set_field(self, "depth", depth)
        set_field(self, "present", present)
        set_field(self, "zero", zero)
        set_field(self, "data", data)
        set_field(self, "offset", offset)
        set_field(self, "filename", filename)

    def to_json(self) -> dict[str, Any]:
        """This run as ``qemu-img map --output=json`` prints it (``offset`` only when set).

        ``start``, ``length`` and ``offset`` are bytes; ``filename`` is not included.
        """
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


class Status(FrozenRecord):
    """Block status of one run in one layer (QEMU's BDRV_BLOCK_* flags).

    ``allocated``: this layer decides the contents (no fall-through to the backing file).
    ``offset``: host offset of the data in ``filename`` when it lies there verbatim.
    """

    __slots__ = ("length", "allocated", "data", "zero", "offset", "filename")
    length: int
    allocated: bool
    data: bool
    zero: bool
    offset: int | None
    filename: str | None

    def __init__(self, length: int, allocated: bool, data: bool, zero: bool,
                 offset: int | None = None, filename: str | None = None) -> None:
        set_field(self, "length", length)
        set_field(self, "allocated", allocated)
        set_field(self, "data", data)
        set_field(self, "zero", zero)
        set_field(self, "offset", offset)
        set_field(self, "filename", filename)


class ImageInfo(Record):
    """What ``qemu-img info`` reports; :meth:`to_json` gives qemu's keys.  ``actual_size``
    None: the host has no allocation to report (an NBD export; qemu's ``disk size:
    unavailable``); ``dirty_flag`` None: not reported (raw over such a host)."""

    __slots__ = ("filename", "format", "virtual_size", "actual_size", "dirty_flag",
                 "cluster_size", "encrypted", "backing_filename", "full_backing_filename",
                 "backing_filename_format", "snapshots", "format_specific")
    filename: str
    format: str
    virtual_size: int
    actual_size: int | None    # None: the store cannot tell (qemu omits the key)
    dirty_flag: bool | None    # None: not known (raw over a URL: qemu omits the key)
    cluster_size: int | None
    encrypted: bool
    backing_filename: str | None
    full_backing_filename: str | None
    backing_filename_format: str | None
    snapshots: list[dict[str, Any]]
    format_specific: dict[str, Any] | None

    def __init__(self, filename: str, format: str, virtual_size: int,
                 actual_size: int | None, dirty_flag: bool | None = False,
                 cluster_size: int | None = None,
                 encrypted: bool = False, backing_filename: str | None = None,
                 full_backing_filename: str | None = None,
                 backing_filename_format: str | None = None,
                 snapshots: list[dict[str, Any]] | None = None,
                 format_specific: dict[str, Any] | None = None) -> None:
        self.filename = filename
        self.format = format
        self.virtual_size = virtual_size
        self.actual_size = actual_size
        self.dirty_flag = dirty_flag
        self.cluster_size = cluster_size
        self.encrypted = encrypted
        self.backing_filename = backing_filename
        self.full_backing_filename = full_backing_filename
        self.backing_filename_format = backing_filename_format
        self.snapshots = [] if snapshots is None else snapshots
        self.format_specific = format_specific

    def __str__(self) -> str:
        """``qemu-img info``'s human text (:func:`diskimg.info_text.info_human`)."""
        from diskimg.info_text import info_human

        return info_human(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The ``qemu-img info --output=json`` object, with qemu's keys, order and
        conditional keys (``encrypted`` only when true, backing keys only with a backing
        file, ``snapshots`` only when there are some).  Sizes are bytes.
        """
        d: dict[str, Any] = {}  # keys in QEMU's QDict order (info_text.qdict_order)
        if self.backing_filename_format is not None:
            d["backing-filename-format"] = self.backing_filename_format
        if self.snapshots:
            d["snapshots"] = self.snapshots
        d["virtual-size"] = self.virtual_size
        d["filename"] = self.filename
        if self.cluster_size is not None:
            d["cluster-size"] = self.cluster_size
        d["format"] = self.format
        if self.actual_size is not None:
            d["actual-size"] = self.actual_size
        if self.format_specific is not None:
            d["format-specific"] = self.format_specific
        if self.full_backing_filename is not None:
            d["full-backing-filename"] = self.full_backing_filename
        if self.encrypted:
            d["encrypted"] = True
        if self.backing_filename is not None:
            d["backing-filename"] = self.backing_filename
        if self.dirty_flag is not None:
            d["dirty-flag"] = self.dirty_flag
        return d


def mergeable(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.filename) != (
        b.depth, b.present, b.zero, b.data, b.filename
    ):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or a.offset + a.length == b.offset
