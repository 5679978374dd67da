"""A threaded NBD server: listening sockets, the accept loop, one thread per connection.

As qemu-nbd: at most ``shared`` clients are served at once (``-e``; 0: no limit; the
next ones wait in the listen queue until a slot frees), and unless ``persistent``
(``-t``) the server stops once its last client has left.  :meth:`Server.shutdown` (a
signal handler's call) stops accepting, ends every connection and returns from
:meth:`Server.serve`.

Library use::

    with diskimg.open("disk.qcow2", "r") as dev:
        srv = Server(Export(dev), listen_unix("/tmp/nbd.sock"), persistent=True)
        srv.serve()           # until srv.shutdown() from another thread or a signal
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import UsageError
from .export import Export
from .protocol import NBD_DEFAULT_PORT
from .session import Session

if TYPE_CHECKING:
    import ssl

#: seconds a client has for the whole handshake (qemu-nbd's --handshake-limit default)
HANDSHAKE_LIMIT = 10.0


def listen_tcp(host: str = "127.0.0.1", port: int = NBD_DEFAULT_PORT,
               backlog: int = 16) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (``port`` 0: a free
    port, the same on every address when possible)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"address resolution failed for {host}:{port}: {e.strerror}",
                         field="bind") from None
    out: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, stype, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            s = socket.socket(family, stype, proto)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(out) > 1:
                addr = (addr[0], out[0].getsockname()[1], *addr[2:])
            s.bind(addr)
            s.listen(backlog)
    except OSError:
        for s in out:
            s.close()
        raise
    return out


def listen_unix(path: str, backlog: int = 16) -> list[socket.socket]:
    """A listening Unix socket at ``path`` (an old socket there is replaced, as qemu-nbd
    does; any other file is left alone and refused).  The socket appears at ``path``
    already listening (bound under a temporary name, then renamed): a client that sees
    the file can connect."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "File exists", path)
    except FileNotFoundError:
        pass
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(tmp)
        s.listen(backlog)
        os.replace(tmp, path)
    except OSError:
        s.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return [s]


class Server:
    """Serve ``export`` on ``listeners`` (see the module docstring)."""

    def __init__(self, export: Export, listeners: Sequence[socket.socket], *,
                 shared: int | None = None, persistent: bool = False,
                 tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = HANDSHAKE_LIMIT,
                 log: Callable[[str], None] | None = None) -> None:
        self.export = export
        self.listeners = list(listeners)
        self.shared = export.shared if shared is None else shared
        if self.shared < 0:
            raise UsageError("Invalid shared device number", field="shared")
        self.persistent = persistent
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.log = log
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._threads: set[threading.Thread] = set()
        #: totals over the server's life (the tests print them)
        self.connections = 0
        self.requests = 0
        self.error_replies = 0

    @property
    def addresses(self) -> list[object]:
        """The addresses listened on (``(host, port)`` pairs, or socket paths)."""
        return [s.getsockname() for s in self.listeners]

    def serve(self) -> None:
        """Accept and serve clients until :meth:`shutdown` (or, unless persistent, until
        the last client has left)."""
        slots = threading.Semaphore(self.shared or sys.maxsize)  # 0: no limit
        try:
            while not self._stop.is_set():
                if not slots.acquire(timeout=0.2):
                    continue
                sock = self._accept()
                if sock is None:
                    slots.release()
                    continue
                t = threading.Thread(target=self._serve_one, args=(sock, slots),
                                     name="nbd-client", daemon=True)
                with self._lock:
                    self._threads.add(t)
                    self.connections += 1
                t.start()
        finally:
            for s in self.listeners:
                s.close()
            self._end_sessions()

    def _accept(self) -> socket.socket | None:
        try:
            ready, _, _ = select.select(self.listeners, [], [], 0.2)
        except (OSError, ValueError):  # a listener closed by shutdown()
            return None
        for ls in ready:
            try:
                sock, _ = ls.accept()
            except OSError:
                continue
            sock.setblocking(True)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None

    def _serve_one(self, sock: socket.socket, slots: threading.Semaphore) -> None:
        session = Session(sock, self.export, tls=self.tls,
                          handshake_timeout=self.handshake_timeout, log=self.log)
        with self._lock:
            self._sessions.add(session)
        try:
            session.run()
        except Exception as e:  # a bug must not take the server down with it
            print(f"nbd: internal error serving a client: {e!r}", file=sys.stderr)
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._threads.discard(threading.current_thread())
                self.requests += session.requests
                self.error_replies += session.error_replies
                if not self.persistent and not self._sessions:
                    self._stop.set()
            slots.release()

    def _end_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
            threads = list(self._threads)
        for s in sessions:
            try:
                s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout=30)

    def shutdown(self) -> None:
        """Stop accepting and end every connection; :meth:`serve` then returns."""
        self._stop.set()


__all__ = ["HANDSHAKE_LIMIT", "Server", "listen_tcp", "listen_unix"]
