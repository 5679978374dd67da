"""The NBD handshake records: greetings and flags, option requests and their payloads,
option replies (ACK, SERVER, INFO, META_CONTEXT, errors) and the EXPORT_NAME reply.
Re-exported by :mod:`diskimg.nbd.protocol`."""

from __future__ import annotations

import struct
from typing import NamedTuple

from .wire import (
    CLIENT_FLAGS_SIZE,
    EXPORT_NAME_REPLY_PADDING,
    EXPORT_NAME_REPLY_SIZE,
    IHAVEOPT,
    NBDMAGIC,
    NBD_CLIENT_FLAGS_KNOWN,
    NBD_CLISERV_MAGIC,
    NBD_FLAG_HAS_FLAGS,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_MAX_INFO_REQUESTS,
    NBD_MAX_META_QUERIES,
    NBD_MAX_OPTION_LENGTH,
    NBD_MAX_OPTION_REPLY_LENGTH,
    NBD_REP_FLAG_ERROR,
    NBD_REP_MAGIC,
    NbdProtocolError,
    OPTION_HEADER_SIZE,
    OPTION_REPLY_HEADER_SIZE,
    SERVER_GREETING_SIZE,
    _BLOCK_SIZE,
    _EXPORT,
    _GREETING,
    _OPT,
    _REP,
    _U16,
    _U32,
    _len_string,
    _need,
    _pack_len_string,
    _string,
    encode_string,
)


# ========================================================================= handshake
def pack_server_greeting(handshake_flags: int) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def parse_server_greeting(data: bytes | bytearray | memoryview, base: int = 0) -> int:
    """The 18-byte newstyle greeting; returns the handshake flags."""
    _need(data, SERVER_GREETING_SIZE, "greeting", base)
    magic, opt_magic, flags = _GREETING.unpack_from(data)
    if magic != NBDMAGIC:
        raise NbdProtocolError(f"bad greeting magic {magic:#x}", field="magic", offset=base)
    if opt_magic != IHAVEOPT:
        what = "an oldstyle server" if opt_magic == NBD_CLISERV_MAGIC else "bad magic"
        raise NbdProtocolError(f"{what}: {opt_magic:#x} where IHAVEOPT belongs",
                               field="option magic", offset=base + 8)
    return int(flags)


def pack_client_flags(flags: int) -> bytes:
    return _U32.pack(flags)


def parse_client_flags(data: bytes | bytearray | memoryview, base: int = 0,
                       allowed: int = NBD_CLIENT_FLAGS_KNOWN) -> int:
    """The client's 32 flag bits; bits outside ``allowed`` (the ones the server offered)
    are an error (the spec: the server MUST drop the connection)."""
    _need(data, CLIENT_FLAGS_SIZE, "client flags", base)
    (flags,) = _U32.unpack_from(data)
    if flags & ~allowed:
        raise NbdProtocolError(f"unknown client flags {flags & ~allowed:#x}",
                               field="client flags", offset=base)
    return int(flags)


# ================================================================ option requests
class OptionHeader(NamedTuple):
    option: int
    length: int


def pack_option_header(option: int, length: int) -> bytes:
    return _OPT.pack(IHAVEOPT, option, length)


def pack_option(option: int, payload: bytes = b"") -> bytes:
    return _OPT.pack(IHAVEOPT, option, len(payload)) + payload


def parse_option_header(data: bytes | bytearray | memoryview, base: int = 0,
                        max_length: int = NBD_MAX_OPTION_LENGTH) -> OptionHeader:
    _need(data, OPTION_HEADER_SIZE, "option header", base)
    magic, option, length = _OPT.unpack_from(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"bad option magic {magic:#x}", field="magic", offset=base)
    if length > max_length:
        raise NbdProtocolError(f"option {option} payload of {length} bytes is more than "
                               f"{max_length}", field="option length", offset=base + 12)
    return OptionHeader(int(option), int(length))


