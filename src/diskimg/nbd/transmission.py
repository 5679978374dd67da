"""The NBD transmission records: request header, simple reply, structured reply chunks
(OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE) and the errno
mapping.  Re-exported by :mod:`diskimg.nbd.protocol`."""

from __future__ import annotations

import errno as _errno
from typing import NamedTuple

from .wire import (
    CHUNK_HEADER_SIZE,
    NBD_CMD_WRITE,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBD_MAX_BUFFER_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NbdProtocolError,
    REQUEST_SIZE,
    SIMPLE_REPLY_SIZE,
    _CHUNK,
    _ERR,
    _EXTENT,
    _HOLE,
    _REQ,
    _SIMPLE,
    _U32,
    _U64,
    _need,
    _string,
    encode_string,
)


# ===================================================================== transmission
class Request(NamedTuple):
    flags: int
    type: int
    handle: int
    offset: int
    length: int


def pack_request(type: int, handle: int, offset: int = 0, length: int = 0,
                 flags: int = 0) -> bytes:
    """A request header (WRITE's data follows it on the wire)."""
    return _REQ.pack(NBD_REQUEST_MAGIC, flags, type, handle, offset, length)


def parse_request(data: bytes | bytearray | memoryview, base: int = 0,
                  max_write: int = NBD_MAX_BUFFER_SIZE) -> Request:
    """A request header.  A WRITE longer than ``max_write`` is an error here: its data
    cannot be skipped without reading it, so the server ends the connection."""
    _need(data, REQUEST_SIZE, "request header", base)
    magic, flags, rtype, handle, offset, length = _REQ.unpack_from(data)
    if magic != NBD_REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#x}", field="magic", offset=base)
    if rtype == NBD_CMD_WRITE and length > max_write:
        raise NbdProtocolError(f"write of {length} bytes is more than {max_write}",
                               field="length", offset=base + 24)
    return Request(int(flags), int(rtype), int(handle), int(offset), int(length))


class SimpleReply(NamedTuple):
    error: int
    handle: int


def pack_simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)


def parse_simple_reply(data: bytes | bytearray | memoryview, base: int = 0) -> SimpleReply:
    _need(data, SIMPLE_REPLY_SIZE, "simple reply", base)
    magic, error, handle = _SIMPLE.unpack_from(data)
    if magic != NBD_SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"bad simple reply magic {magic:#x}", field="magic",
                               offset=base)
    return SimpleReply(int(error), int(handle))


def reply_magic(data: bytes | bytearray | memoryview, base: int = 0) -> int:
    """The first 4 bytes of a reply: NBD_SIMPLE_REPLY_MAGIC or NBD_STRUCTURED_REPLY_MAGIC
    (anything else is an error); the caller then reads 16 or 20 bytes in all."""
    _need(data, 4, "reply magic", base)
    (magic,) = _U32.unpack_from(data)
    if magic not in (NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC):
        raise NbdProtocolError(f"bad reply magic {magic:#x}", field="magic", offset=base)
    return int(magic)


class ChunkHeader(NamedTuple):
    flags: int
    type: int
    handle: int
    length: int

    @property
    def done(self) -> bool:
        return bool(self.flags & NBD_REPLY_FLAG_DONE)

    @property
    def is_error(self) -> bool:
        return bool(self.type & NBD_REPLY_TYPE_ERROR_BIT)


def pack_chunk_header(handle: int, chunk_type: int, length: int, flags: int = 0) -> bytes:
    return _CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, length)


