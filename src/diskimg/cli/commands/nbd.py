"""diskimg nbd: serve an image over NBD, with qemu-nbd's options and meanings."""

from __future__ import annotations

import os
import sys

from diskimg.cli.commands._shared import (CACHE_MODES, Context, _suppress, one_file,
                                          open_image)
from diskimg.cli.errors import ExitCode

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import socket
    import ssl
    from collections.abc import Callable

USAGE = ('[-f FMT] [-r] [-x NAME] [-D TEXT] [-t] [-e N] [-k SOCKET | [-p PORT] [-b ADDR]] '
         '[-A] [-B BITMAP] [--discard=ignore|unmap] [--tls-creds=ID|DIR] [--fork] '
         '[--pid-file=PATH] [--object OBJ] [--image-opts] FILE')
DESCRIPTION = '''Export the image over NBD (qemu-nbd's options, same meanings).

The server listens on 127.0.0.1 port 10809 unless -b/-p/-k say otherwise, serves one
client at a time (-e N: N at once), and exits when its last client disconnects unless
-t is given.  The image is locked as qemu-nbd locks it for as long as it is served.
Any format and any source diskimg opens can be exported (qcow2, vmdk, raw, luks; a file,
an http(s):// or s3:// URL with -r).'''
EXAMPLE = 'diskimg nbd -r -t -x disk disk.qcow2   # then: nbdinfo nbd://127.0.0.1/disk'

DISCARD_MODES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
AIO_MODES = ("threads", "native", "io_uring")


def register(p: argparse.ArgumentParser) -> None:
    """This command's options (qemu-nbd's)."""
    p.add_argument("-f", "--format", metavar="FMT", help="image format (probed if absent)")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-x", "--export-name", metavar="NAME", default="",
                   help="export name (default: the empty name)")
    p.add_argument("-D", "--description", metavar="TEXT", default="",
                   help="a human-readable description of the export")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-e", "--shared", metavar="N", default="1",
                   help="serve up to N clients at once (default 1; 0: no limit)")
    p.add_argument("-k", "--socket", metavar="PATH",
                   help="listen on a Unix socket (then -p and -b are ignored)")
    p.add_argument("-p", "--port", metavar="PORT", help="TCP port (default 10809)")
    p.add_argument("-b", "--bind", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1)")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="expose the qemu:allocation-depth metadata context")
    p.add_argument("-B", "--bitmap", action="append", default=[], metavar="NAME",
                   help="expose the persistent dirty bitmap NAME (qemu:dirty-bitmap:NAME)")
    p.add_argument("--discard", metavar="MODE", help="ignore (default) or unmap")
    p.add_argument("--tls-creds", metavar="ID|DIR",
                   help="TLS: a tls-creds-x509 --object id, or its directory")
    p.add_argument("--fork", action="store_true",
                   help="return once the server listens; it runs in the background")
    p.add_argument("--pid-file", metavar="PATH", help="write the server's process id")
    p.add_argument("--object", dest="nbd_object", action="append", default=[],
                   metavar="OBJ", help="secret,id=ID,data=S|file=PATH or "
                   "tls-creds-x509,id=ID,dir=DIR,endpoint=server")
    p.add_argument("--image-opts", action="store_true",
                   help="FILE is an option string (driver=...,file.filename=...)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without taking QEMU's image locks (needs -r)")
    p.add_argument("--cache", metavar="MODE", help="accepted (the host cache is the OS's)")
    p.add_argument("--aio", metavar="MODE", help="accepted (threads|native|io_uring)")
    p.add_argument("--handshake-limit", metavar="N", default="10",
                   help="seconds a client has for its handshake (default 10; 0: no limit)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report each client that breaks the protocol on stderr")
    p.add_argument("files", nargs="*", help=_suppress())


