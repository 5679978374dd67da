"""Record classes without :mod:`dataclasses` (start-up, issue 20 item 1), and the
made-on-first-use class attribute (:class:`OnFirstUse`, :func:`made_from`).

Importing :mod:`dataclasses` (and with it ``inspect``, ``ast``, ``dis``, ``tokenize`` ...)
and generating each record's methods cost ``diskimg info`` about 17 ms of its start-up, so
the records on the info/check/map path are slotted classes with a hand-written
``__init__`` that derive the rest from here, with a dataclass's behaviour:

- the fields are the class's ``__slots__``, in order: ``__init__``'s parameters, what
  ``==`` compares (only between instances of the same class), what ``repr`` shows (minus
  ``_repr_hidden``), what :meth:`Record.replace` copies and what pickling/copying rebuilds;
- a :class:`Record` is unhashable, as a mutable ``@dataclass`` (``eq=True``) is;
- a :class:`FrozenRecord` refuses attribute assignment and deletion with
  :class:`FrozenInstanceError` (an ``AttributeError``, as ``dataclasses``' is) and hashes
  its fields; its ``__init__`` sets them with ``object.__setattr__`` (:data:`set_field`).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn, Self

__all__ = ["FrozenInstanceError", "FrozenRecord", "OnFirstUse", "Record", "made_from",
           "set_field", "set_fields"]

#: how a frozen record's ``__init__`` sets its fields
set_field = object.__setattr__


def set_fields(record: Record, *values: object) -> None:
    """Set all of ``record``'s fields, in ``__slots__`` order (a frozen record's
    ``__init__`` with many fields)."""
    names = type(record).__slots__
    assert len(names) == len(values), (names, values)
    for name, value in zip(names, values, strict=True):
        set_field(record, name, value)


class FrozenInstanceError(AttributeError):
    """Assignment to (or deletion of) a field of a frozen record."""


class Record:
    """Equality, repr, :meth:`replace` and pickling over the fields (``__slots__``)."""

    __slots__: tuple[str, ...] = ()
    #: fields ``repr`` leaves out (``field(repr=False)``)
    _repr_hidden: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, n) for n in type(self).__slots__])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self).__slots__
                          if n not in self._repr_hidden)
        return f"{type(self).__qualname__}({shown})"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field name: new value), as ``dataclasses.replace``."""
        kw = dict(zip(type(self).__slots__, self._values(), strict=True))
        for name in changes:
            if name not in kw:
                raise TypeError(f"{type(self).__qualname__} has no field {name!r}")
        kw.update(changes)
        return type(self)(**kw)

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        return type(self), self._values()


class FrozenRecord(Record):
    """A :class:`Record` whose fields cannot be changed; hashable."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:  # type: ignore[override]  # Record's is None
        return hash(self._values())


class OnFirstUse:
    """A class attribute made for each instance, by ``make(instance)``, when first read,
    then kept as the instance's own attribute (a non-data descriptor: the instance
    attribute takes over, so later reads cost nothing and assignments just replace it).
    Two threads reading it first get the same value."""

    __slots__ = ("make", "name")

    def __init__(self, make: Callable[[Any], object]) -> None:
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, self.make(obj))


def made_from(module: str, factory: str) -> OnFirstUse:
    """An :class:`OnFirstUse` making ``module.factory(instance)``, the module imported
    then: how a device declares a part whose code loads only when used (its persistent
    bitmaps)."""
    return OnFirstUse(lambda obj: __import__(module, fromlist=[factory]).__dict__[factory](obj))
