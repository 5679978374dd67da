"""What the NBD client tests share: qemu-nbd on a free TCP port, and a scripted NBD
server (:class:`FakeServer`) that speaks the protocol correctly up to the point where a
test makes it misbehave.  Built on the wire codec (:mod:`diskimg.nbd.protocol`)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from qemukit import serving

from diskimg.nbd import protocol as p


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, ok: int = 0) -> Result:
    """``diskimg ARGS`` in-process (a subprocess per command costs half a second of
    start-up); its exit code must be ``ok``."""
    from diskimg.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    r = Result(rc, out.getvalue(), err.getvalue())
    assert rc == ok, (args, r)
    return r


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def qemu_nbd_tcp(path: Path, *args: str, fmt: str = "qcow2") -> Iterator[str]:
    """``qemu-nbd -t -b 127.0.0.1 -p PORT ARGS PATH`` while the block runs; yields its
    ``nbd://127.0.0.1:PORT/`` URL.  The pid file appears once the port listens."""
    pid = path.parent / f"{path.name}.{os.getpid()}.pid"
    port = free_port()
    argv = ["qemu-nbd", "-t", "-b", "127.0.0.1", "-p", str(port), "--pid-file", str(pid),
            *args, "-f", fmt, str(path)]
    try:
        with serving(argv, pid):
            yield f"nbd://127.0.0.1:{port}/"
    finally:
        pid.unlink(missing_ok=True)


class Conn:
    """The server side of one connection: exact reads, and the bytes sent so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.sock.recv(n - len(out))
            if not b:
                raise ConnectionError("client went away")
            out += b
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


#: ``handler(conn, request)`` answers one transmission request (or misbehaves)
Handler = Callable[[Conn, p.Request], None]


def serve_read(data: bytes) -> Handler:
    """A correct handler over ``data``: READ as one OFFSET_DATA chunk, block status one
    data extent, everything else acknowledged."""
    def handler(c: Conn, r: p.Request) -> None:
        if r.type == p.NBD_CMD_READ:
            c.send(p.pack_offset_data(r.handle, r.offset, data[r.offset:r.offset + r.length],
                                      p.NBD_REPLY_FLAG_DONE))
        elif r.type == p.NBD_CMD_BLOCK_STATUS:
            c.send(p.pack_block_status(r.handle, 1, [(r.length, 0)], p.NBD_REPLY_FLAG_DONE))
        else:
            if r.type == p.NBD_CMD_WRITE:
                c.recv(r.length)
            c.send(p.pack_simple_reply(r.handle))
    return handler


class FakeServer:
    """An NBD server on a Unix socket in ``directory`` serving one client at a time on a
    thread: a correct fixed-newstyle handshake (structured replies, ``base:allocation``
    as context 1, NBD_OPT_GO with the export's size and ``flags``), then ``handler`` for
    every request.  ``greeting`` replaces the greeting's bytes; ``go`` replaces the reply
    to NBD_OPT_GO; ``old`` makes it a server without structured replies and GO.
    :attr:`requests` records what the client sent."""

    def __init__(self, directory: Path, handler: Handler, *, size: int = 1 << 20,
                 flags: int = p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_FLUSH
                 | p.NBD_FLAG_SEND_WRITE_ZEROES | p.NBD_FLAG_SEND_TRIM,
                 greeting: bytes | None = None, go: bytes | None = None,
                 min_block: int = 1, old: bool = False) -> None:
        self.path = str(directory / "fake.sock")
        self.url = f"nbd+unix:///disk?socket={self.path}"
        self.handler = handler
        self.size = size
        self.flags = flags
        self.greeting = greeting
        self.go = go
        self.min_block = min_block
        #: an old server: no structured replies, no GO (NBD_OPT_EXPORT_NAME only)
        self.old = old
        self.requests: list[p.Request] = []
        self.errors: list[BaseException] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                s, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(s)
            try:
                self._session(Conn(s))
            except (ConnectionError, OSError):
                pass
            except BaseException as e:  # a bug in the test's script: reported by close()
                self.errors.append(e)
            finally:
                s.close()

    def _session(self, c: Conn) -> None:
        c.send(self.greeting if self.greeting is not None else
               p.pack_server_greeting(p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES))
        if self.greeting is not None:
            c.recv(4)
            c.recv(1 << 20)  # wait for the client to hang up
        p.parse_client_flags(c.recv(4))
        while True:
            opt = p.parse_option_header(c.recv(p.OPTION_HEADER_SIZE))
            payload = c.recv(opt.length)
            if self.old and opt.option == p.NBD_OPT_EXPORT_NAME:
                c.send(p.pack_export_name_reply(self.size, self.flags, no_zeroes=True))
                break
            if self.old and opt.option != p.NBD_OPT_ABORT:
                c.send(p.pack_rep_error(opt.option, p.NBD_REP_ERR_UNSUP))
            elif opt.option == p.NBD_OPT_STRUCTURED_REPLY:
                c.send(p.pack_option_reply(opt.option, p.NBD_REP_ACK))
            elif opt.option == p.NBD_OPT_SET_META_CONTEXT:
                req = p.parse_meta_context_request(payload)
                if p.BASE_ALLOCATION in req.queries:
                    c.send(p.pack_option_reply(opt.option, p.NBD_REP_META_CONTEXT,
                                               p.pack_rep_meta_context(1, p.BASE_ALLOCATION)))
                c.send(p.pack_option_reply(opt.option, p.NBD_REP_ACK))
            elif opt.option == p.NBD_OPT_GO:
                if self.go is not None:
                    c.send(self.go)
                    c.recv(1 << 20)
                    return
                c.send(p.pack_option_reply(opt.option, p.NBD_REP_INFO,
                                           p.pack_info_export(self.size, self.flags)))
                c.send(p.pack_option_reply(opt.option, p.NBD_REP_INFO, p.pack_info_block_size(
                    self.min_block, max(4096, self.min_block), 1 << 25)))
                c.send(p.pack_option_reply(opt.option, p.NBD_REP_ACK))
                break
            else:
                c.send(p.pack_rep_error(opt.option, p.NBD_REP_ERR_UNSUP))
        while True:
            r = p.parse_request(c.recv(p.REQUEST_SIZE))
            self.requests.append(r)
            if r.type == p.NBD_CMD_DISC:
                return
            self.handler(c, r)

    def close(self) -> None:
        self._stop.set()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
        self._listener.close()
        assert not self.errors, self.errors

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
