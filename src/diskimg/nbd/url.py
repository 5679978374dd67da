"""NBD URLs (the NBD URI standard, doc/uri.md of the NBD project): where an export is and
how to reach it.

- ``nbd://HOST[:PORT]/EXPORT`` (also ``nbd+tcp://``): TCP, port 10809 by default;
- ``nbd+unix:///EXPORT?socket=PATH``: a Unix domain socket;
- ``nbds://`` and ``nbds+unix://``: the same over TLS (the connection fails when TLS
  cannot be negotiated); query parameters ``tls-certificates=DIR`` (``ca-cert.pem``, and
  ``client-cert.pem``/``client-key.pem`` when present, as libnbd's and qemu's x509
  credential directories), ``tls-hostname=NAME`` and ``tls-verify-peer=0|1``.

The export name is the path without its leading ``/``, percent-decoded
(``nbd://h//disk`` names ``/disk``).  Unknown query parameters are refused (the standard
asks parsers to diagnose them), ``x-`` ones excepted.  diskimg reads one of those:
``x-timeout=SECONDS``, the seconds the client waits for the connect and for each socket
operation (default 30; e.g. ``nbd://h/disk?x-timeout=5``); qemu-img does not take it.
"""

from __future__ import annotations

from diskimg.errors import UsageError
from diskimg.slotted import FrozenRecord, set_fields

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbd+tcp", "nbd+unix", "nbds", "nbds+unix")
MAX_NAME = 4096  # the protocol's string limit: an export name longer cannot be sent
_TLS_PARAMS = ("tls-certificates", "tls-hostname", "tls-verify-peer", "tls-type")


class NbdAddress(FrozenRecord):
    """Where one export is: a TCP ``host``/``port`` or a Unix ``socket`` path, the
    ``export`` name, and whether and how to use TLS."""

    __slots__ = ("url", "host", "port", "socket", "export", "tls", "tls_certificates",
                 "tls_hostname", "tls_verify", "timeout")
    url: str
    host: str | None
    port: int
    socket: str | None
    export: str
    tls: bool
    tls_certificates: str | None
    tls_hostname: str | None
    tls_verify: bool
    timeout: float | None  # x-timeout (None: the client's default)

    def __init__(self, url: str, host: str | None, port: int, socket: str | None,
                 export: str, tls: bool, tls_certificates: str | None = None,
                 tls_hostname: str | None = None, tls_verify: bool = True,
                 timeout: float | None = None) -> None:
        set_fields(self, url, host, port, socket, export, tls, tls_certificates,
                   tls_hostname, tls_verify, timeout)


def is_nbd_url(name: str) -> bool:
    """Whether ``name`` is an NBD URL (one of :data:`SCHEMES`)."""
    head, sep, _ = name.partition("://")
    return bool(sep) and head.lower() in SCHEMES


def legacy_url(name: str) -> str:
    """The URL qemu's legacy NBD file name ``name`` means: ``nbd:HOST:PORT`` or
    ``nbd:unix:PATH``, either followed by ``:exportname=NAME`` (the rest of the name);
    an IPv6 ``HOST`` in brackets.  A :class:`UsageError` naming the part at fault when
    ``name`` is not one (qemu's messages)."""
    from urllib.parse import quote

    def bad(why: str, field: str) -> UsageError:
        return UsageError(why, path=name, field=field)

    rest = name[4:] if name.startswith("nbd:") else ""
    where, sep, export = rest.partition(":exportname=")
    if sep and not export:
        raise bad("NBD server address missing", "exportname")
    path = "/" + quote(export, safe="") if export else ""
    if where.startswith("unix:"):
        if not where[5:]:
            raise bad("NBD server address missing", "socket")
        return f"nbd+unix://{path or '/'}?socket={quote(where[5:], safe='/')}"
    host, colon, port = where.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad(f"error parsing address '{where}'", "address")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or "[" in bare or "]" in bare or (":" in bare and bare == host):
        raise bad(f"error parsing address '{where}'", "address")
    host = f"[{bare}]" if ":" in bare else bare  # brackets only around IPv6
    return f"nbd://{host}:{port}{path}"


