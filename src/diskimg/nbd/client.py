"""NbdClient: one connection to one NBD export (the NBD protocol specification,
doc/proto.md of the NBD project; every record goes through :mod:`diskimg.nbd.protocol`).

- fixed-newstyle handshake; ``NBD_OPT_STARTTLS`` for ``nbds://`` (stdlib :mod:`ssl`);
  ``NBD_OPT_STRUCTURED_REPLY``; ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation`` by
  default, ``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME`` on request);
  ``NBD_OPT_GO`` asking for the block sizes, which are then obeyed (``NBD_OPT_EXPORT_NAME``
  when the server does not know GO);
- READ (structured replies: data, hole and error chunks reassembled into the caller's
  buffer, every byte accounted for exactly once), WRITE (FUA), FLUSH, TRIM,
  WRITE_ZEROES (NO_HOLE), BLOCK_STATUS; ``NBD_CMD_DISC`` on :meth:`close`;
- one request in flight at a time (a lock: threads share a connection safely);
- every socket operation has ``timeout``; every length the server sends is bounded by
  the request it answers before anything is allocated or read for it.

Faults end in :class:`~diskimg.errors.RemoteError` naming the URL and the offset of the
request (``field`` names the protocol field at fault).  After a reply that breaks the
protocol, a timeout or a dropped connection the connection is closed: the stream can no
longer be trusted, and every later call fails the same way.  An error the server reports
for one request (an error reply) leaves the connection usable.
"""

from __future__ import annotations

import bisect
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from diskimg.errors import RemoteError, UsageError
from diskimg.nbd import protocol as P
from diskimg.nbd.url import NbdAddress, parse

if TYPE_CHECKING:
    import ssl

DEFAULT_TIMEOUT = 30.0
#: the largest READ/WRITE sent in one request (the spec's portable maximum)
MAX_REQUEST = 32 << 20
#: an error chunk: error, message length, a message of at most 4096 bytes and an offset
#: (the slack admits unknown error types with a few trailing fields)
_MAX_ERROR_CHUNK = 6 + P.NBD_MAX_STRING + 64
#: error chunks accepted in one reply before the server is deemed hostile
_MAX_ERROR_CHUNKS = 1024
#: replies accepted to one option (META_CONTEXT, INFO ...)
_MAX_OPTION_REPLIES = 1024
#: most extents in one BLOCK_STATUS chunk (the spec's SHOULD NOT exceed)
_MAX_EXTENTS = 1 << 20
_OFFSET = struct.Struct(">Q")  # the offset before an OFFSET_DATA chunk's data


