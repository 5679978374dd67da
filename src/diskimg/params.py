"""Argument checks of the public API, written once: a wrong type or value of a public
function's argument is a :class:`~diskimg.errors.UsageError` naming the argument, never a
bare ``TypeError`` from deep inside; and renamed keywords keep working with a
``DeprecationWarning``."""

from __future__ import annotations

from diskimg.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    _T = TypeVar("_T")


def check_int(name: str, value: object, *, minimum: int | None = 0) -> int:
    """``value`` as an int (anything with ``__index__`` but a bool), at least ``minimum``
    (None: any); else UsageError naming ``name``."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise UsageError(f"{name} must be an integer, not {type(value).__name__}")
        import operator  # only for an int-like that is not an int

        value = operator.index(value)  # type: ignore[arg-type]
    assert isinstance(value, int)
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, not {value}")
    return value


def renamed(new: str, value: _T | None, old: str, old_value: _T | None, *,
            stacklevel: int = 3) -> _T | None:
    """The value of keyword ``new``, or of its deprecated spelling ``old`` (with a
    DeprecationWarning); both given is a UsageError."""
    if old_value is None:
        return value
    import warnings  # only a deprecated keyword pays for it (start-up)

    warnings.warn(f"the {old}= keyword is deprecated; use {new}=", DeprecationWarning,
                  stacklevel=stacklevel)
    if value is not None and value != old_value:
        raise UsageError(f"{old}= and {new}= given with different values")
    return old_value
