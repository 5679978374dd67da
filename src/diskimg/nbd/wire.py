"""NBD wire basics: the spec's constants, limits and record sizes, the protocol error and
the string rules (UTF-8, no NUL, at most 4096 bytes).  Re-exported by
:mod:`diskimg.nbd.protocol`, which is what other modules import."""
from __future__ import annotations

import struct

from ..errors import FormatError

# --------------------------------------------------------------------------- magics
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT": newstyle greeting and option requests
NBD_CLISERV_MAGIC = 0x00420281861253     # oldstyle greeting (never sent by diskimg)
NBD_REP_MAGIC = 0x3E889045565A9          # option replies
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers (not negotiated by diskimg)
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

NBD_DEFAULT_PORT = 10809

# --------------------------------------------------------------------- handshake flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
# client flags
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_CLIENT_FLAGS_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# ------------------------------------------------------------------ transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# ------------------------------------------------------------------------- options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# ----------------------------------------------------------------- option replies
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# ------------------------------------------------------- NBD_REP_INFO information types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# ------------------------------------------------------------------------ commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# ------------------------------------------------------- structured reply chunks
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT | 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT | 2

# ------------------------------------------------------------------ meta contexts
NBD_STATE_HOLE = 1 << 0           # base:allocation
NBD_STATE_ZERO = 1 << 1
NBD_STATE_DIRTY = 1 << 0          # qemu:dirty-bitmap:NAME
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# ------------------------------------------------------------------------- errors
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --------------------------------------------------------------------------- limits
#: the longest string (export name, description, message, context name) the spec allows
NBD_MAX_STRING = 4096
#: the longest option payload accepted (a SET_META_CONTEXT with a few long queries fits)
NBD_MAX_OPTION_LENGTH = 64 * 1024
#: the longest option reply payload accepted (a META_CONTEXT or INFO reply is much shorter)
NBD_MAX_OPTION_REPLY_LENGTH = 64 * 1024
#: the largest READ/WRITE payload (32 MiB, as qemu-nbd)
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: most info requests in one OPT_INFO/OPT_GO, and queries in one meta-context option
NBD_MAX_INFO_REQUESTS = 64
NBD_MAX_META_QUERIES = 256

# ---------------------------------------------------------------------- record sizes
SERVER_GREETING_SIZE = 18       # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16         # IHAVEOPT, option, length
OPTION_REPLY_HEADER_SIZE = 20   # magic, option, reply type, length
EXPORT_NAME_REPLY_SIZE = 10     # size, transmission flags (+124 zero bytes unless NO_ZEROES)
EXPORT_NAME_REPLY_PADDING = 124
REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPT = struct.Struct(">QII")
_REP = struct.Struct(">QIII")
_EXPORT = struct.Struct(">QH")
_BLOCK_SIZE = struct.Struct(">HIII")
_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")


class NbdProtocolError(FormatError):
    """A peer sent bytes the NBD protocol does not allow.  ``field`` names the field and
    ``offset`` its offset in the stream (bytes since the connection opened)."""

    def __init__(self, message: str, *, field: str, offset: int) -> None:
        super().__init__(f"NBD: {message} (field {field!r} at stream offset {offset})",
                         offset=offset, field=field)
        self.detail = message


def _need(data: bytes | bytearray | memoryview, size: int, what: str, base: int) -> None:
    if len(data) < size:
        raise NbdProtocolError(f"{what} truncated: {len(data)} of {size} bytes",
                               field=what, offset=base + len(data))


def _string(raw: bytes | bytearray | memoryview, field: str, offset: int) -> str:
    if len(raw) > NBD_MAX_STRING:
        raise NbdProtocolError(f"{field} is {len(raw)} bytes, more than {NBD_MAX_STRING}",
                               field=field, offset=offset)
    b = bytes(raw)
    if b"\0" in b:
        raise NbdProtocolError(f"{field} contains a NUL byte", field=field,
                               offset=offset + b.index(b"\0"))
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NbdProtocolError(f"{field} is not UTF-8", field=field,
                               offset=offset + e.start) from None


def encode_string(text: str, field: str = "string") -> bytes:
    """``text`` as the spec's string (UTF-8, no NUL, at most 4096 bytes); else
    :class:`ValueError`."""
    b = text.encode("utf-8")
    if len(b) > NBD_MAX_STRING or b"\0" in b:
        raise ValueError(f"NBD {field} must be UTF-8 without NUL, at most "
                         f"{NBD_MAX_STRING} bytes: {text[:64]!r}")
    return b


def _len_string(data: bytes | bytearray | memoryview, pos: int, field: str, base: int
                ) -> tuple[str, int]:
    """A u32 length then that many bytes of string at ``data[pos:]``; (text, next pos)."""
    _need(data[pos:], 4, f"{field} length", base + pos)
    (n,) = _U32.unpack_from(data, pos)
    if n > NBD_MAX_STRING:
        raise NbdProtocolError(f"{field} length {n} is more than {NBD_MAX_STRING}",
                               field=f"{field} length", offset=base + pos)
    pos += 4
    if pos + n > len(data):
        raise NbdProtocolError(f"{field} length {n} runs past the end of the payload",
                               field=f"{field} length", offset=base + pos - 4)
    return _string(data[pos:pos + n], field, base + pos), pos + n


def _pack_len_string(text: str, field: str) -> bytes:
    b = encode_string(text, field)
    return _U32.pack(len(b)) + b