class NbdClient:
    """A connection to the export at ``address`` (an NBD URL or :class:`NbdAddress`).

    ``contexts``: the metadata contexts to select (those the server has are in
    :attr:`contexts`); ``timeout``: seconds for the connect and every socket operation;
    ``ssl_context``: for ``nbds://`` (default: from the URL's ``tls-certificates``
    directory, else the system's CAs)."""

    def __init__(self, address: NbdAddress | str, *, timeout: float = DEFAULT_TIMEOUT,
                 contexts: Sequence[str] = (P.BASE_ALLOCATION,),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = parse(address) if isinstance(address, str) else address
        self.url = self.address.url
        if timeout <= 0:
            raise UsageError("timeout must be positive", field="timeout")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pos = 0                     # bytes received so far (stream offsets)
        self._cookie = 0
        self._closed = False
        self._broken: str | None = None   # why the connection can no longer be used
        self._in_transmission = False
        self._deadline = 0.0              # when the exchange under way must be over
        #: the export's size and transmission flags
        self.size = 0
        self.flags = 0
        #: whether structured replies were negotiated
        self.structured = False
        #: block sizes (the spec's defaults unless the server said otherwise)
        self.min_block = 1
        self.preferred_block = 4096
        self.max_payload = MAX_REQUEST
        #: the selected metadata contexts: name -> the server's id
        self.contexts: dict[str, int] = {}
        self._sock = self._connect()
        try:
            self._handshake(tuple(contexts), ssl_context)
        except BaseException:
            self._drop()
            raise
        self._in_transmission = True

    # --- errors -------------------------------------------------------------------------
    def _error(self, what: str, offset: int | None = None, field: str | None = None,
               reason: str | None = None) -> RemoteError:
        at = "" if offset is None else f" at offset {offset:#x}"
        return RemoteError(f"NBD server '{self.url}'{at}: {what}", url=self.url,
                           offset=offset, field=field, reason=reason)

    def _fail(self, what: str, offset: int | None = None,
              field: str | None = None) -> RemoteError:
        """The error for a fault that leaves the stream unusable: the connection is
        dropped first (no DISC: the server broke the protocol or the link is gone)."""
        self._broken = what
        self._drop()
        return self._error(what, offset, field)

    def _protocol(self, e: P.NbdProtocolError, offset: int | None) -> RemoteError:
        return self._fail(str(e.detail) + f" (stream offset {e.offset})", offset, e.field)

    # --- the socket ---------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        a = self.address
        try:
            if a.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(a.socket)
                except BaseException:
                    sock.close()
                    raise
            else:
                assert a.host is not None
                sock = socket.create_connection((a.host, a.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (TimeoutError, socket.timeout):
            raise self._error(f"could not connect: timed out after {self.timeout:g} s",
                              field="connect") from None
        except OSError as e:
            why = e.strerror or str(e)
            raise self._error(f"could not connect: {why}", field="connect") from None
        sock.settimeout(self.timeout)
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _live(self) -> socket.socket:
        if self._closed:
            from diskimg.errors import ClosedImageError

            raise ClosedImageError(f"I/O operation on closed NBD connection '{self.url}'")
        if self._broken is not None or self._sock is None:
            raise self._error(f"the connection is broken ({self._broken})", field="connection")
        return self._sock

    def _recv_into(self, view: memoryview, offset: int | None) -> None:
        sock = self._live()
        got, n = 0, len(view)
        while got < n:
            try:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(min(self.timeout, left))
                k = sock.recv_into(view[got:])
            except (TimeoutError, socket.timeout):
                raise self._fail(f"timed out after {self.timeout:g} s waiting for the "
                                 f"server ({got} of {n} bytes received)", offset,
                                 "timeout") from None
            except OSError as e:
                raise self._fail(f"connection lost: {e.strerror or e}", offset,
                                 "connection") from None
            if not k:
                raise self._fail(f"the server closed the connection ({got} of {n} bytes "
                                 "of a reply received)", offset, "connection")
            got += k
        self._pos += n

    def _recv(self, n: int, offset: int | None = None) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), offset)
        return buf

    def _send(self, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
        sock = self._live()
        try:
            sock.sendall(data)
        except (TimeoutError, socket.timeout):
            raise self._fail(f"timed out after {self.timeout:g} s sending to the server",
                             offset, "timeout") from None
        except OSError as e:
            raise self._fail(f"connection lost: {e.strerror or e}", offset,
                             "connection") from None

    # --- handshake ----------------------------------------------------------------------
    def _handshake(self, contexts: tuple[str, ...], ctx: ssl.SSLContext | None) -> None:
        # the whole handshake has ``timeout`` (a server that drips it is stalled)
        self._deadline = time.monotonic() + self.timeout
        try:
            hflags = P.parse_server_greeting(self._recv(P.SERVER_GREETING_SIZE), 0)
        except P.NbdProtocolError as e:
            raise self._protocol(e, None) from None
        if not hflags & P.NBD_FLAG_FIXED_NEWSTYLE:
            raise self._fail("the server does not speak fixed newstyle negotiation",
                             None, "handshake flags")
        self._no_zeroes = bool(hflags & P.NBD_FLAG_NO_ZEROES)
        cflags = P.NBD_FLAG_C_FIXED_NEWSTYLE | \
            (P.NBD_FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._send(P.pack_client_flags(cflags))
        if self.address.tls:
            self._starttls(ctx)
        self.structured = self._simple_option(P.NBD_OPT_STRUCTURED_REPLY)
        if self.structured and contexts:
            self._set_meta_context(contexts)
        self._go()

    def _option(self, option: int, payload: bytes = b"") -> Iterator[tuple[int, bytearray]]:
        """Send ``option``; yield each (reply type, payload) until the final one (ACK or
        an error), which is yielded last."""
        self._send(P.pack_option(option, payload))
        for _ in range(_MAX_OPTION_REPLIES):
            base = self._pos
            try:
                hdr = P.parse_option_reply_header(self._recv(P.OPTION_REPLY_HEADER_SIZE),
                                                  base)
            except P.NbdProtocolError as e:
                raise self._protocol(e, None) from None
            if hdr.option != option:
                raise self._fail(f"a reply to option {hdr.option} where one to option "
                                 f"{option} was due", None, "option")
            data = self._recv(hdr.length)
            yield hdr.reply_type, data
            if hdr.reply_type == P.NBD_REP_ACK or hdr.is_error:
                return
        raise self._fail(f"more than {_MAX_OPTION_REPLIES} replies to option {option}",
                         None, "option replies")

    def _rep_error(self, rtype: int, data: bytearray) -> str:
        try:
            msg = P.parse_rep_error_message(data, self._pos - len(data))
        except P.NbdProtocolError:
            msg = ""
        names = {P.NBD_REP_ERR_UNSUP: "unsupported", P.NBD_REP_ERR_POLICY: "refused by policy",
                 P.NBD_REP_ERR_INVALID: "invalid", P.NBD_REP_ERR_PLATFORM: "not on this platform",
                 P.NBD_REP_ERR_TLS_REQD: "TLS required (use nbds://)",
                 P.NBD_REP_ERR_UNKNOWN: "no such export",
                 P.NBD_REP_ERR_SHUTDOWN: "the server is shutting down",
                 P.NBD_REP_ERR_BLOCK_SIZE_REQD: "block sizes required",
                 P.NBD_REP_ERR_TOO_BIG: "too big"}
        why = names.get(rtype, f"error {rtype & ~P.NBD_REP_FLAG_ERROR:#x}")
        return f"{why}: {msg}" if msg else why

    def _simple_option(self, option: int) -> bool:
        """An option without data answered by ACK (True) or an error (False)."""
        for rtype, data in self._option(option):
            if rtype == P.NBD_REP_ACK:
                return True
            if rtype & P.NBD_REP_FLAG_ERROR:
                return False
            raise self._fail(f"unexpected reply type {rtype} to option {option}", None,
                             "reply type")
        return False

    def _starttls(self, ctx: ssl.SSLContext | None) -> None:
        import ssl

        for rtype, data in self._option(P.NBD_OPT_STARTTLS):
            if rtype & P.NBD_REP_FLAG_ERROR:
                raise self._fail(f"TLS was asked for (nbds://) but the server refused it: "
                                 f"{self._rep_error(rtype, data)}", None, "tls")
            if rtype != P.NBD_REP_ACK:
                raise self._fail(f"unexpected reply type {rtype} to STARTTLS", None,
                                 "reply type")
        ctx = ctx or client_context(self.address)
        a = self.address
        name = a.tls_hostname or a.host
        assert self._sock is not None
        try:
            self._sock = ctx.wrap_socket(self._sock, server_hostname=name)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            raise self._fail(f"TLS negotiation failed: {e}", None, "tls") from None

    def _set_meta_context(self, contexts: tuple[str, ...]) -> None:
        payload = P.pack_meta_context_request(self.address.export, contexts)
        got: dict[str, int] = {}
        for rtype, data in self._option(P.NBD_OPT_SET_META_CONTEXT, payload):
            if rtype == P.NBD_REP_META_CONTEXT:
                try:
                    mc = P.parse_rep_meta_context(data, self._pos - len(data))
                except P.NbdProtocolError as e:
                    raise self._protocol(e, None) from None
                if mc.name not in contexts or mc.name in got:
                    raise self._fail(f"the server selected the metadata context "
                                     f"'{mc.name}', not asked for or twice", None,
                                     "context name")
                got[mc.name] = mc.context_id
            elif rtype == P.NBD_REP_ACK:
                self.contexts = got
                return
            elif rtype & P.NBD_REP_FLAG_ERROR:
                self.contexts = {}  # no block status: everything reads as data
                return
            else:
                raise self._fail(f"unexpected reply type {rtype} to SET_META_CONTEXT",
                                 None, "reply type")

    def _go(self) -> None:
        export = self.address.export
        payload = P.pack_info_request(export, (P.NBD_INFO_BLOCK_SIZE,))
        have_export = False
        for rtype, data in self._option(P.NBD_OPT_GO, payload):
            if rtype == P.NBD_REP_INFO:
                try:
                    info = P.parse_info(data, self._pos - len(data))
                except P.NbdProtocolError as e:
                    raise self._protocol(e, None) from None
                if isinstance(info, P.InfoExport):
                    self.size, self.flags = info.size, info.flags
                    have_export = True
                elif isinstance(info, P.InfoBlockSize):
                    self.min_block, self.preferred_block = info.minimum, info.preferred
                    self.max_payload = info.maximum
            elif rtype == P.NBD_REP_ACK:
                if not have_export:
                    raise self._fail("NBD_OPT_GO succeeded without NBD_INFO_EXPORT", None,
                                     "info")
                break
            elif rtype == P.NBD_REP_ERR_UNSUP:
                self._export_name()
                return
            elif rtype & P.NBD_REP_FLAG_ERROR:
                msg = self._rep_error(rtype, data)
                self._send(P.pack_option(P.NBD_OPT_ABORT))
                self._drop()
                self._broken = msg
                raise self._error(f"could not open export '{export}': {msg}",
                                  field="export")
            else:
                raise self._fail(f"unexpected reply type {rtype} to NBD_OPT_GO", None,
                                 "reply type")
        self._check_sizes()

    def _export_name(self) -> None:
        """The old way in (a server without NBD_OPT_GO): no block sizes, no errors."""
        self._send(P.pack_option(P.NBD_OPT_EXPORT_NAME,
                                 P.pack_export_name_option(self.address.export)))
        try:
            rep = P.parse_export_name_reply(self._recv(P.EXPORT_NAME_REPLY_SIZE), self._pos)
        except P.NbdProtocolError as e:
            raise self._protocol(e, None) from None
        if not self._no_zeroes:
            self._recv(P.EXPORT_NAME_REPLY_PADDING)
        self.size, self.flags = rep.size, rep.flags
        self.contexts = {}  # selected for GO only
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.size >= 1 << 63:
            raise self._fail(f"export size {self.size} is past 2^63", None, "export size")
        self.max_payload = min(self.max_payload, MAX_REQUEST)
        if self.max_payload < self.min_block:
            raise self._fail("the maximum payload is below the minimum block size", None,
                             "maximum block size")

    # --- transmission -------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return bool(self.flags & P.NBD_FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        """Whether the transmission flags have ``flag`` (``NBD_FLAG_SEND_FLUSH`` ...)."""
        return bool(self.flags & flag)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 payload: memoryview | None = None) -> int:
        # the whole exchange has ``timeout``, plus as much again per 16 MiB of data: a
        # server dripping bytes slower than that is taken as stalled
        self._deadline = time.monotonic() + self.timeout * (1 + (length >> 24))
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        head = P.pack_request(cmd, self._cookie, offset, length, flags)
        if payload is not None and len(payload) <= 65536:
            self._send(head + bytes(payload), offset)
        else:
            self._send(head, offset)
            if payload is not None:
                self._send(payload, offset)
        return self._cookie

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"{what} of {length} bytes at offset {offset:#x} lies outside "
                             f"the export '{self.url}' ({self.size} bytes)", path=self.url)
        m = self.min_block
        if offset % m or (length % m and offset + length != self.size):
            raise UsageError(f"{what} at offset {offset:#x} (+{length}) is not aligned to "
                             f"the export's minimum block size {m}", path=self.url)

    def _reply_magic(self, cookie: int, offset: int) -> tuple[int, bytearray]:
        base = self._pos
        head = bytearray(P.CHUNK_HEADER_SIZE)
        self._recv_into(memoryview(head)[:4], offset)
        try:
            magic = P.reply_magic(head, base)
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        return magic, head

    def _simple(self, head: bytearray, cookie: int, offset: int) -> int:
        """The rest of a simple reply whose magic is in ``head``: its error."""
        base = self._pos - 4
        self._recv_into(memoryview(head)[4:P.SIMPLE_REPLY_SIZE], offset)
        try:
            rep = P.parse_simple_reply(head[:P.SIMPLE_REPLY_SIZE], base)
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if rep.handle != cookie:
            raise self._fail(f"a reply for cookie {rep.handle:#x}, never sent (expected "
                             f"{cookie:#x})", offset, "cookie")
        return rep.error

    def _chunk(self, head: bytearray, cookie: int, offset: int,
               max_length: int) -> P.ChunkHeader:
        base = self._pos - 4
        self._recv_into(memoryview(head)[4:], offset)
        try:
            ch = P.parse_chunk_header(head, base, max(max_length, _MAX_ERROR_CHUNK))
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if ch.handle != cookie:
            raise self._fail(f"a reply chunk for cookie {ch.handle:#x}, never sent "
                             f"(expected {cookie:#x})", offset, "cookie")
        if not ch.is_error and ch.length > max_length:
            raise self._fail(f"a chunk of {ch.length} bytes answers a request of at most "
                             f"{max_length}", offset, "chunk length")
        return ch

    def _error_chunk(self, ch: P.ChunkHeader, offset: int, length: int) -> P.ChunkError:
        data = self._recv(ch.length, offset)
        try:
            err = P.parse_error_chunk(data, ch.type, self._pos - len(data))
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if err.offset is not None and not offset <= err.offset < offset + length:
            raise self._fail(f"an error at offset {err.offset:#x}, outside the request",
                             offset, "error offset")
        return err

    def _raise_reply_error(self, what: str, error: int, message: str, offset: int) -> None:
        eno = P.from_nbd_error(error)
        text = message or os.strerror(eno)
        raise self._error(f"{what} failed: {text}", offset, "error", os.strerror(eno))

    def _status_reply(self, cookie: int, what: str, offset: int) -> None:
        """The reply to a command without data in the reply (WRITE, FLUSH, TRIM,
        WRITE_ZEROES): a simple reply, or structured NONE/error chunks."""
        first: P.ChunkError | None = None
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error(what, error, "", offset)
            return
        for _ in range(_MAX_ERROR_CHUNKS):
            ch = self._chunk(head, cookie, offset, 0)
            if ch.is_error:
                err = self._error_chunk(ch, offset, 1 << 64)
                first = first or err
            elif ch.type != P.NBD_REPLY_TYPE_NONE:
                raise self._fail(f"a chunk of type {ch.type} in the reply to {what}",
                                 offset, "chunk type")
            if ch.done:
                break
            magic, head = self._reply_magic(cookie, offset)
            if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._fail("a simple reply inside a structured one", offset, "magic")
        else:
            raise self._fail(f"more than {_MAX_ERROR_CHUNKS} chunks in one reply", offset,
                             "chunks")
        if first is not None:
            self._raise_reply_error(what, first.error, first.message,
                                    offset if first.offset is None else first.offset)

    # --- commands -----------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the export's bytes at ``offset`` (inside the export, aligned
        to the minimum block size), in requests of at most :attr:`max_payload` bytes."""
        n = len(buf)
        self._check_range(offset, n, "a read")
        step = self.max_payload - self.max_payload % self.min_block
        with self._lock:
            done = 0
            while done < n:
                k = min(step, n - done)
                self._read_one(offset + done, buf[done:done + k])
                done += k

    def _read_one(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        cookie = self._request(P.NBD_CMD_READ, offset, length)
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            if self.structured:
                raise self._fail("a simple reply to a READ after structured replies were "
                                 "negotiated", offset, "magic")
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error("read", error, "", offset)
            self._recv_into(buf, offset)
            return
        starts: list[int] = []   # covered [start, end) pieces, sorted, relative
        ends: list[int] = []
        covered = 0
        first: P.ChunkError | None = None
        errors = 0
        while True:
            ch = self._chunk(head, cookie, offset, length + 8)
            if ch.type == P.NBD_REPLY_TYPE_OFFSET_DATA:
                if ch.length < 9:
                    raise self._fail(f"OFFSET_DATA of {ch.length} bytes (at least 9)",
                                     offset, "chunk length")
                (at,) = _OFFSET.unpack(self._recv(8, offset))
                rel, k = at - offset, ch.length - 8
                self._claim(starts, ends, rel, k, length, offset)
                self._recv_into(buf[rel:rel + k], offset)
                covered += k
            elif ch.type == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                data = self._recv(ch.length, offset)
                try:
                    hole = P.parse_offset_hole(data, self._pos - len(data))
                except P.NbdProtocolError as e:
                    raise self._protocol(e, offset) from None
                rel = hole.offset - offset
                self._claim(starts, ends, rel, hole.length, length, offset)
                buf[rel:rel + hole.length] = bytes(hole.length)
                covered += hole.length
            elif ch.is_error:
                errors += 1
                if errors > _MAX_ERROR_CHUNKS:
                    raise self._fail(f"more than {_MAX_ERROR_CHUNKS} error chunks", offset,
                                     "chunks")
                err = self._error_chunk(ch, offset, length)
                first = first or err
            elif ch.type != P.NBD_REPLY_TYPE_NONE:
                raise self._fail(f"a chunk of type {ch.type} in the reply to a READ",
                                 offset, "chunk type")
            if ch.done:
                break
            magic, head = self._reply_magic(cookie, offset)
            if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._fail("a simple reply inside a structured one", offset, "magic")
        if first is not None:
            self._raise_reply_error("read", first.error, first.message,
                                    offset if first.offset is None else first.offset)
        if covered != length:
            missing = _first_gap(starts, ends, length)
            raise self._fail(f"the reply to a READ of {length} bytes left bytes from "
                             f"offset {offset + missing:#x} unsent", offset, "chunks")

    def _claim(self, starts: list[int], ends: list[int], rel: int, k: int, length: int,
               offset: int) -> None:
        """Record that the piece [rel, rel+k) of a read was sent; a piece outside the
        request or overlapping an earlier one breaks the protocol."""
        if rel < 0 or k <= 0 or rel + k > length:
            raise self._fail(f"a chunk for bytes {offset + rel:#x}+{k}, outside the "
                             f"request (+{length})", offset, "chunk offset")
        i = bisect.bisect_right(starts, rel)
        if (i and ends[i - 1] > rel) or (i < len(starts) and starts[i] < rel + k):
            raise self._fail(f"a chunk for bytes {offset + rel:#x}+{k} overlaps an "
                             "earlier one", offset, "chunk offset")
        starts.insert(i, rel)
        ends.insert(i, rel + k)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *,
              fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (aligned; FUA: durable before the reply)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_range(offset, n, "a write")
        self._writable()
        flags = P.NBD_CMD_FLAG_FUA if fua and self.can(P.NBD_FLAG_SEND_FUA) else 0
        step = self.max_payload - self.max_payload % self.min_block
        with self._lock:
            done = 0
            while done < n:
                k = min(step, n - done)
                cookie = self._request(P.NBD_CMD_WRITE, offset + done, k, flags,
                                       view[done:done + k])
                self._status_reply(cookie, "write", offset + done)
                done += k

    def _writable(self) -> None:
        if self.read_only:
            raise UsageError(f"the NBD export '{self.url}' is read-only", path=self.url)

    def _length_command(self, cmd: int, offset: int, length: int, flags: int,
                        what: str) -> None:
        """TRIM or WRITE_ZEROES of any length, in requests of at most 2^31 bytes."""
        self._check_range(offset, length, what)
        self._writable()
        step = (1 << 31) - (1 << 31) % max(self.min_block, 512)
        with self._lock:
            done = 0
            while done < length:
                k = min(step, length - done)
                cookie = self._request(cmd, offset + done, k, flags)
                self._status_reply(cookie, what, offset + done)
                done += k

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False,
                     fua: bool = False) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros (``no_hole``: allocated)."""
        if not self.can(P.NBD_FLAG_SEND_WRITE_ZEROES):
            raise UsageError(f"the NBD export '{self.url}' does not take WRITE_ZEROES",
                             path=self.url)
        flags = (P.NBD_CMD_FLAG_NO_HOLE if no_hole else 0) | \
            (P.NBD_CMD_FLAG_FUA if fua and self.can(P.NBD_FLAG_SEND_FUA) else 0)
        self._length_command(P.NBD_CMD_WRITE_ZEROES, offset, length, flags, "write zeroes")

    def trim(self, offset: int, length: int) -> None:
        """Tell the server ``length`` bytes at ``offset`` are no longer needed (their
        contents are undefined afterwards); a no-op when the server takes no TRIM."""
        if self.can(P.NBD_FLAG_SEND_TRIM):
            self._length_command(P.NBD_CMD_TRIM, offset, length, 0, "trim")

    def flush(self) -> None:
        """Make every write the server has replied to durable (a no-op when the server
        takes no FLUSH)."""
        if not self.can(P.NBD_FLAG_SEND_FLUSH) or self.read_only:
            return
        with self._lock:
            cookie = self._request(P.NBD_CMD_FLUSH, 0, 0)
            self._status_reply(cookie, "flush", 0)

    def block_status(self, offset: int, length: int,
                     context: str = P.BASE_ALLOCATION) -> list[tuple[int, int]]:
        """(length, flags) extents of ``context`` from ``offset``: at least one, none past
        ``offset + length`` (the server may describe less than asked for).  A context the
        server did not select: one extent of flags 0 (data, for ``base:allocation``)."""
        length = min(length, self.size - offset, 0xFFFFFFFF - 0xFFFFFFFF % max(
            self.min_block, 512))
        if length <= 0:
            raise UsageError(f"block status at offset {offset:#x} lies outside the export "
                             f"'{self.url}'", path=self.url)
        cid = self.contexts.get(context)
        if cid is None:
            return [(length, 0)]
        self._check_range(offset, length, "block status")
        with self._lock:
            return self._block_status(offset, length, cid)

    def _block_status(self, offset: int, length: int, cid: int) -> list[tuple[int, int]]:
        cookie = self._request(P.NBD_CMD_BLOCK_STATUS, offset, length)
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error("block status", error, "", offset)
            raise self._fail("a simple reply without error to BLOCK_STATUS", offset,
                             "magic")
        # each extent is at least one byte and all but the last lie inside the request
        max_len = 4 + 8 * min(_MAX_EXTENTS, length)
        seen: set[int] = set()
        mine: list[tuple[int, int]] | None = None
        first: P.ChunkError | None = None
        for _ in range(len(self.contexts) + _MAX_ERROR_CHUNKS):
            ch = self._chunk(head, cookie, offset, max_len)
            if ch.type == P.NBD_REPLY_TYPE_BLOCK_STATUS:
                data = self._recv(ch.length, offset)
                try:
                    bs = P.parse_block_status(data, self._pos - len(data))
                except P.NbdProtocolError as e:
                    raise self._protocol(e, offset) from None
                if bs.context_id not in self.contexts.values() or bs.context_id in seen:
                    raise self._fail(f"block status for context id {bs.context_id}, not "
                                     "selected or sent twice", offset, "context id")
                seen.add(bs.context_id)
                total = 0
                for i, (n, _) in enumerate(bs.extents):
                    if total >= length:
                        raise self._fail(f"block status extent {i} starts past the "
                                         "request", offset, "extent length")
                    total += n
                if bs.context_id == cid:
                    mine = _clip(bs.extents, length)
            elif ch.is_error:
                err = self._error_chunk(ch, offset, length)
                first = first or err
            elif ch.type != P.NBD_REPLY_TYPE_NONE:
                raise self._fail(f"a chunk of type {ch.type} in the reply to "
                                 "BLOCK_STATUS", offset, "chunk type")
            if ch.done:
                break
            magic, head = self._reply_magic(cookie, offset)
            if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._fail("a simple reply inside a structured one", offset, "magic")
        else:
            raise self._fail("too many chunks in the reply to BLOCK_STATUS", offset,
                             "chunks")
        if first is not None:
            self._raise_reply_error("block status", first.error, first.message,
                                    offset if first.offset is None else first.offset)
        if mine is None:
            raise self._fail("no block status for the selected context", offset,
                             "context id")
        return mine

    # --- lifetime -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Send NBD_CMD_DISC (a soft disconnect) and close (idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            sock = self._sock
            if sock is not None and self._broken is None and self._in_transmission:
                try:
                    sock.settimeout(min(self.timeout, 5.0))
                    self._cookie += 1
                    sock.sendall(P.pack_request(P.NBD_CMD_DISC, self._cookie))
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._drop()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clip(extents: tuple[tuple[int, int], ...], length: int) -> list[tuple[int, int]]:
    """The extents, the last cut at ``length``."""
    out: list[tuple[int, int]] = []
    total = 0
    for n, flags in extents:
        n = min(n, length - total)
        out.append((n, flags))
        total += n
        if total >= length:
            break
    return out


def _first_gap(starts: list[int], ends: list[int], length: int) -> int:
    pos = 0
    for s, e in zip(starts, ends, strict=True):
        if s > pos:
            return pos
        pos = e
    return pos if pos < length else length


def client_context(address: NbdAddress) -> ssl.SSLContext:
    """The TLS context for ``address``: the CA of its ``tls-certificates`` directory
    (``ca-cert.pem``, with ``client-cert.pem``/``client-key.pem`` when both are there),
    else the system's; peer verification unless ``tls-verify-peer=0``."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    d = address.tls_certificates
    try:
        if d:
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
            cert, key = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
            if os.path.isfile(cert) and os.path.isfile(key):
                ctx.load_cert_chain(cert, key)
        else:
            ctx.load_default_certs()
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"Unable to load TLS credentials for '{address.url}': {e}",
                         path=address.url, field="tls-certificates") from None
    if not address.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif address.host is None and address.tls_hostname is None:
        ctx.check_hostname = False  # a Unix socket has no name to check; the CA still is
    return ctx

