"""vmdk: VMware's disk format — reading every hosted subformat qemu reads, creating the five
qemu-img creates (byte-identical to qemu-img 7.2 except the random CID), and writing
streamOptimized front to back in VMware's marker layout.

Public entry points: :func:`open_vmdk`, :func:`create_vmdk`, :func:`write_stream_optimized`,
:class:`VmdkImage`.

Modules, one job each.  What opening and reading a monolithicSparse image loads:
``sparse`` (the SparseExtentHeader and grain-table codecs), ``descriptor`` (the text
descriptor), ``sparse_extent`` (what grain-mapped extents share; hosted sparse grain
tables, read side), ``image`` (descriptor + extents as a device; executes the read
plans); ``extent`` is the extent protocol, for the type checker.  Imported on first use:
``descfile`` (the extents a separate descriptor file names), ``extent_line`` (its extent
lines), ``flat`` (flat and zero extents), ``cowd`` and ``sesparse`` (those extents'
headers; seSparse), ``markers`` (streamOptimized records), ``compressed`` (reading
compressed grains), ``sparse_write`` (grain allocation and table write-back),
``image_write`` (writes, write-zeroes, the new CID), ``stream`` (writing
streamOptimized), ``check`` and ``lint`` (check; VMware-acceptance lint of a
streamOptimized file), ``create`` (new images).
"""

from __future__ import annotations

from diskimg.vmdk.image import VmdkImage, open_vmdk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.vmdk.create import (_init_sparse, create_vmdk, sparse_layout, stream_header,
                                     write_stream_optimized)

#: the creation side, imported when first used: opening an image does not load it
_CREATE = ("_init_sparse", "create_vmdk", "sparse_layout", "stream_header",
           "write_stream_optimized")


def __getattr__(name: str) -> object:
    if name in _CREATE:
        from diskimg.vmdk import create

        return getattr(create, name)
    raise AttributeError(f"module 'diskimg.vmdk' has no attribute {name!r}")

__all__ = ["VmdkImage", "_init_sparse", "create_vmdk", "open_vmdk", "sparse_layout",
           "stream_header", "write_stream_optimized"]
