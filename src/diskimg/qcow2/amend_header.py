"""Whole-header rewrites of a qcow2 image nobody else has open: read and write the header
cluster, the v3 feature fields, and the backing file name (``rebase``'s
``change_backing_file``).

The header bytes are :class:`Header`'s (``Header.parse`` / ``Header.pack``); single fields
go through :mod:`diskimg.qcow2.header_io`.  Nothing here parses header bytes itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskimg.errors import DiskImgError, UnsupportedFeatureError, UsageError
from diskimg.hostio.names import raw_c_name
from diskimg.qcow2 import header_io
from diskimg.qcow2.bitmaps import BitmapsExt
from diskimg.qcow2.cluster import clear_unknown_autoclear
from diskimg.qcow2.header_io import write_header
from diskimg.qcow2.layout import (
    BACKING_FILE_NAME_MAX,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    Header,
)

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

__all__ = [
    "data_file_raw_flag",
    "nb_bitmaps",
    "read_header",
    "set_backing",
    "set_feature_bits",
    "write_header",
]

def read_header(host: Host) -> Header:
    """Parse the header in cluster 0 of ``host``."""
    cs = Header.cluster_size_of(host.pread(0, 512))
    return Header.parse(host.pread(0, cs))


def nb_bitmaps(h: Header) -> int:
    """Persistent bitmaps the header declares (0 without a valid bitmaps extension)."""
    bx = BitmapsExt.of(h)
    return 0 if bx is None else bx.nb_bitmaps


def data_file_raw_flag(h: Header) -> bool:
    """Whether the autoclear ``data_file_raw`` bit is set."""
    return bool(h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)


def set_feature_bits(host: Host, h: Header) -> None:
    """Write the v3 feature fields (incompatible, compatible, autoclear) in place."""
    header_io.set_feature_fields(host, h.incompatible_features, h.compatible_features,
                                 h.autoclear_features)
    host.flush()


def set_backing(host: Host, backing_file: str | None, backing_fmt: str | None) -> None:
    """Rewrite the backing file name and format in the header (qcow2 ``change_backing_file``):
    ``backing_file`` None removes both.  Other extensions are kept."""
    h = read_header(host)
    if backing_file is not None and \
            len(raw_c_name(backing_file, "Backing file name")) > BACKING_FILE_NAME_MAX:
        raise UsageError("Backing file name too long")
    h.backing_file = backing_file or None
    if backing_file and backing_fmt:
        h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, raw_c_name(backing_fmt, "Backing format"))
    else:
        h.set_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, None)
    try:
        h.pack()
    except DiskImgError:
        raise UnsupportedFeatureError("Could not change the backing file: the header does "
                                      "not fit in one cluster") from None
    clear_unknown_autoclear(host, h)
    write_header(host, h)
