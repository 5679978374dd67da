"""AWS Signature Version 4 for S3 requests: pure functions, no I/O (stdlib ``hmac`` and
``hashlib``), following AWS's published SigV4 description:

- the canonical request: method, canonical URI (the request path as sent: S3 object keys
  are URI-encoded once, by :func:`quote_key`, ``/`` kept), canonical query string (each
  name and value URI-encoded, sorted by name then value; a name without a value is
  ``name=``), canonical headers (lower-case names, values with runs of spaces folded,
  sorted) and the signed header names, then the payload hash;
- the string to sign: ``AWS4-HMAC-SHA256``, the time stamp, the scope
  ``DATE/REGION/SERVICE/aws4_request`` and the SHA-256 of the canonical request;
- the signing key: HMAC-SHA256 chained over ``"AWS4" + secret``, the date, the region,
  the service and ``aws4_request``;
- the headers added: ``x-amz-date``, ``x-amz-content-sha256`` (``UNSIGNED-PAYLOAD`` for a
  streamed body, the SHA-256 of a small body, :data:`EMPTY_SHA256` for none),
  ``x-amz-security-token`` (temporary credentials) and ``Authorization``.

Every header given is signed (``Host`` is added from the URL, written as
:func:`diskimg.hostio.httpwire.host_header` sends it), except hop-by-hop ones and
``User-Agent``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlsplit

from diskimg.hostio.httpwire import host_header

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: headers never signed (a proxy or the connection may change them)
_UNSIGNED = frozenset({"authorization", "connection", "expect", "keep-alive",
                       "proxy-authorization", "te", "trailer", "transfer-encoding",
                       "upgrade", "user-agent"})


class Credentials:
    """An access key, its secret and the session token of temporary credentials."""

    __slots__ = ("key", "secret", "token")

    def __init__(self, key: str, secret: str, token: str | None = None) -> None:
        self.key, self.secret, self.token = key, secret, token

    def __repr__(self) -> str:      # never the secret
        return f"Credentials(key={self.key!r}, secret=..., token={'...' if self.token else None})"


def quote_key(key: str) -> str:
    """An object key as a URI path: every byte URI-encoded (UTF-8) except the unreserved
    ``A-Z a-z 0-9 - _ . ~`` and ``/``."""
    return quote(key, safe="/")


def _enc(s: str) -> str:
    return quote(s, safe="-_.~")


def canonical_query(query: str) -> str:
    """The canonical form of a query string as sent (``a=1&uploads``): each name and
    value decoded then URI-encoded, pairs sorted, a bare name as ``name=``."""
    from urllib.parse import unquote

    pairs = []
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        pairs.append((_enc(unquote(name)), _enc(unquote(value))))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived key of ``secret`` for one day (``YYYYMMDD``), region and service."""
    k = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        k = hmac.new(k, part.encode("utf-8"), hashlib.sha256).digest()
    return k


def canonical_request(method: str, path: str, query: str, headers: dict[str, str],
                      payload_hash: str) -> tuple[str, str]:
    """``(canonical request, signed header names)``; ``headers`` by lower-case name."""
    names = sorted(headers)
    canon = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
    signed = ";".join(names)
    return "\n".join((method.upper(), path or "/", canonical_query(query), canon, signed,
                      payload_hash)), signed


def sign(method: str, url: str, headers: dict[str, str], creds: Credentials, region: str,
         *, payload_hash: str = UNSIGNED_PAYLOAD, service: str = "s3",
         now: float | None = None) -> dict[str, str]:
    """``headers`` and the SigV4 headers of a request of ``method`` to ``url`` (its path
    and query exactly as they go on the wire), signed at ``now`` (seconds since the
    epoch; default: the current time).  ``Host`` is not added to the result (the
    connection sends it) but is signed."""
    p = urlsplit(url)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-amz-date",
                                                                  "x-amz-content-sha256",
                                                                  "x-amz-security-token")}
    out["X-Amz-Date"] = stamp
    out["X-Amz-Content-SHA256"] = payload_hash
    if creds.token:
        out["X-Amz-Security-Token"] = creds.token
    signed_headers = {k.lower(): v for k, v in out.items() if k.lower() not in _UNSIGNED}
    signed_headers["host"] = host_header(p.scheme, (p.hostname or "").lower(), p.port)
    creq, names = canonical_request(method, p.path, p.query, signed_headers, payload_hash)
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, stamp, scope,
                         hashlib.sha256(creq.encode("utf-8")).hexdigest()))
    sig = hmac.new(signing_key(creds.secret, stamp[:8], region, service),
                   to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"{ALGORITHM} Credential={creds.key}/{scope}, "
                            f"SignedHeaders={names}, Signature={sig}")
    return out