def pack_export_name_option(name: str) -> bytes:
    """The payload of NBD_OPT_EXPORT_NAME: the name, its length from the header."""
    return encode_string(name, "export name")


def parse_export_name_option(payload: bytes | bytearray | memoryview, base: int = 0) -> str:
    return _string(payload, "export name", base)


def parse_empty_option(payload: bytes | bytearray | memoryview, option: int, base: int = 0) -> None:
    """ABORT, LIST, STARTTLS, STRUCTURED_REPLY (and EXTENDED_HEADERS) carry no data."""
    if len(payload):
        raise NbdProtocolError(f"option {option} takes no data, got {len(payload)} bytes",
                               field="option length", offset=base)


class InfoRequest(NamedTuple):
    """The payload of NBD_OPT_INFO and NBD_OPT_GO."""
    name: str
    requests: tuple[int, ...] = ()


def pack_info_request(name: str, requests: tuple[int, ...] = ()) -> bytes:
    return (_pack_len_string(name, "export name") + _U16.pack(len(requests))
            + b"".join(_U16.pack(r) for r in requests))


def parse_info_request(payload: bytes | bytearray | memoryview, base: int = 0) -> InfoRequest:
    name, pos = _len_string(payload, 0, "export name", base)
    _need(payload[pos:], 2, "information request count", base + pos)
    (count,) = _U16.unpack_from(payload, pos)
    if count > NBD_MAX_INFO_REQUESTS or pos + 2 + 2 * count != len(payload):
        raise NbdProtocolError(f"{count} information requests do not fill the "
                               f"{len(payload) - pos - 2} bytes left",
                               field="information request count", offset=base + pos)
    reqs = struct.unpack_from(f">{count}H", payload, pos + 2)
    return InfoRequest(name, tuple(int(r) for r in reqs))


class MetaContextRequest(NamedTuple):
    """The payload of NBD_OPT_SET_META_CONTEXT and NBD_OPT_LIST_META_CONTEXT."""
    name: str
    queries: tuple[str, ...] = ()


def pack_meta_context_request(name: str, queries: tuple[str, ...] = ()) -> bytes:
    return (_pack_len_string(name, "export name") + _U32.pack(len(queries))
            + b"".join(_pack_len_string(q, "query") for q in queries))


def parse_meta_context_request(payload: bytes | bytearray | memoryview,
                               base: int = 0) -> MetaContextRequest:
    name, pos = _len_string(payload, 0, "export name", base)
    _need(payload[pos:], 4, "query count", base + pos)
    (count,) = _U32.unpack_from(payload, pos)
    # every query takes at least its 4-byte length
    if count > NBD_MAX_META_QUERIES or count * 4 > len(payload) - pos - 4:
        raise NbdProtocolError(f"{count} queries cannot fit the {len(payload) - pos - 4} "
                               "bytes left", field="query count", offset=base + pos)
    pos += 4
    queries = []
    for _ in range(count):
        q, pos = _len_string(payload, pos, "query", base)
        queries.append(q)
    if pos != len(payload):
        raise NbdProtocolError(f"{len(payload) - pos} bytes after the last query",
                               field="option length", offset=base + pos)
    return MetaContextRequest(name, tuple(queries))


# ================================================================== option replies
class OptionReplyHeader(NamedTuple):
    option: int
    reply_type: int
    length: int

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & NBD_REP_FLAG_ERROR)


def pack_option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return _REP.pack(NBD_REP_MAGIC, option, reply_type, len(payload)) + payload


def parse_option_reply_header(data: bytes | bytearray | memoryview, base: int = 0,
                              max_length: int = NBD_MAX_OPTION_REPLY_LENGTH
                              ) -> OptionReplyHeader:
    _need(data, OPTION_REPLY_HEADER_SIZE, "option reply header", base)
    magic, option, rtype, length = _REP.unpack_from(data)
    if magic != NBD_REP_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}", field="magic",
                               offset=base)
    if length > max_length:
        raise NbdProtocolError(f"option reply of {length} bytes is more than {max_length}",
                               field="reply length", offset=base + 16)
    return OptionReplyHeader(int(option), int(rtype), int(length))


