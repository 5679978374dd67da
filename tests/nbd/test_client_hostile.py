"""diskimg's NBD client against a hostile or broken server (a scripted server in the test,
tests/nbd/clientkit.py): bad magic, short replies, huge lengths, wrong cookies, chunks
outside or overlapping the request, missing data, error chunks, stalls and a server that
drips its reply.  Each ends in a :class:`~diskimg.errors.DiskImgError` naming the URL (and
the offset of the request), within the client's timeout: never a hang, never an
allocation the request did not bound, never bytes the server did not send returned as
data."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import DiskImgError, RemoteError
from diskimg.nbd import protocol as p
from diskimg.nbd.client import NbdClient
from tests.nbd.clientkit import Conn, FakeServer, Handler, serve_read

SIZE = 1 << 20
DATA = bytes(range(256)) * (SIZE // 256)
OFF, LEN = 0x1000, 8192
TIMEOUT = 1.0
DONE = p.NBD_REPLY_FLAG_DONE


def _reply(build: Callable[[p.Request], bytes], *, then_close: bool = False) -> Handler:
    """A handler that answers the first READ with ``build(request)``'s bytes (and drops
    the connection after them with ``then_close``); anything else as ``serve_read``."""
    good = serve_read(DATA)

    def handler(c: Conn, r: p.Request) -> None:
        if r.type != p.NBD_CMD_READ:
            good(c, r)
            return
        c.send(build(r))
        if then_close:
            raise ConnectionError("scripted hang-up")
    return handler


def _stall(c: Conn, r: p.Request) -> None:
    c.recv(1)  # no reply: wait until the client gives up and hangs up


def _drip(c: Conn, r: p.Request) -> None:
    """A correct reply, one byte every 0.2 s: each recv is quick, the whole is not."""
    for b in p.pack_offset_data(r.handle, r.offset, DATA[r.offset:r.offset + r.length],
                                DONE):
        c.send(bytes([b]))
        time.sleep(0.2)


HOSTILE_READS: dict[str, tuple[Handler, str]] = {
    "bad magic": (_reply(lambda r: b"\xde\xad\xbe\xef" + bytes(16)), "bad reply magic"),
    "wrong cookie": (_reply(lambda r: p.pack_offset_data(r.handle + 1, r.offset,
                                                         DATA[:r.length], DONE)),
                     "cookie"),
    "huge chunk length": (_reply(lambda r: p.pack_chunk_header(
        r.handle, p.NBD_REPLY_TYPE_OFFSET_DATA, 0xFFFFFFF0, DONE)), "chunk"),
    "chunk longer than the request": (_reply(lambda r: p.pack_offset_data(
        r.handle, r.offset, DATA[:r.length + 512], DONE)), "chunk"),
    "data outside the request": (_reply(lambda r: p.pack_offset_data(
        r.handle, r.offset + r.length, DATA[:512], DONE)), "outside the request"),
    "data before the request": (_reply(lambda r: p.pack_offset_data(
        r.handle, r.offset - 512, DATA[:1024], DONE)), "outside the request"),
    "overlapping chunks": (_reply(lambda r: p.pack_offset_data(
        r.handle, r.offset, DATA[:4096]) + p.pack_offset_hole(r.handle, r.offset + 4095,
                                                              r.length - 4095, DONE)),
        "overlaps"),
    "data missing": (_reply(lambda r: p.pack_offset_data(r.handle, r.offset, DATA[:4096])
                            + p.pack_none_chunk(r.handle)), "unsent"),
    "short reply": (_reply(lambda r: p.pack_offset_data(r.handle, r.offset,
                                                        DATA[:r.length], DONE)[:100],
                           then_close=True), "closed the connection"),
    "data chunk without data": (_reply(lambda r: p.pack_chunk(
        r.handle, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", r.offset), DONE)),
        "OFFSET_DATA of 8 bytes"),
    "hole of length 0": (_reply(lambda r: p.pack_chunk(
        r.handle, p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", r.offset, 0), DONE)),
        "OFFSET_HOLE of 0 bytes"),
    "block status in a read": (_reply(lambda r: p.pack_block_status(
        r.handle, 1, [(r.length, 0)], DONE)), "chunk of type 5"),
    "unknown chunk type": (_reply(lambda r: p.pack_chunk(r.handle, 77, b"x", DONE)),
                           "chunk of type 77"),
    "error offset outside": (_reply(lambda r: p.pack_error_chunk(
        r.handle, p.NBD_EIO, "x", offset=r.offset + r.length)), "outside the request"),
    "error message past its chunk": (_reply(lambda r: p.pack_chunk(
        r.handle, p.NBD_REPLY_TYPE_ERROR, struct.pack(">IH", p.NBD_EIO, 4000) + b"x",
        DONE)), "message length"),
    "simple reply after structured": (_reply(lambda r: p.pack_simple_reply(r.handle)
                                             + DATA[:r.length]), "simple reply"),
    "stall": (_stall, "timed out"),
    "drip": (_drip, "timed out"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_READS))
def test_hostile_read_replies_end_in_an_error_naming_url_and_offset(
        case: str, tmp_path: Path) -> None:
    handler, words = HOSTILE_READS[case]
    with FakeServer(tmp_path, handler, size=SIZE) as srv:
        with NbdClient(srv.url, timeout=TIMEOUT) as cl:
            buf = bytearray(b"\xaa" * LEN)
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as ei:
                cl.read_into(OFF, memoryview(buf))
            assert time.monotonic() - t0 < 3 * TIMEOUT + 1
            msg = str(ei.value)
            assert words in msg and srv.url in msg and f"at offset {OFF:#x}" in msg, msg
            assert ei.value.url == srv.url and ei.value.offset is not None
            # the stream cannot be trusted any more: every later call fails, quickly
            with pytest.raises(RemoteError, match="broken"):
                cl.read_into(0, memoryview(bytearray(512)))


def test_an_error_chunk_fails_that_read_only(tmp_path: Path) -> None:
    """The server's error (with its message and offset) fails the request; the
    connection stays usable and the next read returns the server's bytes."""
    failed: list[p.Request] = []
    good = serve_read(DATA)

    def handler(c: Conn, r: p.Request) -> None:
        if r.type == p.NBD_CMD_READ and r.offset == OFF and not failed:
            failed.append(r)
            c.send(p.pack_offset_data(r.handle, r.offset, DATA[r.offset:r.offset + 512])
                   + p.pack_error_chunk(r.handle, p.NBD_EIO, "disk on fire",
                                        offset=r.offset + 4096))
        else:
            good(c, r)

    with FakeServer(tmp_path, handler, size=SIZE) as srv:
        with diskimg.open(srv.url) as dev:
            with pytest.raises(RemoteError, match="read failed: disk on fire") as ei:
                dev.read(OFF, LEN)
            assert ei.value.offset == OFF + 4096 and ei.value.reason == "Input/output error"
            assert dev.read(OFF, LEN) == DATA[OFF:OFF + LEN]


