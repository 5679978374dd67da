"""diskimg: pure-Python qcow2, raw and vmdk disk images with a qemu-img compatible CLI."""

from diskimg.api import create, open
from diskimg.operations import commit, compare, convert, dd, rebase
from diskimg.device import BlockDevice, DeviceIO, ImageInfo, MapEntry
from diskimg.errors import (
    BackingChainError,
    CorruptImageError,
    DiskImgError,
    EncryptionError,
    FormatError,
    ImageLockedError,
    InvalidPassphraseError,
    MissingSecretError,
    PoolError,
    UnsupportedFeatureError,
    UsageError,
    WrongFormatError,
)
from diskimg.policy import OpenPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.pool import Pool, PoolRegistry, Volume


def __getattr__(name: str) -> object:
    """Import the storage-pool layer (~20 ms: xml, pool) only when it is used."""
    if name in ("Pool", "PoolRegistry", "Volume"):
        from diskimg import pool

        return getattr(pool, name)
    import importlib

    try:  # submodules by attribute (diskimg.units ...), as before the lazy import
        return importlib.import_module(f"diskimg.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'diskimg' has no attribute {name!r}") from None

__version__ = "0.1.0"

__all__ = [
    "BackingChainError",
    "BlockDevice",
    "CorruptImageError",
    "DeviceIO",
    "DiskImgError",
    "EncryptionError",
    "FormatError",
    "ImageInfo",
    "ImageLockedError",
    "InvalidPassphraseError",
    "MapEntry",
    "MissingSecretError",
    "OpenPolicy",
    "Pool",
    "PoolError",
    "PoolRegistry",
    "UnsupportedFeatureError",
    "UsageError",
    "Volume",
    "WrongFormatError",
    "__version__",
    "commit",
    "compare",
    "convert",
    "create",
    "dd",
    "open",
    "rebase",
]
