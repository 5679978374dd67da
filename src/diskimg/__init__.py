"""diskimg: pure-Python qcow2, raw and vmdk disk images with a qemu-img compatible CLI."""

from diskimg.errors import (
    BackingChainError,
    ClosedImageError,
    CorruptImageError,
    DiskImgError,
    EncryptionError,
    FormatError,
    ImageLockedError,
    InvalidPassphraseError,
    MissingSecretError,
    PoolError,
    RemoteError,
    UnsupportedFeatureError,
    UsageError,
    WrongFormatError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.api import create, open
    from diskimg.device import BlockDevice, DeviceIO, ImageInfo, MapEntry
    from diskimg.hostio import aligned_buffer
    from diskimg.ops.bench import bench
    from diskimg.ops.chain import commit, rebase
    from diskimg.ops.checksum import checksum
    from diskimg.ops.commands import amend, check, info, map, measure, resize, snapshot
    from diskimg.ops.compare import compare
    from diskimg.ops.convert import convert
    from diskimg.ops.dd import dd
    from diskimg.policy import OpenPolicy
    from diskimg.pool import Pool, PoolRegistry, Volume

#: every public name but the errors, by the module that defines it: imported on first use
#: (``diskimg.open`` loads the format layer, ``diskimg.convert`` the copy engine ...), so
#: ``import diskimg`` costs a few milliseconds and a command loads only what it uses
_LAZY = {"create": "api", "open": "api", "BlockDevice": "device", "DeviceIO": "device",
         "ImageInfo": "device", "MapEntry": "device", "aligned_buffer": "hostio",
         "OpenPolicy": "policy", "Pool": "pool", "PoolRegistry": "pool", "Volume": "pool",
         "commit": "ops.chain", "compare": "ops.compare", "convert": "ops.convert",
         "dd": "ops.dd", "rebase": "ops.chain", "amend": "ops.commands",
         "check": "ops.commands", "info": "ops.commands", "map": "ops.commands",
         "measure": "ops.commands", "resize": "ops.commands", "snapshot": "ops.commands",
         "checksum": "ops.checksum", "bench": "ops.bench"}


def __getattr__(name: str) -> object:
    """The public names of :data:`_LAZY`, imported when first used, and submodules by
    attribute (``diskimg.units`` ...), as before the lazy import."""
    if name in _LAZY:
        value = getattr(_submodule(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    if name.startswith("__"):  # dunder probes (copy, pickle, doctest ...) are no submodules
        raise AttributeError(f"module 'diskimg' has no attribute {name!r}")
    try:
        return _submodule(name)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'diskimg' has no attribute {name!r}") from None


def _submodule(name: str) -> object:
    """``importlib.import_module(f"diskimg.{name}")`` without importing importlib (and
    the warnings module it loads): start-up, issue 20."""
    import sys

    full = f"diskimg.{name}"
    __import__(full)
    return sys.modules[full]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BackingChainError",
    "BlockDevice",
    "ClosedImageError",
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
    "RemoteError",
    "UnsupportedFeatureError",
    "UsageError",
    "Volume",
    "WrongFormatError",
    "__version__",
    "aligned_buffer",
    "amend",
    "bench",
    "check",
    "checksum",
    "commit",
    "compare",
    "convert",
    "create",
    "dd",
    "info",
    "map",
    "measure",
    "open",
    "rebase",
    "resize",
    "snapshot",
]
