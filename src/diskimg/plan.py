"""The typed read plan: what a format's mapper says about a range of guest bytes.

A mapper (vmdk's grain tables today; qcow2's L2 walk is shaped to adopt it) answers
"what lies at guest offset ``o``?" with a :class:`Run`; the image executes runs by
dispatching on :class:`RunKind`.  Nothing executing a plan compares strings.

Invariants of a plan (a sequence of runs covering ``[start, end)``, see
:func:`check_plan`):

- every run is non-empty (``length > 0``);
- runs are ordered and contiguous: each run starts where the previous one ended, the
  first at ``start``, the last ends at ``end``;
- runs lie inside the device (``0 <= offset`` and ``offset + length <= size``);
- a DATA run is host-contiguous: guest byte ``offset + i`` is at host byte ``host + i``
  of the file the run names;
- a COMPRESSED run names its first compressed unit (``host``, ``entry``); the executor
  decodes it with the format's codec, never by re-parsing the entry itself.
"""

from __future__ import annotations

from diskimg.slotted import FrozenRecord, set_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import ClassVar

__all__ = ["Run", "RunKind", "check_plan"]


class _Members(type):
    """RunKind's metaclass: ``for kind in RunKind`` gives the members in order, as an
    Enum's does."""

    _members: tuple[RunKind, ...]

    def __iter__(cls) -> Iterator[RunKind]:
        return iter(cls._members)

    def __len__(cls) -> int:
        return len(cls._members)


class RunKind(metaclass=_Members):
    """What the bytes of a run are: one of the four members below, each one object,
    compared with ``is``.  An enum without the :mod:`enum` module, whose import (with the
    functools, collections, operator and types modules it loads) costs every command's
    start-up (issue 20); ``name``, ``value``, ``repr``, iteration over the class and
    pickling behave as an ``enum.Enum``'s."""

    __slots__ = ("name", "value")
    name: str
    value: int

    #: stored verbatim at ``Run.host`` in this layer's file
    DATA: ClassVar[RunKind]
    #: read as zeros, decided by this layer (no fall-through to a backing file)
    ZERO: ClassVar[RunKind]
    #: not decided by this layer: the backing file's bytes, or zeros without one
    UNALLOCATED: ClassVar[RunKind]
    #: stored compressed; ``Run.host`` / ``Run.entry`` locate the first unit
    COMPRESSED: ClassVar[RunKind]

    def __init__(self, name: str, value: int) -> None:
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"<RunKind.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"RunKind.{self.name}"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return RunKind.named, (self.name,)  # the same object, unpickled or copied

    @staticmethod
    def named(name: str) -> RunKind:
        """The member called ``name`` (``RunKind["DATA"]`` of an Enum)."""
        for kind in RunKind._members:
            if kind.name == name:
                return kind
        raise KeyError(name)


RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED = RunKind._members = tuple(
    RunKind(name, value) for value, name in enumerate(
        ("DATA", "ZERO", "UNALLOCATED", "COMPRESSED"), 1))


class Run(FrozenRecord):
    """One run of a plan: ``length`` guest bytes from ``offset``, all of one ``kind``.

    ``host``: for DATA the host byte offset of guest byte ``offset`` (never None); for
    COMPRESSED the host offset of the first compressed unit (a vmdk grain record; None
    where the unit is only known through ``entry``, as for a qcow2 compressed cluster);
    for ZERO the preallocated host offset when the format keeps one (qcow2 zero clusters
    with an offset), else None; for UNALLOCATED None unless the format keeps one.
    ``entry``: the raw table entry the run was classified from (0 when it has none);
    a compressed run's descriptor for the format's decoder.
    ``filename``: the host file the offsets refer to (an extent's or a data file's name;
    None for the layer's own file when the caller knows it).
    """

    __slots__ = ("offset", "length", "kind", "host", "entry", "filename")
    offset: int
    length: int
    kind: RunKind
    host: int | None
    entry: int
    filename: str | None

    def __init__(self, offset: int, length: int, kind: RunKind, host: int | None = None,
                 entry: int = 0, filename: str | None = None) -> None:
        set_field(self, "offset", offset)
        set_field(self, "length", length)
        set_field(self, "kind", kind)
        set_field(self, "host", host)
        set_field(self, "entry", entry)
        set_field(self, "filename", filename)

    @property
    def end(self) -> int:
        """The guest byte after the run."""
        return self.offset + self.length

    @property
    def allocated(self) -> bool:
        """Whether this layer decides the run's contents (everything but UNALLOCATED)."""
        return self.kind is not RunKind.UNALLOCATED


def check_plan(runs: Iterable[Run], start: int, end: int, size: int | None = None) -> None:
    """Raise ``ValueError`` unless ``runs`` cover ``[start, end)`` as the module docstring
    states: non-empty, ordered, contiguous, inside ``size`` when given, DATA runs with a
    host offset.  For tests and debugging; the hot paths trust their mappers."""
    pos = start
    for r in runs:
        if r.length <= 0:
            raise ValueError(f"empty run at {r.offset}")
        if r.offset != pos:
            raise ValueError(f"run at {r.offset}, expected {pos}")
        if r.kind is RunKind.DATA and r.host is None:
            raise ValueError(f"DATA run at {r.offset} without a host offset")
        if r.offset < 0 or (size is not None and r.end > size):
            raise ValueError(f"run [{r.offset}, {r.end}) outside the device")
        pos = r.end
    if pos != end:
        raise ValueError(f"plan ends at {pos}, expected {end}")
