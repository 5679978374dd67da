"""The NBD wire codec (diskimg.nbd.protocol): every record round-trips, and hostile bytes
end in NbdProtocolError naming the field and the stream offset (never another exception)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskimg import DiskImgError
from diskimg.nbd import protocol as p
from diskimg.nbd.protocol import NbdProtocolError

BASE = 1000  # stream offset of the record under test


def test_constants_match_the_spec() -> None:
    # magics and numbers as written in the spec (doc/proto.md)
    assert p.pack_server_greeting(0)[:16] == b"NBDMAGICIHAVEOPT"
    assert p.NBD_REP_MAGIC == 0x0003E889045565A9
    assert (p.NBD_REQUEST_MAGIC, p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_STRUCTURED_REPLY_MAGIC) == (
        0x25609513, 0x67446698, 0x668E33EF)
    assert (p.NBD_OPT_EXPORT_NAME, p.NBD_OPT_ABORT, p.NBD_OPT_LIST, p.NBD_OPT_STARTTLS,
            p.NBD_OPT_INFO, p.NBD_OPT_GO, p.NBD_OPT_STRUCTURED_REPLY,
            p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT) == (1, 2, 3, 5, 6, 7, 8,
                                                                        9, 10)
    assert (p.NBD_REP_ERR_UNSUP, p.NBD_REP_ERR_INVALID, p.NBD_REP_ERR_TLS_REQD,
            p.NBD_REP_ERR_TOO_BIG) == (2**31 + 1, 2**31 + 3, 2**31 + 5, 2**31 + 9)
    assert (p.NBD_CMD_READ, p.NBD_CMD_WRITE, p.NBD_CMD_DISC, p.NBD_CMD_FLUSH, p.NBD_CMD_TRIM,
            p.NBD_CMD_CACHE, p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_BLOCK_STATUS) == tuple(range(8))
    assert (p.NBD_REPLY_TYPE_ERROR, p.NBD_REPLY_TYPE_ERROR_OFFSET) == (2**15 + 1, 2**15 + 2)
    assert (p.NBD_FLAG_CAN_MULTI_CONN, p.NBD_FLAG_SEND_CACHE, p.NBD_FLAG_SEND_FAST_ZERO) == (
        256, 1024, 2048)
    assert (p.NBD_EPERM, p.NBD_EIO, p.NBD_ENOMEM, p.NBD_EINVAL, p.NBD_ENOSPC, p.NBD_EOVERFLOW,
            p.NBD_ENOTSUP, p.NBD_ESHUTDOWN) == (1, 5, 12, 22, 28, 75, 95, 108)
    assert issubclass(NbdProtocolError, DiskImgError)


def test_handshake_round_trips() -> None:
    g = p.pack_server_greeting(p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES)
    assert len(g) == p.SERVER_GREETING_SIZE
    assert p.parse_server_greeting(g) == 3
    assert p.parse_client_flags(p.pack_client_flags(3)) == 3
    assert p.parse_export_name_reply(p.pack_export_name_reply(1 << 40, 0x4ED, True)) == (
        1 << 40, 0x4ED)
    assert len(p.pack_export_name_reply(5, 1, False)) == 10 + 124


def test_option_requests_round_trip() -> None:
    hdr = p.pack_option_header(p.NBD_OPT_GO, 77)
    assert p.parse_option_header(hdr) == (p.NBD_OPT_GO, 77)
    assert p.pack_option(p.NBD_OPT_LIST) == p.pack_option_header(p.NBD_OPT_LIST, 0)
    assert p.parse_export_name_option(p.pack_export_name_option("dïsk")) == "dïsk"
    p.parse_empty_option(b"", p.NBD_OPT_ABORT)
    req = p.pack_info_request("exp", (p.NBD_INFO_NAME, p.NBD_INFO_BLOCK_SIZE))
    assert p.parse_info_request(req) == p.InfoRequest("exp", (1, 3))
    assert p.parse_info_request(p.pack_info_request("")) == ("", ())
    mc = p.pack_meta_context_request("", ("base:allocation", "qemu:dirty-bitmap:b0"))
    assert p.parse_meta_context_request(mc) == ("", ("base:allocation",
                                                     "qemu:dirty-bitmap:b0"))
    assert p.parse_meta_context_request(p.pack_meta_context_request("x")) == ("x", ())


def test_option_replies_round_trip() -> None:
    raw = p.pack_option_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, p.pack_info_export(512, 3))
    h = p.parse_option_reply_header(raw)
    assert h == (p.NBD_OPT_GO, p.NBD_REP_INFO, 12) and not h.is_error
    infos: list[p.Info] = [p.InfoExport(1 << 33, 0x4ED), p.InfoName("n"),
                           p.InfoDescription("a disk"), p.InfoBlockSize(1, 4096, 1 << 25),
                           p.InfoUnknown(99, b"xyz")]
    for info in infos:
        assert p.parse_info(p.pack_info(info)) == info
    assert p.parse_rep_server(p.pack_rep_server("a", "desc")) == ("a", "desc")
    assert p.parse_rep_meta_context(p.pack_rep_meta_context(7, "base:allocation")) == (
        7, "base:allocation")
    err = p.pack_rep_error(p.NBD_OPT_GO, p.NBD_REP_ERR_UNKNOWN, "no export 'x'")
    eh = p.parse_option_reply_header(err)
    assert eh.is_error and eh.reply_type == p.NBD_REP_ERR_UNKNOWN
    assert p.parse_rep_error_message(err[20:]) == "no export 'x'"


def test_transmission_round_trips() -> None:
    raw = p.pack_request(p.NBD_CMD_WRITE, 0xDEADBEEF12345678, 1 << 40, 4096,
                         p.NBD_CMD_FLAG_FUA)
    assert len(raw) == p.REQUEST_SIZE
    assert p.parse_request(raw) == (1, 1, 0xDEADBEEF12345678, 1 << 40, 4096)
    sr = p.pack_simple_reply(42, p.NBD_EIO)
    assert p.reply_magic(sr) == p.NBD_SIMPLE_REPLY_MAGIC
    assert p.parse_simple_reply(sr) == (5, 42)
    data = p.pack_offset_data(9, 512, b"abc", p.NBD_REPLY_FLAG_DONE)
    ch = p.parse_chunk_header(data)
    assert ch == (1, p.NBD_REPLY_TYPE_OFFSET_DATA, 9, 11) and ch.done and not ch.is_error
    off, view = p.parse_offset_data(data[20:])
    assert (off, bytes(view)) == (512, b"abc")
    hole = p.pack_offset_hole(9, 1024, 65536)
    assert p.parse_offset_hole(hole[20:]) == (1024, 65536)
    bs = p.pack_block_status(3, 2, [(4096, 3), (512, 0)], p.NBD_REPLY_FLAG_DONE)
    assert p.parse_block_status(bs[20:]) == (2, ((4096, 3), (512, 0)))
    e = p.pack_error_chunk(3, p.NBD_EINVAL, "bad")
    eh = p.parse_chunk_header(e)
    assert eh.is_error and eh.done
    assert p.parse_error_chunk(e[20:], eh.type) == (22, "bad", None)
    eo = p.pack_error_chunk(3, p.NBD_EIO, "", 0, offset=77)
    assert p.parse_error_chunk(eo[20:], p.NBD_REPLY_TYPE_ERROR_OFFSET) == (5, "", 77)
    none = p.pack_none_chunk(3)
    assert p.parse_chunk_header(none) == (1, 0, 3, 0)


def test_errno_mapping() -> None:
    assert p.to_nbd_error(errno.EDQUOT) == p.to_nbd_error(errno.EFBIG) == p.NBD_ENOSPC
    assert p.to_nbd_error(errno.EROFS) == p.NBD_EPERM
    assert p.to_nbd_error(errno.ENOENT) == p.NBD_EINVAL     # no NBD value: EINVAL, never 0
    assert p.to_nbd_error(None) == p.NBD_EINVAL
    for nbd_err in (1, 5, 12, 22, 28, 75, 95, 108):
        assert p.to_nbd_error(p.from_nbd_error(nbd_err)) == nbd_err
    assert p.from_nbd_error(9999) == errno.EIO


def _fails(fn: Callable[..., Any], *args: Any, field: str, offset: int) -> str:
    with pytest.raises(NbdProtocolError) as ei:
        fn(*args)
    assert ei.value.field == field
    assert ei.value.offset == offset, str(ei.value)
    assert field in str(ei.value) and str(offset) in str(ei.value)
    return str(ei.value)


U32 = struct.Struct(">I").pack


def test_hostile_handshake_bytes() -> None:
    g = bytearray(p.pack_server_greeting(1))
    g[3] ^= 1
    _fails(p.parse_server_greeting, bytes(g), BASE, field="magic", offset=BASE)
    old = struct.pack(">QQ", p.NBDMAGIC, p.NBD_CLISERV_MAGIC) + bytes(2)
    assert "oldstyle" in _fails(p.parse_server_greeting, old, BASE, field="option magic",
                                offset=BASE + 8)
    _fails(p.parse_server_greeting, b"NBDMAG", BASE, field="greeting", offset=BASE + 6)
    _fails(p.parse_client_flags, U32(4), BASE, field="client flags", offset=BASE)
    # NO_ZEROES only when the server offered it
    _fails(p.parse_client_flags, U32(2), BASE, 1, field="client flags", offset=BASE)
    bad = struct.pack(">QII", 0x1122334455667788, 7, 0)
    _fails(p.parse_option_header, bad, BASE, field="magic", offset=BASE)
    huge = p.pack_option_header(p.NBD_OPT_GO, 0xFFFFFFFF)
    _fails(p.parse_option_header, huge, BASE, field="option length", offset=BASE + 12)
    _fails(p.parse_empty_option, b"x", p.NBD_OPT_LIST, BASE, field="option length",
           offset=BASE)
    _fails(p.parse_export_name_option, b"a\0b", BASE, field="export name", offset=BASE + 1)
    _fails(p.parse_export_name_option, b"ab\xff", BASE, field="export name", offset=BASE + 2)
    _fails(p.parse_export_name_option, b"a" * 4097, BASE, field="export name", offset=BASE)


def test_hostile_option_payloads() -> None:
    # a name length past the payload, or past 4096
    _fails(p.parse_info_request, U32(10) + b"abc", BASE, field="export name length",
           offset=BASE)
    _fails(p.parse_info_request, U32(1 << 31), BASE, field="export name length",
           offset=BASE)
    # the info request count does not match the bytes left
    _fails(p.parse_info_request, U32(0) + b"\x00\x05\x00\x01", BASE,
           field="information request count", offset=BASE + 4)
    _fails(p.parse_info_request, U32(0), BASE, field="information request count",
           offset=BASE + 4)
    # a query count the payload cannot hold (no allocation for 4 G queries)
    _fails(p.parse_meta_context_request, U32(0) + U32(0xFFFFFFFF), BASE, field="query count",
           offset=BASE + 4)
    _fails(p.parse_meta_context_request, U32(0) + U32(1) + U32(99) + b"x", BASE,
           field="query length", offset=BASE + 8)
    _fails(p.parse_meta_context_request, U32(0) + U32(0) + b"junk", BASE,
           field="option length", offset=BASE + 8)


def test_hostile_option_replies() -> None:
    bad = struct.pack(">QIII", p.IHAVEOPT, 1, 1, 0)
    _fails(p.parse_option_reply_header, bad, BASE, field="magic", offset=BASE)
    big = struct.pack(">QIII", p.NBD_REP_MAGIC, 1, 1, 1 << 30)
    _fails(p.parse_option_reply_header, big, BASE, field="reply length", offset=BASE + 16)
    _fails(p.parse_info, b"\x00\x00" + bytes(9), BASE, field="reply length", offset=BASE)
    _fails(p.parse_info, p.pack_info_export(5, 0), BASE, field="transmission flags",
           offset=BASE + 10)
    _fails(p.parse_info, p.pack_info_block_size(3, 4096, 4096), BASE,
           field="minimum block size", offset=BASE + 2)
    _fails(p.parse_info, p.pack_info_block_size(512, 256, 4096), BASE,
           field="preferred block size", offset=BASE + 6)
    _fails(p.parse_info, p.pack_info_block_size(512, 4096, 1000), BASE,
           field="maximum block size", offset=BASE + 10)
    _fails(p.parse_rep_meta_context, U32(1), BASE, field="context name", offset=BASE + 4)
    _fails(p.parse_rep_server, U32(5) + b"ab", BASE, field="export name length",
           offset=BASE)
    _fails(p.parse_export_name_reply, bytes(10), BASE, field="transmission flags",
           offset=BASE + 8)


def test_hostile_transmission_bytes() -> None:
    r = bytearray(p.pack_request(p.NBD_CMD_READ, 1, 0, 512))
    r[0] ^= 0xFF
    _fails(p.parse_request, bytes(r), BASE, field="magic", offset=BASE)
    w = p.pack_request(p.NBD_CMD_WRITE, 1, 0, p.NBD_MAX_BUFFER_SIZE + 1)
    _fails(p.parse_request, w, BASE, field="length", offset=BASE + 24)
    # a READ of any length parses: the server answers it with an error reply
    assert p.parse_request(p.pack_request(p.NBD_CMD_READ, 1, 0, 0xFFFFFFFF)).length == (
        0xFFFFFFFF)
    _fails(p.parse_request, bytes(27), BASE, field="request header", offset=BASE + 27)
    _fails(p.reply_magic, U32(0x12345678), BASE, field="magic", offset=BASE)
    _fails(p.parse_simple_reply, p.pack_chunk_header(1, 0, 0, 1)[:16], BASE, field="magic",
           offset=BASE)
    _fails(p.parse_chunk_header, p.pack_chunk_header(1, 1, 1 << 31), BASE,
           field="chunk length", offset=BASE + 16)
    _fails(p.parse_chunk_header, p.pack_chunk_header(1, 0, 4, 1), BASE, field="chunk type",
           offset=BASE + 6)
    _fails(p.parse_chunk_header, p.pack_chunk_header(1, 0, 0, 0), BASE, field="chunk type",
           offset=BASE + 6)
    _fails(p.parse_offset_data, bytes(8), BASE, field="chunk length", offset=BASE)
    _fails(p.parse_offset_data_header, 8, bytes(8), BASE, field="chunk length", offset=BASE)
    _fails(p.parse_offset_data_header, 9, bytes(7), BASE, field="offset", offset=BASE)
    _fails(p.parse_offset_hole, bytes(11), BASE, field="chunk length", offset=BASE)
    _fails(p.parse_offset_hole, bytes(12), BASE, field="hole size", offset=BASE + 8)
    _fails(p.parse_block_status, bytes(4), BASE, field="chunk length", offset=BASE)
    _fails(p.parse_block_status, bytes(13), BASE, field="chunk length", offset=BASE)
    _fails(p.parse_block_status, U32(1) + U32(512) + U32(0) + U32(0) + U32(0), BASE,
           field="extent length", offset=BASE + 12)
    _fails(p.parse_error_chunk, b"\0\0\0\0\0\0", p.NBD_REPLY_TYPE_ERROR, BASE, field="error",
           offset=BASE)
    _fails(p.parse_error_chunk, U32(5) + b"\x00\x10abc", p.NBD_REPLY_TYPE_ERROR, BASE,
           field="message length", offset=BASE + 4)
    _fails(p.parse_error_chunk, U32(5) + b"\x00\x00" + bytes(4),
           p.NBD_REPLY_TYPE_ERROR_OFFSET, BASE, field="chunk length", offset=BASE)


def test_packers_refuse_what_the_spec_forbids() -> None:
    with pytest.raises(ValueError):
        p.pack_info_request("a\0b")
    with pytest.raises(ValueError):
        p.pack_rep_server("x" * 4097)


_PARSERS: list[Callable[[bytes], object]] = [
    lambda b: p.parse_server_greeting(b, BASE),
    lambda b: p.parse_client_flags(b, BASE),
    lambda b: p.parse_option_header(b, BASE),
    lambda b: p.parse_export_name_option(b, BASE),
    lambda b: p.parse_info_request(b, BASE),
    lambda b: p.parse_meta_context_request(b, BASE),
    lambda b: p.parse_option_reply_header(b, BASE),
    lambda b: p.parse_rep_server(b, BASE),
    lambda b: p.parse_info(b, BASE),
    lambda b: p.parse_rep_meta_context(b, BASE),
    lambda b: p.parse_export_name_reply(b, BASE),
    lambda b: p.parse_request(b, BASE),
    lambda b: p.parse_simple_reply(b, BASE),
    lambda b: p.parse_chunk_header(b, BASE),
    lambda b: p.parse_offset_data(b, BASE),
    lambda b: p.parse_offset_hole(b, BASE),
    lambda b: p.parse_block_status(b, BASE),
    lambda b: p.parse_error_chunk(b, p.NBD_REPLY_TYPE_ERROR_OFFSET, BASE),
]


@given(st.binary(max_size=64), st.integers(0, len(_PARSERS) - 1))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes, which: int) -> None:
    try:
        _PARSERS[which](data)
    except NbdProtocolError as e:
        assert e.offset is not None and BASE <= e.offset <= BASE + len(data)
        assert e.field


def test_offset_data_header_is_the_one_rule_for_the_streamed_read_chunk() -> None:
    """The client streams an OFFSET_DATA chunk's data into the caller's buffer: it parses
    the 8-byte offset with the codec's parse_offset_data_header, which pack_offset_data_header
    inverts, and holds no second struct for those bytes."""
    wire = p.pack_offset_data_header(7, 1 << 40, 4096)
    ch = p.parse_chunk_header(wire[:20])
    assert p.parse_offset_data_header(ch.length, wire[20:28], 20) == (1 << 40, 4096)
    assert p.parse_offset_data(wire[20:] + bytes(4096))[0] == 1 << 40
    import inspect

    from diskimg.nbd import client
    src = inspect.getsource(client)
    assert "import struct" not in src and "parse_offset_data_header" in src