def _go_reply(*parts: bytes) -> bytes:
    return b"".join(parts)


HOSTILE_HANDSHAKES: dict[str, tuple[dict[str, bytes], str]] = {
    "bad greeting magic": ({"greeting": b"NOTMAGIC" + bytes(10)}, "bad greeting magic"),
    "oldstyle server": ({"greeting": struct.pack(">QQH", p.NBDMAGIC, p.NBD_CLISERV_MAGIC,
                                                 0)}, "oldstyle"),
    "not fixed newstyle": ({"greeting": p.pack_server_greeting(0)}, "fixed newstyle"),
    "no such export": ({"go": p.pack_rep_error(p.NBD_OPT_GO, p.NBD_REP_ERR_UNKNOWN,
                                               "nope")}, "no such export: nope"),
    "huge option reply": ({"go": struct.pack(">QIII", p.NBD_REP_MAGIC, p.NBD_OPT_GO,
                                             p.NBD_REP_INFO, 0xFFFFFFFF)},
                          "more than 65536"),
    "reply to another option": ({"go": p.pack_option_reply(p.NBD_OPT_LIST, p.NBD_REP_ACK)},
                                "where one to option 7 was due"),
    "go without export info": ({"go": p.pack_option_reply(p.NBD_OPT_GO, p.NBD_REP_ACK)},
                               "without NBD_INFO_EXPORT"),
    "bad block sizes": ({"go": p.pack_option_reply(p.NBD_OPT_GO, p.NBD_REP_INFO,
                                                   struct.pack(">HIII", 3, 3, 512, 1 << 20))},
                        "minimum block size 3"),
    "stalled handshake": ({"go": b""}, "timed out"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HANDSHAKES))
