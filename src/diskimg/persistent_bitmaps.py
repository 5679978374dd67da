"""The format-neutral shape of an image's persistent dirty bitmaps, what
:attr:`BlockDevice.bitmaps <diskimg.device.BlockDevice.bitmaps>` declares (qcow2 v3's
``qcow2.bitmaps.Bitmaps`` is one; a format without them gets :class:`NoBitmaps`, whose
list is empty and whose every other call raises
:class:`~diskimg.errors.UnsupportedFeatureError` in qemu-img's words).  Loaded when a
device's bitmaps are first asked for (:func:`diskimg.slotted.made_from`)."""

from __future__ import annotations

from diskimg.errors import UnsupportedFeatureError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, Protocol
else:  # typing is for the type checker: not imported at run time (start-up)
    Protocol = object


class BitmapRecord(Protocol):
    """One persistent bitmap as :meth:`PersistentBitmaps.list` gives it."""

    @property
    def name(self) -> str: ...

    @property
    def flags(self) -> int: ...

    @property
    def granularity_bits(self) -> int: ...

    def info(self) -> dict[str, Any]:
        """The bitmap as ``qemu-img info --output=json`` lists it."""
        ...


class PersistentBitmaps(Protocol):
    """The persistent dirty bitmaps of an image: what ``qemu-img bitmap`` changes."""

    def list(self) -> Sequence[BitmapRecord]: ...

    def add(self, name: str, granularity: int | None = None, *,
            disabled: bool = False) -> None: ...

    def remove(self, name: str) -> None: ...

    def clear(self, name: str) -> None: ...

    def enable(self, name: str) -> None: ...

    def disable(self, name: str) -> None: ...

    def merge(self, name: str, source_name: str, source_image: Any = None) -> None: ...

    def bits(self, name: str) -> tuple[bytearray, int]: ...

    def dirty_extents(self, name: str) -> Iterator[tuple[int, int]]: ...


class NoBitmaps:
    """The bitmaps of a format that has none (raw, vmdk): nothing to list; adding is
    refused as qemu refuses it, and any named bitmap is not found."""

    def __init__(self, device: Any) -> None:
        self.filename = device.filename

    def list(self) -> Sequence[BitmapRecord]:
        return []

    def add(self, name: str, granularity: int | None = None, *,
            disabled: bool = False) -> None:
        raise UnsupportedFeatureError(f"Can't store persistent bitmaps to "
                                      f"'{self.filename}': Operation not supported")

    def _missing(self, name: str) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(f"Dirty bitmap '{name}' not found")

    def remove(self, name: str) -> None:
        raise self._missing(name)

    def clear(self, name: str) -> None:
        raise self._missing(name)

    def enable(self, name: str) -> None:
        raise self._missing(name)

    def disable(self, name: str) -> None:
        raise self._missing(name)

    def merge(self, name: str, source_name: str, source_image: Any = None) -> None:
        raise self._missing(source_name)

    def bits(self, name: str) -> tuple[bytearray, int]:
        raise self._missing(name)

    def dirty_extents(self, name: str) -> Iterator[tuple[int, int]]:
        raise self._missing(name)
