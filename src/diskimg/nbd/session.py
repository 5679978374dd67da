"""One client connection: the fixed-newstyle handshake, then the transmission phase.

A connection runs on its own thread.  Whatever the client sends, the outcome is an error
reply or the end of this connection only: a protocol violation (bad magic, a length past
the limits, an option flood, a handshake slower than the limit) closes the socket, an
invalid request gets its error reply.  Memory per connection is bounded by the 32 MiB
request limit (one buffer, reused).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .export import CommandError, Export, device_errors
from .protocol import (NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF,
                       NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ,
                       NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
                       NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
                       NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_DESCRIPTION,
                       NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
                       NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT,
                       NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY,
                       NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY,
                       NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
                       NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER,
                       NBD_REPLY_FLAG_DONE, NbdProtocolError, OPTION_HEADER_SIZE,
                       REQUEST_SIZE, Request, pack_block_status,
                       pack_error_chunk, pack_export_name_reply, pack_info_block_size,
                       pack_info_description, pack_info_export, pack_info_name,
                       pack_none_chunk, pack_offset_data_header, pack_offset_hole,
                       pack_option_reply, pack_rep_error, pack_rep_meta_context,
                       pack_rep_server, pack_server_greeting, pack_simple_reply,
                       parse_client_flags, parse_empty_option, parse_export_name_option,
                       parse_info_request, parse_meta_context_request,
                       parse_option_header, parse_request)

if TYPE_CHECKING:
    import ssl

#: most options one handshake may send before the server hangs up (an option flood)
MAX_OPTIONS = 1024
#: a READ answered in pieces of at most this many bytes of OFFSET_DATA is still one
#: reply; the whole request is read first, so this only bounds one sendmsg call
_IOV_MAX = 512


class Disconnect(Exception):
    """The connection ends (the peer closed it, or it must be closed)."""


class Session:
    """The server side of one connection."""

    def __init__(self, sock: socket.socket, export: Export, *,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.sock = sock
        self.export = export
        self.tls_ctx = tls
        self.handshake_timeout = handshake_timeout
        self.log = log or (lambda msg: None)
        self.rx = 0                     # bytes received so far: stream offsets in errors
        self.structured = False
        self.no_zeroes = False
        self.tls_on = False
        self.contexts: list[int] = []   # the selected meta context ids
        self._deadline: float | None = None
        self._buf = bytearray(0)
        #: counters the tests print: requests served, error replies sent
        self.requests = 0
        self.error_replies = 0

    # --- socket helpers ---------------------------------------------------------------
    def _recv(self, n: int) -> bytearray:
        out = bytearray(n)
        self._recv_into(memoryview(out))
        return out

    def _recv_into(self, mv: memoryview) -> None:
        got = 0
        while got < len(mv):
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise Disconnect("handshake time limit reached")
                self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(mv[got:])
            except TimeoutError:
                raise Disconnect("handshake time limit reached") from None
            if not k:
                raise Disconnect("peer closed the connection")
            got += k
        self.rx += got

    def _send(self, *parts: bytes | memoryview) -> None:
        if self.tls_on or len(parts) == 1:
            for p in parts:
                self.sock.sendall(p)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views[:_IOV_MAX])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # --- the connection -----------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until the client leaves or breaks the protocol."""
        try:
            if self.handshake():
                self.transmission()
        except NbdProtocolError as e:
            self.log(f"client dropped: {e}")
        except Disconnect as e:
            self.log(f"client gone: {e}")
        except (OSError, ValueError) as e:  # reset, broken pipe, TLS failure
            self.log(f"client connection failed: {e}")
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    # --- handshake ----------------------------------------------------------------------
    def handshake(self) -> bool:
        """Option haggling; True to go on to transmission, False after NBD_OPT_ABORT."""
        self._deadline = (time.monotonic() + self.handshake_timeout
                          if self.handshake_timeout > 0 else None)
        self._send(pack_server_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        base = self.rx
        cflags = parse_client_flags(self._recv(4), base,
                                    NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        fixed = bool(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            base = self.rx
            hdr = parse_option_header(self._recv(OPTION_HEADER_SIZE), base)
            payload = self._recv(hdr.length)
            pbase = base + OPTION_HEADER_SIZE
            opt = hdr.option
            if not fixed and opt != NBD_OPT_EXPORT_NAME:
                raise Disconnect(f"option {opt} from a client without fixed newstyle")
            if self.tls_ctx is not None and not self.tls_on and opt not in (
                    NBD_OPT_STARTTLS, NBD_OPT_ABORT):
                if opt == NBD_OPT_EXPORT_NAME:
                    raise Disconnect("NBD_OPT_EXPORT_NAME before TLS")
                self._rep_error(opt, NBD_REP_ERR_TLS_REQD, "TLS is required")
                continue
            try:
                done = self._option(opt, payload, pbase)
            except NbdProtocolError as e:
                if opt == NBD_OPT_EXPORT_NAME:
                    raise
                self._rep_error(opt, NBD_REP_ERR_INVALID, e.detail)
                continue
            if done is not None:
                self._deadline = None
                self.sock.settimeout(None)
                return done
        raise Disconnect(f"more than {MAX_OPTIONS} options")

    def _rep_error(self, opt: int, err: int, msg: str) -> None:
        self._send(pack_rep_error(opt, err, msg))

    def _ack(self, opt: int) -> None:
        self._send(pack_option_reply(opt, NBD_REP_ACK))

    def _option(self, opt: int, payload: bytearray, base: int) -> bool | None:
        """Answer one option; True/False to end the handshake (see :meth:`handshake`)."""
        exp = self.export
        if opt == NBD_OPT_EXPORT_NAME:
            name = parse_export_name_option(payload, base)
            if name != exp.name:
                raise Disconnect(f"unknown export {name!r}")
            self._send(pack_export_name_reply(exp.size, exp.flags(self.structured),
                                              self.no_zeroes))
            return True
        if opt == NBD_OPT_ABORT:
            try:
                self._ack(opt)
            except OSError:
                pass
            return False
        if opt in (NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_STARTTLS):
            parse_empty_option(payload, opt, base)
        if opt == NBD_OPT_LIST:
            self._send(pack_option_reply(opt, NBD_REP_SERVER,
                                         pack_rep_server(exp.name, exp.description)))
            self._ack(opt)
        elif opt == NBD_OPT_STRUCTURED_REPLY:
            if self.structured:
                self._rep_error(opt, NBD_REP_ERR_INVALID, "structured replies already on")
            else:
                self.structured = True
                self._ack(opt)
        elif opt == NBD_OPT_STARTTLS:
            self._starttls(opt)
        elif opt in (NBD_OPT_INFO, NBD_OPT_GO):
            req = parse_info_request(payload, base)
            if req.name != exp.name:
                self._rep_error(opt, NBD_REP_ERR_UNKNOWN, f"export '{req.name}' not present")
                return None
            for info in (pack_info_export(exp.size, exp.flags(self.structured)),
                         pack_info_name(exp.name) if NBD_INFO_NAME in req.requests else b"",
                         pack_info_description(exp.description)
                         if NBD_INFO_DESCRIPTION in req.requests and exp.description
                         else b"",
                         pack_info_block_size(exp.min_block, exp.preferred_block,
                                              exp.max_block)):
                if info:
                    self._send(pack_option_reply(opt, NBD_REP_INFO, info))
            self._ack(opt)
            if opt == NBD_OPT_GO:
                return True
        elif opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            self._meta_context(opt, payload, base)
        else:
            self._rep_error(opt, NBD_REP_ERR_UNSUP, f"option {opt} not supported")
        return None

    def _meta_context(self, opt: int, payload: bytearray, base: int) -> None:
        if not self.structured:
            self._rep_error(opt, NBD_REP_ERR_INVALID,
                            "meta contexts need structured replies first")
            return
        req = parse_meta_context_request(payload, base)
        if req.name != self.export.name:
            self._rep_error(opt, NBD_REP_ERR_UNKNOWN, f"export '{req.name}' not present")
            return
        listing = opt == NBD_OPT_LIST_META_CONTEXT
        ids = self.export.meta.select(req.queries, listing)
        if not listing:
            self.contexts = ids
        for i in ids:
            self._send(pack_option_reply(opt, NBD_REP_META_CONTEXT, pack_rep_meta_context(
                0 if listing else i, self.export.meta.names[i])))
        self._ack(opt)

    def _starttls(self, opt: int) -> None:
        if self.tls_ctx is None:
            self._rep_error(opt, NBD_REP_ERR_POLICY, "TLS not configured")
            return
        if self.tls_on:
            self._rep_error(opt, NBD_REP_ERR_INVALID, "TLS already on")
            return
        self._ack(opt)
        if self._deadline is not None:
            self.sock.settimeout(max(0.001, self._deadline - time.monotonic()))
        self.sock = self.tls_ctx.wrap_socket(self.sock, server_side=True)
        self.tls_on = True

    # --- transmission -------------------------------------------------------------------
    def transmission(self) -> None:
        hdr = bytearray(REQUEST_SIZE)
        hv = memoryview(hdr)
        while True:
            base = self.rx
            try:
                self._recv_into(hv)
            except Disconnect:
                return
            req = parse_request(hdr, base)
            payload = None
            if req.type == NBD_CMD_WRITE:
                payload = self._buffer(req.length)
                self._recv_into(payload)
            if req.type == NBD_CMD_DISC:
                return
            self.requests += 1
            try:
                self.export.check(req, self.structured, len(self.contexts))
                self._command(req, payload)
            except CommandError as e:
                self.error_replies += 1
                self._error_reply(req, e.error, e.message)

    def _buffer(self, n: int) -> memoryview:
        if len(self._buf) < n:
            self._buf = bytearray(n)
        return memoryview(self._buf)[:n]

    def _error_reply(self, req: Request, error: int, message: str) -> None:
        if self.structured:
            self._send(pack_error_chunk(req.handle, error, message))
        else:
            self._send(pack_simple_reply(req.handle, error))

    def _command(self, req: Request, payload: memoryview | None) -> None:
        exp, t = self.export, req.type
        fua = bool(req.flags & NBD_CMD_FLAG_FUA)
        if t == NBD_CMD_READ:
            self._read(req)
            return
        if t == NBD_CMD_BLOCK_STATUS:
            self._block_status(req)
            return
        with exp.lock:
            if t == NBD_CMD_WRITE:
                assert payload is not None
                exp.write(req.offset, payload, fua)
            elif t == NBD_CMD_WRITE_ZEROES:
                exp.write_zeroes(req.offset, req.length, req.flags)
            elif t == NBD_CMD_TRIM:
                exp.trim(req.offset, req.length, fua)
            elif t == NBD_CMD_FLUSH:
                exp.flush()
            else:
                assert t == NBD_CMD_CACHE  # a prefetch hint: nothing to keep warm
        self._send(pack_simple_reply(req.handle))

    def _read(self, req: Request) -> None:
        exp = self.export
        buf = self._buffer(req.length)
        off, end = req.offset, req.offset + req.length
        sparse = self.structured and not req.flags & NBD_CMD_FLAG_DF
        pieces: list[tuple[int, int, bool]] = []   # (offset, length, hole)
        with exp.lock, device_errors("read"):
            if not sparse:
                exp.dev.readinto(off, buf)
            else:
                pos = off
                while pos < end:
                    st, _ = exp.dev.block_status(pos, end - pos)
                    n = st.length
                    hole = st.zero
                    if not hole:
                        exp.dev.readinto(pos, buf[pos - off:pos - off + n])
                    if pieces and pieces[-1][2] == hole:
                        p = pieces[-1]
                        pieces[-1] = (p[0], p[1] + n, hole)
                    else:
                        pieces.append((pos, n, hole))
                    pos += n
        h = req.handle
        if not self.structured:
            self._send(pack_simple_reply(h), buf)
            return
        if not req.length:
            self._send(pack_none_chunk(h))
            return
        if not sparse:
            self._send(pack_offset_data_header(h, off, req.length, NBD_REPLY_FLAG_DONE), buf)
            return
        parts: list[bytes | memoryview] = []
        for i, (pos, n, hole) in enumerate(pieces):
            flags = NBD_REPLY_FLAG_DONE if i == len(pieces) - 1 else 0
            if hole:
                parts.append(pack_offset_hole(h, pos, n, flags))
            else:
                parts.append(pack_offset_data_header(h, pos, n, flags))
                parts.append(buf[pos - off:pos - off + n])
        self._send(*parts)

    def _block_status(self, req: Request) -> None:
        exp = self.export
        one = bool(req.flags & NBD_CMD_FLAG_REQ_ONE)
        with exp.lock, device_errors("block status"):
            replies = [(cid, exp.meta.extents(cid, req.offset, req.length, one))
                       for cid in self.contexts]
        parts = [pack_block_status(req.handle, cid, ext,
                                   NBD_REPLY_FLAG_DONE if i == len(replies) - 1 else 0)
                 for i, (cid, ext) in enumerate(replies)]
        self._send(*parts)


__all__ = ["MAX_OPTIONS", "Disconnect", "Session"]
