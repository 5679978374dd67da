"""The connection under :class:`diskimg.nbd.client.NbdClient`: the socket (TCP, Unix,
TLS with the stdlib :mod:`ssl`), exact reads with deadlines and stream offsets, the errors
that name the URL, and the fixed-newstyle handshake (STARTTLS, STRUCTURED_REPLY,
SET_META_CONTEXT, GO with the block sizes, or EXPORT_NAME when the server has no GO).
Every record goes through :mod:`diskimg.nbd.protocol`."""

from __future__ import annotations

import os
import socket
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
#: replies accepted to one option (META_CONTEXT, INFO ...)
_MAX_OPTION_REPLIES = 1024

class Connection:
    """A connection to the export at ``address`` (an NBD URL or :class:`NbdAddress`),
    in the transmission phase once constructed.

    ``contexts``: the metadata contexts to select (those the server has are in
    :attr:`contexts`); ``timeout``: seconds for the connect and every socket operation
    (None: the URL's ``x-timeout``, else :data:`DEFAULT_TIMEOUT`);
    ``ssl_context``: for ``nbds://`` (default: from the URL's ``tls-certificates``
    directory, else the system's CAs)."""

    def __init__(self, address: NbdAddress | str, *, timeout: float | None = None,
                 contexts: Sequence[str] = (P.BASE_ALLOCATION,),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = parse(address) if isinstance(address, str) else address
        self.url = self.address.url
        if timeout is None:
            timeout = self.address.timeout or DEFAULT_TIMEOUT
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
            if hdr.reply_type == P.NBD_REP_ERR_SHUTDOWN:
                # the spec: the client must then disconnect (softly: OPT_ABORT)
                msg = self._rep_error(hdr.reply_type, data)
                self._send(P.pack_option(P.NBD_OPT_ABORT))
                raise self._fail(msg, None, "option")
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

    # --- lifetime -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Send NBD_CMD_DISC (a soft disconnect) and close (idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._disconnect("closed")

    def _disconnect(self, why: str) -> None:
        """A soft disconnect: NBD_CMD_DISC (in the transmission phase, on a stream still
        in step), then the socket closed; later calls fail naming ``why``."""
        sock = self._sock
        if sock is not None and self._broken is None and self._in_transmission:
            try:
                sock.settimeout(min(self.timeout, 5.0))
                self._cookie += 1
                sock.sendall(P.pack_request(P.NBD_CMD_DISC, self._cookie))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._broken = why
        self._drop()


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