def test_hostile_handshakes_end_in_an_error_naming_the_url(case: str, tmp_path: Path) -> None:
    kw, words = HOSTILE_HANDSHAKES[case]
    with FakeServer(tmp_path, serve_read(DATA), size=SIZE, **kw) as srv:  # type: ignore[arg-type]
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            NbdClient(srv.url, timeout=TIMEOUT)
        assert time.monotonic() - t0 < 2 * TIMEOUT + 1
        assert words in str(ei.value) and srv.url in str(ei.value), str(ei.value)
        if case == "no such export":  # through diskimg.open too
            with pytest.raises(DiskImgError, match="could not open export 'disk': no such"):
                diskimg.open(srv.url)


def test_hostile_block_status(tmp_path: Path) -> None:
    """Block status for a context never selected, an extent past the request, too long
    a chunk: errors; a good reply's extents are cut at the request and map data/zero."""
    replies: list[Callable[[p.Request], bytes]] = [
        lambda r: p.pack_block_status(r.handle, 9, [(r.length, 0)], DONE),
        lambda r: p.pack_block_status(r.handle, 1, [(r.length, 0), (512, 3)], DONE),
        lambda r: p.pack_chunk_header(r.handle, p.NBD_REPLY_TYPE_BLOCK_STATUS,
                                      4 + 8 * (r.length + 1), DONE),
        lambda r: p.pack_block_status(r.handle, 1, [(4096, 0), (SIZE, 3)], DONE),
    ]
    words = ["context id 9", "starts past the request", "more than", None]
    for build, want in zip(replies, words, strict=True):
        def handler(c: Conn, r: p.Request, build: Callable[[p.Request], bytes] = build
                    ) -> None:
            if r.type == p.NBD_CMD_BLOCK_STATUS:
                c.send(build(r))
            else:
                serve_read(DATA)(c, r)
        with FakeServer(tmp_path, handler, size=SIZE) as srv:
            with NbdClient(srv.url, timeout=TIMEOUT) as cl:
                if want is None:
                    assert cl.block_status(0, 8192) == [(4096, 0), (4096, 3)]
                    continue
                with pytest.raises(RemoteError, match=want) as ei:
                    cl.block_status(0, 8192)
                assert srv.url in str(ei.value) and ei.value.offset == 0
        (tmp_path / "fake.sock").unlink()


def test_unaligned_io_respects_the_minimum_block_size(tmp_path: Path) -> None:
    """With a 512-byte minimum block, unaligned reads and writes are widened (writes
    read-modify-write): the server sees only aligned requests; the bytes are right."""
    store = bytearray(DATA)

    def handler(c: Conn, r: p.Request) -> None:
        assert r.offset % 512 == 0 and r.length % 512 == 0, r
        if r.type == p.NBD_CMD_WRITE:
            store[r.offset:r.offset + r.length] = c.recv(r.length)
            c.send(p.pack_simple_reply(r.handle))
        elif r.type == p.NBD_CMD_WRITE_ZEROES:
            store[r.offset:r.offset + r.length] = bytes(r.length)
            c.send(p.pack_simple_reply(r.handle))
        elif r.type == p.NBD_CMD_READ:
            c.send(p.pack_offset_data(r.handle, r.offset, bytes(store[r.offset:r.offset
                                                                        + r.length]), DONE))
        else:
            c.send(p.pack_simple_reply(r.handle))

    model = bytearray(DATA)
    with FakeServer(tmp_path, handler, size=SIZE, min_block=512) as srv:
        with diskimg.open(srv.url, "r+", format="raw") as dev:
            assert dev.read(3, 1000) == DATA[3:1003]
            dev.write(700, b"\x01" * 10)
            model[700:710] = b"\x01" * 10
            dev.write(1000, b"\x02" * 5000)
            model[1000:6000] = b"\x02" * 5000
            dev.write_zeroes(100, 3000, may_unmap=False)
            model[100:3100] = bytes(3000)
            dev.flush()
            assert dev.read(0, 8192) == model[:8192]
    assert store == model