def pack_chunk(handle: int, chunk_type: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return pack_chunk_header(handle, chunk_type, len(payload), flags) + payload


def parse_chunk_header(data: bytes | bytearray | memoryview, base: int = 0,
                       max_length: int = NBD_MAX_BUFFER_SIZE + 8) -> ChunkHeader:
    _need(data, CHUNK_HEADER_SIZE, "chunk header", base)
    magic, flags, ctype, handle, length = _CHUNK.unpack_from(data)
    if magic != NBD_STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError(f"bad structured reply magic {magic:#x}", field="magic",
                               offset=base)
    if length > max_length:
        raise NbdProtocolError(f"chunk of {length} bytes is more than {max_length}",
                               field="chunk length", offset=base + 16)
    if ctype == NBD_REPLY_TYPE_NONE and (length or not flags & NBD_REPLY_FLAG_DONE):
        raise NbdProtocolError("NBD_REPLY_TYPE_NONE with data or without DONE",
                               field="chunk type", offset=base + 6)
    return ChunkHeader(int(flags), int(ctype), int(handle), int(length))


def pack_none_chunk(handle: int) -> bytes:
    return pack_chunk_header(handle, NBD_REPLY_TYPE_NONE, 0, NBD_REPLY_FLAG_DONE)


def pack_offset_data_header(handle: int, offset: int, data_length: int,
                            flags: int = 0) -> bytes:
    """Chunk header and offset of NBD_REPLY_TYPE_OFFSET_DATA; ``data_length`` bytes of
    data follow on the wire (sent by the caller, without a copy)."""
    return pack_chunk_header(handle, NBD_REPLY_TYPE_OFFSET_DATA, 8 + data_length,
                             flags) + _U64.pack(offset)


def pack_offset_data(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return pack_offset_data_header(handle, offset, len(data), flags) + data


def parse_offset_data_header(chunk_length: int, head: bytes | bytearray | memoryview,
                             base: int = 0) -> tuple[int, int]:
    """(offset, data length) of an OFFSET_DATA chunk of ``chunk_length`` bytes from its
    first 8 payload bytes ``head`` (at ``base``); the data follows them on the wire."""
    if chunk_length < 9:
        raise NbdProtocolError(f"OFFSET_DATA of {chunk_length} bytes (at least 9)",
                               field="chunk length", offset=base)
    if len(head) < 8:
        raise NbdProtocolError(f"OFFSET_DATA offset of {len(head)} bytes (8)",
                               field="offset", offset=base)
    (offset,) = _U64.unpack_from(head)
    return int(offset), chunk_length - 8


def parse_offset_data(payload: bytes | bytearray | memoryview, base: int = 0
                      ) -> tuple[int, memoryview]:
    """(offset, data) of an OFFSET_DATA payload (data: a view into ``payload``)."""
    offset, _ = parse_offset_data_header(len(payload), payload, base)
    return offset, memoryview(payload)[8:]


class Hole(NamedTuple):
    offset: int
    length: int


def pack_offset_hole(handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return pack_chunk(handle, NBD_REPLY_TYPE_OFFSET_HOLE, _HOLE.pack(offset, length), flags)


def parse_offset_hole(payload: bytes | bytearray | memoryview, base: int = 0) -> Hole:
    if len(payload) != 12:
        raise NbdProtocolError(f"OFFSET_HOLE of {len(payload)} bytes (exactly 12)",
                               field="chunk length", offset=base)
    offset, length = _HOLE.unpack_from(payload)
    if not length:
        raise NbdProtocolError("OFFSET_HOLE of 0 bytes", field="hole size", offset=base + 8)
    return Hole(int(offset), int(length))


class BlockStatus(NamedTuple):
    """NBD_REPLY_TYPE_BLOCK_STATUS: a context id and its (length, flags) extents."""
    context_id: int
    extents: tuple[tuple[int, int], ...]


def pack_block_status(handle: int, context_id: int,
                      extents: tuple[tuple[int, int], ...] | list[tuple[int, int]],
                      flags: int = 0) -> bytes:
    payload = _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return pack_chunk(handle, NBD_REPLY_TYPE_BLOCK_STATUS, payload, flags)


def parse_block_status(payload: bytes | bytearray | memoryview, base: int = 0) -> BlockStatus:
    n = len(payload)
    if n < 12 or (n - 4) % 8:
        raise NbdProtocolError(f"BLOCK_STATUS of {n} bytes (4 + a positive multiple of 8)",
                               field="chunk length", offset=base)
    (cid,) = _U32.unpack_from(payload)
    extents = []
    for pos in range(4, n, 8):
        length, flags = _EXTENT.unpack_from(payload, pos)
        if not length:
            raise NbdProtocolError("block status extent of length 0",
                                   field="extent length", offset=base + pos)
        extents.append((int(length), int(flags)))
    return BlockStatus(int(cid), tuple(extents))


class ChunkError(NamedTuple):
    """NBD_REPLY_TYPE_ERROR (``offset`` None) or NBD_REPLY_TYPE_ERROR_OFFSET."""
    error: int
    message: str
    offset: int | None = None


def pack_error_chunk(handle: int, error: int, message: str = "",
                     flags: int = NBD_REPLY_FLAG_DONE, offset: int | None = None) -> bytes:
    msg = encode_string(message[:1024], "message")
    payload = _ERR.pack(error, len(msg)) + msg
    if offset is None:
        return pack_chunk(handle, NBD_REPLY_TYPE_ERROR, payload, flags)
    return pack_chunk(handle, NBD_REPLY_TYPE_ERROR_OFFSET, payload + _U64.pack(offset),
                      flags)


def parse_error_chunk(payload: bytes | bytearray | memoryview, chunk_type: int,
                      base: int = 0) -> ChunkError:
    """Any error chunk (type with bit 15): the error, the message and, for ERROR_OFFSET,
    the offset.  Unknown error types keep their trailing fields unread."""
    _need(payload, 6, "error chunk", base)
    error, mlen = _ERR.unpack_from(payload)
    if not error:
        raise NbdProtocolError("error chunk with error 0", field="error", offset=base)
    if 6 + mlen > len(payload):
        raise NbdProtocolError(f"message length {mlen} runs past the chunk",
                               field="message length", offset=base + 4)
    msg = _string(payload[6:6 + mlen], "message", base + 6)
    if chunk_type != NBD_REPLY_TYPE_ERROR_OFFSET:
        return ChunkError(int(error), msg)
    if len(payload) != 6 + mlen + 8:
        raise NbdProtocolError("ERROR_OFFSET without exactly 8 bytes of offset",
                               field="chunk length", offset=base)
    (offset,) = _U64.unpack_from(payload, 6 + mlen)
    return ChunkError(int(error), msg, int(offset))


# ============================================================================ errno
_TO_NBD = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM, _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO, _errno.ENOMEM: NBD_ENOMEM, _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW, _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP, _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}
_FROM_NBD = {
    NBD_EPERM: _errno.EPERM, NBD_EIO: _errno.EIO, NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL, NBD_ENOSPC: _errno.ENOSPC, NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP, NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def to_nbd_error(os_errno: int | None) -> int:
    """The NBD error for a host errno (EDQUOT/EFBIG are ENOSPC as the spec says; anything
    without an NBD value is EINVAL, never 0)."""
    return _TO_NBD.get(os_errno or 0, NBD_EINVAL)


def from_nbd_error(nbd_error: int) -> int:
    """The host errno for an NBD error value (unknown values: EIO)."""
    return _FROM_NBD.get(nbd_error, _errno.EIO)

__all__ = [
    "BlockStatus",
    "ChunkError",
    "ChunkHeader",
    "Hole",
    "Request",
    "SimpleReply",
    "from_nbd_error",
    "pack_block_status",
    "pack_chunk",
    "pack_chunk_header",
    "pack_error_chunk",
    "pack_none_chunk",
    "pack_offset_data",
    "pack_offset_data_header",
    "pack_offset_hole",
    "pack_request",
    "pack_simple_reply",
    "parse_block_status",
    "parse_chunk_header",
    "parse_error_chunk",
    "parse_offset_data",
    "parse_offset_data_header",
    "parse_offset_hole",
    "parse_request",
    "parse_simple_reply",
    "reply_magic",
    "to_nbd_error",
]
