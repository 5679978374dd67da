"""The interface a qcow2 image offers its metadata modules (snapshot.py, bitmaps.py).

Those modules change the image's tables, and the image owns the caches and the write
ordering (:mod:`diskimg.qcow2.image`): refcount increments reach the file before any table
relying on them; references are dropped only after the tables no longer pointing at them
are on disk.  :class:`MetadataImage` names everything they may use -- read-only views of
the image's state, and the methods that change it while keeping those invariants -- so
neither reaches into the image's private attributes.  :class:`Qcow2Image` implements it
(checked by mypy where it passes itself to :class:`SnapshotTable` and :class:`Bitmaps`).
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from diskimg.errors import FormatError
    from diskimg.hostio.host import Host
    from diskimg.qcow2.bitmaps import Bitmaps
    from diskimg.qcow2.entries import L2Table, TableCache
    from diskimg.qcow2.layout import Header
    from diskimg.qcow2.refcount import Refcounts
    from diskimg.qcow2.snapshot_table import Snapshot


class MetadataImage(Protocol):
    """What snapshot and bitmap code may see and do of an open qcow2 image.

    The properties are views: the in-memory header, tables and caches may be read and
    their contents changed (a changed L2 table is marked dirty in ``l2_cache``, a changed
    active L1 entry added to ``l1_dirty``), but the tables themselves are replaced only
    through the ``install_*`` methods."""

    @property
    def header(self) -> Header:
        """The parsed header; kept equal to the file's after each header write."""

    @property
    def host(self) -> Host:
        """The image file."""

    @property
    def data_host(self) -> Host:
        """The file holding guest data: ``host``, or the external data file."""

    @property
    def has_data_file(self) -> bool:
        """True with an external data file (identity mapped, no refcounts for data)."""

    @property
    def cs(self) -> int:
        """Cluster size in bytes."""

    @property
    def cb(self) -> int:
        """Cluster bits (``cs == 1 << cb``)."""

    @property
    def extended(self) -> bool:
        """Extended L2 entries: (entry, subcluster bitmap) pairs of 64-bit words."""

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""

    @property
    def l1(self) -> memoryview:
        """The active L1 table (entries may change; add their index to ``l1_dirty``)."""

    @property
    def l1_dirty(self) -> set[int]:
        """Indices of active L1 entries changed in memory, written by the next flush."""

    @property
    def l2_cache(self) -> TableCache[L2Table]:
        """The L2 table cache; dirty refcount blocks are flushed before it writes."""

    @property
    def refcounts(self) -> Refcounts:
        """The refcount table and blocks, loaded on first use."""

    @property
    def snapshot_list(self) -> list[Snapshot]:
        """The snapshot table in on-disk order."""

    @property
    def snapshot_table_error(self) -> FormatError | None:
        """Why the snapshot table could not be read (an image opened for check)."""

    @property
    def bitmaps(self) -> Bitmaps:
        """The persistent bitmaps."""

    def check_open(self) -> None:
        """Raise :class:`~diskimg.errors.ClosedImageError` once the image is closed."""

    def check_writable(self) -> None:
        """Raise unless the image is open read-write.  Changes nothing."""

    def begin_change(self) -> None:
        """Call once every refusal is behind, before the first change to the file: asks
        for the encryption secret, clears unknown autoclear bits and sets the
        lazy-refcounts dirty bit (both synced), and forgets cached guesses about the
        layout.  Idempotent."""

    def flush(self) -> None:
        """Write every dirty table in order and apply pending frees (synced)."""

    def flush_refcounts(self) -> None:
        """Write the dirty refcount blocks and sync.  Call after allocating clusters and
        before writing any table (or header field) that points at them."""

    def free_after_flush(self, host: int, length: int) -> None:
        """Drop the reference to host bytes [host, host + length) in the next flush,
        after the tables that flush writes (which no longer point there) are on disk."""

    def punch_free_clusters(self, clusters: list[int]) -> None:
        """Deallocate in the host file those of ``clusters`` whose refcount is now 0.
        Only for clusters no table on disk points at any more."""

    def grow_l1(self, need: int) -> None:
        """Grow the active L1 table to ``need`` entries: flushed, copied to new
        clusters, switched to by one header write, the old clusters freed."""

    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Change the virtual disk size (see :meth:`Qcow2Image.resize`)."""

    def install_l1(self, l1: array[int] | memoryview) -> None:
        """Make ``l1`` the active L1 table.  It must already be on disk at
        ``header.l1_table_offset``; no entry is dirty afterwards and cached decoded
        compressed clusters are forgotten."""

    def install_snapshots(self, snapshots: list[Snapshot]) -> None:
        """Make ``snapshots`` the snapshot table; it must already be on disk where the
        header (file and ``header``) names it."""

    def install_tables(self, l1: array[int] | memoryview, snapshots: list[Snapshot],
                       l2_tables: list[tuple[int, L2Table]]) -> None:
        """After one header write switched the file to a new active L1 table, refcount
        table and snapshot table (and ``header`` was updated to match): install ``l1``
        and ``snapshots``, empty the L2 cache except for ``l2_tables`` ((offset, table)
        pairs, clean: as on disk), and reload the refcounts from the new table on first
        use."""