def test_an_old_server_without_go_or_structured_replies(tmp_path: Path) -> None:
    """NBD_OPT_GO unknown: NBD_OPT_EXPORT_NAME; no structured replies: simple replies
    (a read's data follows the reply header); no block status: all data.  Bytes written
    and read back equal a model; a simple error reply fails that request only."""
    store = bytearray(DATA)

    def handler(c: Conn, r: p.Request) -> None:
        if r.type == p.NBD_CMD_READ and r.offset == SIZE - 512:
            c.send(p.pack_simple_reply(r.handle, p.NBD_EIO))
        elif r.type == p.NBD_CMD_READ:
            c.send(p.pack_simple_reply(r.handle) + bytes(store[r.offset:r.offset + r.length]))
        elif r.type == p.NBD_CMD_WRITE:
            store[r.offset:r.offset + r.length] = c.recv(r.length)
            c.send(p.pack_simple_reply(r.handle))
        else:
            c.send(p.pack_simple_reply(r.handle))

    model = bytearray(DATA)
    flags = p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_FLUSH  # no WRITE_ZEROES either
    with FakeServer(tmp_path, handler, size=SIZE, old=True, flags=flags) as srv:
        with diskimg.open(srv.url, "r+", format="raw") as dev:
            assert dev.block_status(0, SIZE)[0].data  # no base:allocation: data
            dev.write(10, b"old server")
            model[10:20] = b"old server"
            dev.write_zeroes(30000, 5000, may_unmap=True)  # zeros written as bytes
            model[30000:35000] = bytes(5000)
            assert dev.read(0, 65536) == model[:65536]
            with pytest.raises(RemoteError, match="read failed: Input/output error"):
                dev.read(SIZE - 512, 512)
            assert dev.read(4096, 4096) == model[4096:8192]
        deadline = time.monotonic() + 10  # the server's thread records DISC after close()
        while srv.requests[-1].type != p.NBD_CMD_DISC and time.monotonic() < deadline:
            time.sleep(0.01)
        types = [r.type for r in srv.requests]
        assert p.NBD_CMD_BLOCK_STATUS not in types and types[-1] == p.NBD_CMD_DISC
        assert p.NBD_CMD_WRITE_ZEROES not in types and p.NBD_CMD_FLUSH in types
    assert store == model


def test_a_server_shutting_down_is_left_softly(tmp_path: Path) -> None:
    """NBD_ESHUTDOWN on a request: the client sends NBD_CMD_DISC and uses the connection
    no more; NBD_REP_ERR_SHUTDOWN in the handshake: NBD_OPT_ABORT."""
    def handler(c: Conn, r: p.Request) -> None:
        c.send(p.pack_error_chunk(r.handle, p.NBD_ESHUTDOWN, "going down"))

    with FakeServer(tmp_path, handler, size=SIZE) as srv:
        with NbdClient(srv.url, timeout=TIMEOUT) as cl:
            with pytest.raises(RemoteError, match="read failed: going down"):
                cl.read_into(0, memoryview(bytearray(512)))
            with pytest.raises(RemoteError, match="shutting down"):
                cl.read_into(0, memoryview(bytearray(512)))
        deadline = time.monotonic() + 5
        while srv.requests[-1].type != p.NBD_CMD_DISC and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.type for r in srv.requests] == [p.NBD_CMD_READ, p.NBD_CMD_DISC]
    (tmp_path / "fake.sock").unlink()
    go = p.pack_rep_error(p.NBD_OPT_GO, p.NBD_REP_ERR_SHUTDOWN, "bye")
    with FakeServer(tmp_path, serve_read(DATA), size=SIZE, go=go) as srv:
        with pytest.raises(RemoteError, match="the server is shutting down: bye"):
            NbdClient(srv.url, timeout=TIMEOUT)


def test_the_url_x_timeout_bounds_every_wait(tmp_path: Path) -> None:
    """``?x-timeout=SECONDS``: diskimg.open (and every command) gives up on a stalled
    server after that many seconds, not the default 30; a bad value is refused naming
    the parameter before anything connects."""
    def handler(c: Conn, r: p.Request) -> None:
        if r.type == p.NBD_CMD_READ and r.offset == OFF:
            _stall(c, r)
        elif r.type == p.NBD_CMD_READ:
            c.send(p.pack_offset_data(r.handle, r.offset, DATA[r.offset:r.offset + r.length],
                                      DONE))
        else:
            c.send(p.pack_simple_reply(r.handle))

    with FakeServer(tmp_path, handler, size=SIZE) as srv:
        with diskimg.open(srv.url + "&x-timeout=0.5", format="raw") as dev:
            assert dev.host.client.timeout == 0.5  # type: ignore[attr-defined]
            t0 = time.monotonic()
            with pytest.raises(RemoteError, match="timed out after 0.5 s"):
                dev.read(OFF, LEN)
            assert time.monotonic() - t0 < 3
        n = len(srv.requests)
        for bad in ("0", "-1", "nan", "inf", "x", "1e9"):
            with pytest.raises(DiskImgError) as ei:
                diskimg.open(f"{srv.url}&x-timeout={bad}")
            assert ei.value.field == "x-timeout"
        assert len(srv.requests) == n