__all__ = [
    "BASE_ALLOCATION",
    "CHUNK_HEADER_SIZE",
    "CLIENT_FLAGS_SIZE",
    "EXPORT_NAME_REPLY_PADDING",
    "EXPORT_NAME_REPLY_SIZE",
    "IHAVEOPT",
    "NBDMAGIC",
    "NBD_CLIENT_FLAGS_KNOWN",
    "NBD_CLISERV_MAGIC",
    "NBD_CMD_BLOCK_STATUS",
    "NBD_CMD_CACHE",
    "NBD_CMD_DISC",
    "NBD_CMD_FLAG_DF",
    "NBD_CMD_FLAG_FAST_ZERO",
    "NBD_CMD_FLAG_FUA",
    "NBD_CMD_FLAG_NO_HOLE",
    "NBD_CMD_FLAG_PAYLOAD_LEN",
    "NBD_CMD_FLAG_REQ_ONE",
    "NBD_CMD_FLUSH",
    "NBD_CMD_READ",
    "NBD_CMD_RESIZE",
    "NBD_CMD_TRIM",
    "NBD_CMD_WRITE",
    "NBD_CMD_WRITE_ZEROES",
    "NBD_DEFAULT_PORT",
    "NBD_EINVAL",
    "NBD_EIO",
    "NBD_ENOMEM",
    "NBD_ENOSPC",
    "NBD_ENOTSUP",
    "NBD_EOVERFLOW",
    "NBD_EPERM",
    "NBD_ESHUTDOWN",
    "NBD_EXTENDED_REPLY_MAGIC",
    "NBD_EXTENDED_REQUEST_MAGIC",
    "NBD_FLAG_BLOCK_STAT_PAYLOAD",
    "NBD_FLAG_CAN_MULTI_CONN",
    "NBD_FLAG_C_FIXED_NEWSTYLE",
    "NBD_FLAG_C_NO_ZEROES",
    "NBD_FLAG_FIXED_NEWSTYLE",
    "NBD_FLAG_HAS_FLAGS",
    "NBD_FLAG_NO_ZEROES",
    "NBD_FLAG_READ_ONLY",
    "NBD_FLAG_ROTATIONAL",
    "NBD_FLAG_SEND_CACHE",
    "NBD_FLAG_SEND_DF",
    "NBD_FLAG_SEND_FAST_ZERO",
    "NBD_FLAG_SEND_FLUSH",
    "NBD_FLAG_SEND_FUA",
    "NBD_FLAG_SEND_RESIZE",
    "NBD_FLAG_SEND_TRIM",
    "NBD_FLAG_SEND_WRITE_ZEROES",
    "NBD_INFO_BLOCK_SIZE",
    "NBD_INFO_DESCRIPTION",
    "NBD_INFO_EXPORT",
    "NBD_INFO_NAME",
    "NBD_MAX_BUFFER_SIZE",
    "NBD_MAX_INFO_REQUESTS",
    "NBD_MAX_META_QUERIES",
    "NBD_MAX_OPTION_LENGTH",
    "NBD_MAX_OPTION_REPLY_LENGTH",
    "NBD_MAX_STRING",
    "NBD_OPT_ABORT",
    "NBD_OPT_EXPORT_NAME",
    "NBD_OPT_EXTENDED_HEADERS",
    "NBD_OPT_GO",
    "NBD_OPT_INFO",
    "NBD_OPT_LIST",
    "NBD_OPT_LIST_META_CONTEXT",
    "NBD_OPT_PEEK_EXPORT",
    "NBD_OPT_SET_META_CONTEXT",
    "NBD_OPT_STARTTLS",
    "NBD_OPT_STRUCTURED_REPLY",
    "NBD_REPLY_FLAG_DONE",
    "NBD_REPLY_TYPE_BLOCK_STATUS",
    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
    "NBD_REPLY_TYPE_ERROR",
    "NBD_REPLY_TYPE_ERROR_BIT",
    "NBD_REPLY_TYPE_ERROR_OFFSET",
    "NBD_REPLY_TYPE_NONE",
    "NBD_REPLY_TYPE_OFFSET_DATA",
    "NBD_REPLY_TYPE_OFFSET_HOLE",
    "NBD_REP_ACK",
    "NBD_REP_ERR_BLOCK_SIZE_REQD",
    "NBD_REP_ERR_EXT_HEADER_REQD",
    "NBD_REP_ERR_INVALID",
    "NBD_REP_ERR_PLATFORM",
    "NBD_REP_ERR_POLICY",
    "NBD_REP_ERR_SHUTDOWN",
    "NBD_REP_ERR_TLS_REQD",
    "NBD_REP_ERR_TOO_BIG",
    "NBD_REP_ERR_UNKNOWN",
    "NBD_REP_ERR_UNSUP",
    "NBD_REP_FLAG_ERROR",
    "NBD_REP_INFO",
    "NBD_REP_MAGIC",
    "NBD_REP_META_CONTEXT",
    "NBD_REP_SERVER",
    "NBD_REQUEST_MAGIC",
    "NBD_SIMPLE_REPLY_MAGIC",
    "NBD_STATE_DIRTY",
    "NBD_STATE_HOLE",
    "NBD_STATE_ZERO",
    "NBD_STRUCTURED_REPLY_MAGIC",
    "NbdProtocolError",
    "OPTION_HEADER_SIZE",
    "OPTION_REPLY_HEADER_SIZE",
    "QEMU_ALLOCATION_DEPTH",
    "QEMU_DIRTY_BITMAP_PREFIX",
    "REQUEST_SIZE",
    "SERVER_GREETING_SIZE",
    "SIMPLE_REPLY_SIZE",
    "_BLOCK_SIZE",
    "_CHUNK",
    "_ERR",
    "_EXPORT",
    "_EXTENT",
    "_GREETING",
    "_HOLE",
    "_OPT",
    "_REP",
    "_REQ",
    "_SIMPLE",
    "_U16",
    "_U32",
    "_U64",
    "_len_string",
    "_need",
    "_pack_len_string",
    "_string",
    "encode_string",
]