def pack_rep_error(option: int, reply_type: int, message: str = "") -> bytes:
    """An error reply (``reply_type`` has bit 31 set) with a message for a human."""
    assert reply_type & NBD_REP_FLAG_ERROR, reply_type
    return pack_option_reply(option, reply_type, encode_string(message[:1024], "message"))


def parse_rep_error_message(payload: bytes | bytearray | memoryview, base: int = 0) -> str:
    return _string(payload, "error message", base)


class ServerEntry(NamedTuple):
    """NBD_REP_SERVER: one export of NBD_OPT_LIST."""
    name: str
    description: str = ""


def pack_rep_server(name: str, description: str = "") -> bytes:
    """The payload of NBD_REP_SERVER."""
    return _pack_len_string(name, "export name") + encode_string(description, "description")


def parse_rep_server(payload: bytes | bytearray | memoryview, base: int = 0) -> ServerEntry:
    name, pos = _len_string(payload, 0, "export name", base)
    return ServerEntry(name, _string(payload[pos:], "description", base + pos))


class InfoExport(NamedTuple):
    size: int
    flags: int


class InfoName(NamedTuple):
    name: str


class InfoDescription(NamedTuple):
    description: str


class InfoBlockSize(NamedTuple):
    minimum: int
    preferred: int
    maximum: int


class InfoUnknown(NamedTuple):
    info_type: int
    data: bytes


Info = InfoExport | InfoName | InfoDescription | InfoBlockSize | InfoUnknown


def pack_info_export(size: int, flags: int) -> bytes:
    """The payload of NBD_REP_INFO with NBD_INFO_EXPORT."""
    return _U16.pack(NBD_INFO_EXPORT) + _EXPORT.pack(size, flags)


def pack_info_name(name: str) -> bytes:
    return _U16.pack(NBD_INFO_NAME) + encode_string(name, "export name")


def pack_info_description(description: str) -> bytes:
    return _U16.pack(NBD_INFO_DESCRIPTION) + encode_string(description, "description")


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_info(info: Info) -> bytes:
    if isinstance(info, InfoExport):
        return pack_info_export(info.size, info.flags)
    if isinstance(info, InfoName):
        return pack_info_name(info.name)
    if isinstance(info, InfoDescription):
        return pack_info_description(info.description)
    if isinstance(info, InfoBlockSize):
        return pack_info_block_size(info.minimum, info.preferred, info.maximum)
    return _U16.pack(info.info_type) + info.data


def parse_info(payload: bytes | bytearray | memoryview, base: int = 0) -> Info:
    """The payload of NBD_REP_INFO (unknown information types are returned, not refused:
    the spec tells clients to ignore them)."""
    _need(payload, 2, "information type", base)
    (itype,) = _U16.unpack_from(payload)
    rest = payload[2:]
    if itype == NBD_INFO_EXPORT:
        if len(rest) != 10:
            raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes, not 12",
                                   field="reply length", offset=base)
        size, flags = _EXPORT.unpack_from(rest)
        if not flags & NBD_FLAG_HAS_FLAGS:
            raise NbdProtocolError("transmission flags without NBD_FLAG_HAS_FLAGS",
                                   field="transmission flags", offset=base + 10)
        return InfoExport(int(size), int(flags))
    if itype == NBD_INFO_NAME:
        return InfoName(_string(rest, "export name", base + 2))
    if itype == NBD_INFO_DESCRIPTION:
        return InfoDescription(_string(rest, "description", base + 2))
    if itype == NBD_INFO_BLOCK_SIZE:
        if len(rest) != 12:
            raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, not 14",
                                   field="reply length", offset=base)
        _, mn, pref, mx = _BLOCK_SIZE.unpack_from(payload)
        if not (mn and mn & (mn - 1) == 0 and mn <= 65536):
            raise NbdProtocolError(f"minimum block size {mn} is not a power of 2 up to "
                                   "64 KiB", field="minimum block size", offset=base + 2)
        if not (pref >= max(mn, 512) and pref & (pref - 1) == 0):
            raise NbdProtocolError(f"preferred block size {pref} is not a power of 2 of "
                                   "at least the minimum and 512",
                                   field="preferred block size", offset=base + 6)
        if mx < mn or (mx != 0xFFFFFFFF and mx % mn):
            raise NbdProtocolError(f"maximum block size {mx} is not a multiple of the "
                                   f"minimum {mn}", field="maximum block size",
                                   offset=base + 10)
        return InfoBlockSize(int(mn), int(pref), int(mx))
    return InfoUnknown(int(itype), bytes(rest))


