"""vmdk: VMware's disk format — reading every hosted subformat qemu reads, creating the five
qemu-img creates (byte-identical to qemu-img 7.2 except the random CID), and writing
streamOptimized front to back in VMware's marker layout.

Public entry points: :func:`open_vmdk`, :func:`create_vmdk`, :func:`write_stream_optimized`,
:class:`VmdkImage`.

Modules, one job each: ``sparse`` (on-disk records: headers, markers, footer), ``descriptor``
(the text descriptor), ``extent`` (the extent protocol; flat and zero extents),
``sparse_extent`` (hosted sparse grain tables), ``compressed`` (reading compressed grains),
``sesparse`` (seSparse), ``stream`` (writing streamOptimized), ``image`` (descriptor +
extents as a device; executes the read plans), ``create`` (new images), ``lint``
(VMware-acceptance lint of a streamOptimized file, loaded by check).
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