def parse(url: str) -> NbdAddress:
    """The address ``url`` names, or a :class:`UsageError` naming the URL and the part
    (``field``) that is wrong."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    def bad(why: str, field: str) -> UsageError:
        return UsageError(f"Invalid NBD URL '{url}': {why}", path=url, field=field)

    try:
        p = urlsplit(url)
        port = p.port
    except ValueError as e:
        raise bad(str(e), "port") from None
    scheme = p.scheme.lower()
    if scheme not in SCHEMES:
        raise bad(f"the scheme must be one of {', '.join(SCHEMES)}", "scheme")
    if p.fragment:
        raise bad("a fragment (#...) is not allowed", "fragment")
    try:
        query = parse_qsl(p.query, keep_blank_values=True, strict_parsing=bool(p.query),
                          errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise bad(f"the query '{p.query}' does not parse", "query") from None
    params: dict[str, str] = {}
    for k, v in query:
        if k in params:
            raise bad(f"the query parameter '{k}' is given twice", k)
        if k != "socket" and k not in _TLS_PARAMS and not k.startswith("x-"):
            raise bad(f"unknown query parameter '{k}'", k)
        params[k] = v
    try:
        export = unquote(p.path[1:] if p.path.startswith("/") else p.path, errors="strict")
    except UnicodeDecodeError:
        raise bad("the export name is not UTF-8", "export") from None
    if "\0" in export or len(export.encode()) > MAX_NAME:
        raise bad(f"the export name must hold no NUL and at most {MAX_NAME} bytes",
                  "export")
    tls = scheme.startswith("nbds")
    if not tls and any(k in params for k in _TLS_PARAMS):
        raise bad("TLS parameters need the nbds:// or nbds+unix:// scheme", "scheme")
    verify = params.get("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise bad("tls-verify-peer must be 0 or 1", "tls-verify-peer")
    if params.get("tls-type", "x509") != "x509":
        raise bad("only tls-type=x509 is supported", "tls-type")
    timeout = None
    if "x-timeout" in params:
        try:
            timeout = float(params["x-timeout"])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 86400:  # also refuses nan and inf
            raise bad("x-timeout must be a number of seconds, more than 0 and at most "
                      "86400", "x-timeout")
    if scheme.endswith("+unix"):
        sock = params.get("socket")
        if not sock:
            raise bad("a Unix socket URL needs ?socket=PATH", "socket")
        if p.netloc:
            raise bad("a Unix socket URL has no host (nbd+unix:///EXPORT?socket=PATH)",
                      "host")
        return NbdAddress(url, None, 0, sock, export, tls, params.get("tls-certificates"),
                          params.get("tls-hostname"), verify == "1", timeout)
    if "socket" in params:
        raise bad("?socket= needs the nbd+unix:// scheme", "socket")
    if p.username is not None or p.password is not None:
        raise bad("user information is not supported", "userinfo")
    host = p.hostname
    if not host:
        raise bad("no host", "host")
    return NbdAddress(url, host, DEFAULT_PORT if port is None else port, None, export, tls,
                      params.get("tls-certificates"), params.get("tls-hostname"),
                      verify == "1", timeout)


def display_name(address: NbdAddress) -> str:
    """The URL as qemu spells an NBD image's file name (``nbd://HOST:PORT[/EXPORT]``,
    ``nbd+unix://[/EXPORT]?socket=PATH``), so that ``info`` and ``map`` print what
    qemu-img prints (the export name as the server knows it, not percent-encoded, as
    qemu prints it); a TLS URL keeps its parameters and is shown as given."""
    if address.tls:
        return address.url
    export = "/" + address.export if address.export else ""
    if address.socket is not None:
        return f"nbd+unix://{export}?socket={address.socket}"
    host = f"[{address.host}]" if address.host and ":" in address.host else address.host
    return f"nbd://{host}:{address.port}{export}"