class MetaContext(NamedTuple):
    """NBD_REP_META_CONTEXT: a context's id (chosen by the server) and its name."""
    context_id: int
    name: str


def pack_rep_meta_context(context_id: int, name: str) -> bytes:
    """The payload of NBD_REP_META_CONTEXT."""
    return _U32.pack(context_id) + encode_string(name, "context name")


def parse_rep_meta_context(payload: bytes | bytearray | memoryview, base: int = 0) -> MetaContext:
    _need(payload, 4, "context id", base)
    (cid,) = _U32.unpack_from(payload)
    if len(payload) == 4:
        raise NbdProtocolError("meta context without a name", field="context name",
                               offset=base + 4)
    return MetaContext(int(cid), _string(payload[4:], "context name", base + 4))


class ExportNameReply(NamedTuple):
    """The server's answer to NBD_OPT_EXPORT_NAME: export size and transmission flags."""
    size: int
    flags: int


def pack_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    out = _EXPORT.pack(size, flags)
    return out if no_zeroes else out + bytes(EXPORT_NAME_REPLY_PADDING)


def parse_export_name_reply(data: bytes | bytearray | memoryview, base: int = 0) -> ExportNameReply:
    """The first 10 bytes (the 124 zero bytes that may follow are the caller's to skip)."""
    _need(data, EXPORT_NAME_REPLY_SIZE, "export reply", base)
    size, flags = _EXPORT.unpack_from(data)
    if not flags & NBD_FLAG_HAS_FLAGS:
        raise NbdProtocolError("transmission flags without NBD_FLAG_HAS_FLAGS",
                               field="transmission flags", offset=base + 8)
    return ExportNameReply(int(size), int(flags))

__all__ = [
    "ExportNameReply",
    "Info",
    "InfoBlockSize",
    "InfoDescription",
    "InfoExport",
    "InfoName",
    "InfoRequest",
    "InfoUnknown",
    "MetaContext",
    "MetaContextRequest",
    "OptionHeader",
    "OptionReplyHeader",
    "ServerEntry",
    "pack_client_flags",
    "pack_export_name_option",
    "pack_export_name_reply",
    "pack_info",
    "pack_info_block_size",
    "pack_info_description",
    "pack_info_export",
    "pack_info_name",
    "pack_info_request",
    "pack_meta_context_request",
    "pack_option",
    "pack_option_header",
    "pack_option_reply",
    "pack_rep_error",
    "pack_rep_meta_context",
    "pack_rep_server",
    "pack_server_greeting",
    "parse_client_flags",
    "parse_empty_option",
    "parse_export_name_option",
    "parse_export_name_reply",
    "parse_info",
    "parse_info_request",
    "parse_meta_context_request",
    "parse_option_header",
    "parse_option_reply_header",
    "parse_rep_error_message",
    "parse_rep_meta_context",
    "parse_rep_server",
    "parse_server_greeting",
]