def _int(text: str, what: str, lo: int, hi: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ExitCode(f"Invalid {what} '{text}'", 1)
    return value


def _tls(ctx: Context, a: argparse.Namespace, objects: list[str]) -> ssl.SSLContext | None:
    from diskimg.nbd.tls import parse_tls_object, server_context

    creds: dict[str, tuple[str, bool]] = {}
    for text in objects:
        oid, directory, verify = parse_tls_object(text)
        creds[oid] = (directory, verify)
    if a.tls_creds is None:
        return None
    if a.tls_creds in creds:
        directory, verify = creds[a.tls_creds]
    elif os.path.isdir(a.tls_creds):
        directory, verify = a.tls_creds, True
    else:
        raise ExitCode(f"No TLS credentials with id '{a.tls_creds}'", 1)
    return server_context(directory, verify_peer=verify)


def _check(a: argparse.Namespace) -> None:
    if a.force_share and not a.read_only:
        raise ExitCode("--share requires read-only mode", 1)
    if a.cache is not None and a.cache not in CACHE_MODES:
        raise ExitCode(f"Invalid cache mode '{a.cache}'", 1)
    if a.aio is not None and a.aio not in AIO_MODES:
        raise ExitCode(f"Invalid aio mode '{a.aio}'", 1)
    if a.discard is not None and a.discard not in DISCARD_MODES:
        raise ExitCode(f"Invalid discard mode `{a.discard}'", 1)


def cmd_nbd(ctx: Context, a: argparse.Namespace) -> int:
    """qemu-nbd."""
    name = one_file(a)
    _check(a)
    shared = _int(a.shared, "shared device number", 0, 1 << 20)  # 0: no limit (qemu-nbd)
    port = _int(a.port, "port number", 0, 65535) if a.port is not None else 10809
    limit = _int(a.handshake_limit, "handshake limit", 0, 1 << 20)
    tls_objects = [o for o in a.nbd_object if o.split(",", 1)[0] in
                   ("tls-creds-x509", "qom-type=tls-creds-x509")]
    secret_objects = [o for o in a.nbd_object if o not in tls_objects]
    if secret_objects:
        from diskimg.secrets import parse_objects

        ctx.secrets = parse_objects(secret_objects)
    tls = _tls(ctx, a, tls_objects)
    ready_fd = None
    if a.fork:
        parent_code, ready_fd = _fork()
        if parent_code is not None:
            return parent_code
    # from here on, in the server process
    from diskimg.nbd.export import Export
    from diskimg.nbd.server import Server, listen_tcp, listen_unix

    dev = open_image(ctx, name, "r" if a.read_only else "r+", a.format,
                     image_opts=a.image_opts, force_share=a.force_share)
    listeners: list[socket.socket] = []
    try:
        export = Export(dev, a.export_name, description=a.description,
                        read_only=a.read_only, shared=shared,
                        discard=DISCARD_MODES[a.discard or "ignore"],
                        allocation_depth=a.allocation_depth, bitmaps=a.bitmap)
        try:
            listeners = (listen_unix(a.socket) if a.socket is not None
                         else listen_tcp(a.bind or "127.0.0.1", port))
        except OSError as e:
            where = a.socket if a.socket is not None else f"{a.bind or '127.0.0.1'}:{port}"
            raise ExitCode(f"Failed to listen on {where}: {e.strerror or e}", 1) from None
        server = Server(export, listeners, shared=shared, persistent=a.persistent, tls=tls,
                        handshake_timeout=float(limit),
                        log=(lambda m: print(f"{ctx.prog}: {m}", file=sys.stderr))
                        if a.verbose else None)
        if a.pid_file:
            with open(a.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        _on_signals(server.shutdown)
        if ready_fd is not None:
            _ready(ready_fd)
        server.serve()
    finally:
        for s in listeners:
            s.close()
        if a.socket is not None and listeners:
            try:
                os.unlink(a.socket)
            except OSError:
                pass
        dev.close()
        if a.pid_file:
            try:
                os.unlink(a.pid_file)
            except OSError:
                pass
    return 0


def _on_signals(stop: Callable[[], None]) -> None:
    import signal

    def handler(signum: int, frame: object) -> None:
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _fork() -> tuple[int | None, int]:
    """qemu-nbd's --fork.  In the parent: waits until the child listens (exit code 0) or
    fails (1, the child having printed why) and returns ``(code, -1)``; in the child:
    ``(None, fd)``, the pipe to report readiness on (:func:`_ready`)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            ok = f.read(1) == b"\0"
        if not ok:
            os.waitpid(pid, 0)
        return (0 if ok else 1), -1
    os.close(r)
    os.setsid()
    return None, w


def _ready(fd: int) -> None:
    """Tell the waiting parent the server listens; detach from its terminal and pipes."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    os.close(devnull)
    os.write(fd, b"\0")
    os.close(fd)


run = cmd_nbd
