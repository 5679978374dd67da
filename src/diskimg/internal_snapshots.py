"""The format-neutral shape of an image's internal snapshots, what
:attr:`BlockDevice.snapshots <diskimg.device.BlockDevice.snapshots>` declares (qcow2's
``qcow2.snapshot.SnapshotTable`` is one; raw and vmdk have none)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Protocol
else:  # typing is for the type checker: not imported at run time (start-up)
    Protocol = object


class SnapshotEntry(Protocol):
    """One internal snapshot as :class:`InternalSnapshots` lists it (qcow2's ``Snapshot``)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    def to_json(self) -> dict[str, Any]:
        """The snapshot as ``qemu-img info --output=json`` lists it."""
        ...


class InternalSnapshots(Protocol):
    """The internal snapshots of an image (:attr:`BlockDevice.snapshots`): what
    ``qemu-img snapshot`` lists, creates, applies and deletes."""

    def list(self) -> Sequence[SnapshotEntry]:
        """The table in on-disk order."""
        ...

    def create(self, name: str) -> object:
        """Take a snapshot of the current state named ``name``."""
        ...

    def check_revertible(self) -> None:
        """Raise when no snapshot can be applied to this image (before looking one up)."""
        ...

    def apply(self, name_or_id: str) -> None:
        """Revert the disk to snapshot ``name_or_id``."""
        ...

    def delete(self, name_or_id: str) -> None:
        """Delete snapshot ``name_or_id``."""
        ...
