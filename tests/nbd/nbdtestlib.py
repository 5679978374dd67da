"""What the NBD tests share besides the fixtures (tests/nbd/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest

from diskimg.nbd import protocol as p

NBD_TOOLS = all(shutil.which(t) for t in ("qemu-nbd", "nbdinfo", "nbdcopy", "qemu-img"))
needs_nbd_tools = pytest.mark.skipif(not NBD_TOOLS,
                                     reason="qemu-nbd/nbdinfo/nbdcopy/qemu-img absent")

#: ``with serve(path, *args, fmt="qcow2") as sock:`` (the diskimg_nbd/qemu_nbd fixtures)
Serve = Callable[..., AbstractContextManager[str]]


def uri(sock: str, name: str = "") -> str:
    """The NBD URI of export ``name`` on Unix socket ``sock``."""
    return f"nbd+unix:///{name}?socket={sock}"


class RawClient:
    """A deliberately small NBD client for the tests, built on the wire codec, that can
    also misbehave: :meth:`send` puts any bytes on the wire."""

    def __init__(self, sock_path: str, *, structured: bool = True,
                 contexts: tuple[str, ...] = (), name: str = "",
                 handshake: bool = True, timeout: float = 20.0) -> None:
        import socket as _socket

        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.handle = 0
        self.size = 0
        self.flags = 0
        self.structured = False
        self.context_ids: dict[int, str] = {}
        if handshake:
            self.greet()
            if structured:
                self.structured = self.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == \
                    p.NBD_REP_ACK
            if contexts:
                for rtype, data in self.option(p.NBD_OPT_SET_META_CONTEXT,
                                               p.pack_meta_context_request(name, contexts)):
                    if rtype == p.NBD_REP_META_CONTEXT:
                        mc = p.parse_rep_meta_context(data)
                        self.context_ids[mc.context_id] = mc.name
            self.go(name)

    def recv(self, n: int) -> bytes:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("server closed the connection")
            got += k
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greet(self) -> None:
        assert p.parse_server_greeting(self.recv(p.SERVER_GREETING_SIZE)) & \
            p.NBD_FLAG_FIXED_NEWSTYLE
        self.send(p.pack_client_flags(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))

    def option(self, opt: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; its replies (type, payload) up to the final one."""
        self.send(p.pack_option(opt, payload))
        return self.option_replies(opt)

    def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            h = p.parse_option_reply_header(self.recv(p.OPTION_REPLY_HEADER_SIZE))
            assert h.option == opt
            out.append((h.reply_type, self.recv(h.length)))
            if h.reply_type in (p.NBD_REP_ACK,) or h.is_error:
                return out

    def go(self, name: str = "") -> None:
        for rtype, data in self.option(p.NBD_OPT_GO, p.pack_info_request(name)):
            if rtype == p.NBD_REP_INFO:
                info = p.parse_info(data)
                if isinstance(info, p.InfoExport):
                    self.size, self.flags = info.size, info.flags
            assert rtype in (p.NBD_REP_INFO, p.NBD_REP_ACK), hex(rtype)

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"") -> tuple[int, bytes, list[Any]]:
        """Send a request and read its whole reply: (error, data read, block status
        chunks); for READ the data is reassembled from OFFSET_DATA/OFFSET_HOLE chunks."""
        self.handle += 1
        h = self.handle
        self.send(p.pack_request(cmd, h, offset, len(data) if data else length, flags) + data)
        return self.reply(h, cmd, offset, length)

    def reply(self, h: int, cmd: int, offset: int, length: int
              ) -> tuple[int, bytes, list[Any]]:
        magic = p.reply_magic(self.recv(4))
        if magic == p.NBD_SIMPLE_REPLY_MAGIC:
            r = p.parse_simple_reply(p.NBD_SIMPLE_REPLY_MAGIC.to_bytes(4, "big")
                                     + self.recv(12))
            assert r.handle == h
            body = self.recv(length) if cmd == p.NBD_CMD_READ and not r.error else b""
            return r.error, body, []
        buf = bytearray()      # sized by the first content chunk (an error has none)
        covered = 0
        err, status = 0, []
        rest = p.NBD_STRUCTURED_REPLY_MAGIC.to_bytes(4, "big") + self.recv(16)
        while True:
            ch = p.parse_chunk_header(rest)
            assert ch.handle == h
            payload = self.recv(ch.length)
            if ch.is_error:
                err = p.parse_error_chunk(payload, ch.type).error
            elif ch.type == p.NBD_REPLY_TYPE_OFFSET_DATA:
                off, view = p.parse_offset_data(payload)
                buf = buf or bytearray(length)
                buf[off - offset:off - offset + len(view)] = view
                covered += len(view)
            elif ch.type == p.NBD_REPLY_TYPE_OFFSET_HOLE:
                hole = p.parse_offset_hole(payload)
                buf = buf or bytearray(length)
                buf[hole.offset - offset:hole.offset - offset + hole.length] = \
                    bytes(hole.length)
                covered += hole.length
            elif ch.type == p.NBD_REPLY_TYPE_BLOCK_STATUS:
                status.append(p.parse_block_status(payload))
            if ch.done:
                break
            rest = self.recv(p.CHUNK_HEADER_SIZE)
        if cmd == p.NBD_CMD_READ and not err:
            assert covered == length, (covered, length)
        return err, bytes(buf), status

    def close(self, disc: bool = True) -> None:
        try:
            if disc:
                self.send(p.pack_request(p.NBD_CMD_DISC, 0))
        except OSError:
            pass
        self.sock.close()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server hung up (EOF or reset) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False


def valid_transcript(rng: Any, size: int) -> bytes:
    """What a well-behaved client sends in a whole session: client flags, options
    (structured replies, meta contexts, GO) and a few requests, then DISC."""
    out = [p.pack_client_flags(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)]
    if rng.random() < 0.8:
        out.append(p.pack_option(p.NBD_OPT_STRUCTURED_REPLY))
        out.append(p.pack_option(p.NBD_OPT_SET_META_CONTEXT, p.pack_meta_context_request(
            "", ("base:allocation", "qemu:allocation-depth"))))
    for _ in range(rng.randrange(3)):
        out.append(p.pack_option(rng.choice((p.NBD_OPT_LIST, p.NBD_OPT_INFO, 42)),
                                 p.pack_info_request("") if rng.random() < 0.5 else b""))
    out.append(p.pack_option(p.NBD_OPT_GO, p.pack_info_request("", (p.NBD_INFO_NAME,))))
    for h in range(rng.randrange(1, 8)):
        cmd = rng.choice((p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS, p.NBD_CMD_WRITE,
                          p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_TRIM, p.NBD_CMD_FLUSH,
                          p.NBD_CMD_CACHE))
        off = rng.randrange(size)
        n = rng.randrange(1, min(size - off, 1 << 20) + 1)
        if cmd == p.NBD_CMD_WRITE:
            out.append(p.pack_request(cmd, h, off, n) + rng.randbytes(n))
        else:
            out.append(p.pack_request(cmd, h, off, n))
    out.append(p.pack_request(p.NBD_CMD_DISC, 99))
    return b"".join(out)


def mutate(rng: Any, data: bytes) -> bytes:
    """A few random mutations: bit flips, 32-bit fields set to edge values, bytes
    inserted or deleted, truncation."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        if not b:
            break
        kind = rng.randrange(5)
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i:i + 4] = rng.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                     b"\x80\x00\x00\x00", b"\x02\x00\x00\x01"))
        elif kind == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 3:
            del b[i:i + rng.randrange(1, 9)]
        else:
            del b[i:]
    return bytes(b)


def fuzz_one(sock_path: str, stream: bytes, wait: float = 0.5) -> str:
    """Send ``stream`` after the server's greeting and read until the server hangs up
    (``"dropped"``) or ``wait`` seconds pass (``"open"``)."""
    import socket as _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(sock_path)
        s.recv(p.SERVER_GREETING_SIZE)
        try:
            s.sendall(stream)
        except OSError:
            return "dropped"
        s.settimeout(wait)
        try:
            while s.recv(1 << 20):
                pass
            return "dropped"
        except ConnectionError:
            return "dropped"
        except TimeoutError:
            return "open"
    finally:
        s.close()
