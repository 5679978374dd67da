"""diskimg's own S3 client: ``s3://bucket/key`` read and written over
:mod:`diskimg.hostio.httpwire` with AWS Signature Version 4 (:mod:`diskimg.hostio.sigv4`),
no botocore, s3fs or fsspec at run time.  Which URLs it serves, and with which endpoint,
region and credentials: :mod:`diskimg.hostio.s3conf`.

- reading (:func:`open_s3`): an :class:`~diskimg.hostio.http.HttpHost` over the object's
  HTTP URL whose every request is signed: ranged GETs, the stream, the block cache,
  ETag pinning (``If-Match``), timeouts, the retry of a dropped connection and the
  error wording are HttpHost's; errors name the ``s3://`` URL and the offset, and a
  403 or a 404 at open says what it means;
- writing: :class:`~diskimg.hostio.s3sink.S3Sink` (a multipart upload), opened by
  :func:`diskimg.hostio.urls.open_url_sink`;
- :class:`S3Client`: one keep-alive connection for the upload's requests (each signed;
  a reply body read whole only up to :data:`MAX_REPLY` bytes, and only the XML fields
  needed are taken from it, by :func:`xml_field`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from diskimg.errors import RemoteError, UsageError
from diskimg.hostio.http import DEFAULT_TIMEOUT, HttpHost
from diskimg.hostio.httpwire import Connection, ProtocolError, Response
from diskimg.hostio.objects import read_error
from diskimg.hostio.s3conf import S3Config
from diskimg.hostio.sigv4 import UNSIGNED_PAYLOAD, sign

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from diskimg.hostio.http import Signer
    from diskimg.policy import OpenPolicy

#: the most bytes of a reply body read (S3's XML replies are a few hundred bytes)
MAX_REPLY = 64 << 10
_HINT = {403: "access denied: check the credentials (key, secret, token) and the "
              "bucket's policy",
         404: "no such object (or no such bucket)",
         301: "the bucket is in another region: set AWS_REGION (or storage_options "
              "client_kwargs={'region_name': ...})"}


def signer(cfg: S3Config) -> Signer | None:
    """The request signer of ``cfg``'s credentials (None: anonymous)."""
    creds = cfg.creds
    if creds is None:
        return None
    region = cfg.region

    def _sign(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        return sign(method, url, headers, creds, region)

    return _sign


def xml_field(body: bytes, name: str) -> str | None:
    """The text of the first ``<name>`` element of an S3 XML reply (entities
    unescaped), or None."""
    from xml.sax.saxutils import unescape

    m = re.search(rb"<%s>([^<]{0,4096})</%s>" % (name.encode(), name.encode()), body)
    if m is None:
        return None
    return unescape(m.group(1).decode("utf-8", "replace"), {"&quot;": '"', "&apos;": "'"})


def open_s3(url: str, policy: OpenPolicy | None = None, writable: bool = False,
            storage_options: Mapping[str, Any] | None = None, *,
            config: S3Config | None = None) -> HttpHost:
    """Open the object at ``s3://bucket/key`` read-only with the native client
    (``config``: as :func:`diskimg.hostio.s3conf.native_config` resolved it from
    ``storage_options``).  A fault raises :class:`~diskimg.errors.RemoteError` naming
    the URL (and the offset of a read)."""
    del policy
    if writable:
        raise UsageError(f"'{url}' is read-only (objects are not rewritten in place: "
                         "write a new one with convert)", path=url)
    if config is None:
        from diskimg.hostio.s3conf import native_config
        from diskimg.hostio.storeopts import CLIENT_KEY

        config = native_config(url, {**dict(storage_options or {}), CLIENT_KEY: "native"})
        assert config is not None
    try:
        return HttpHost(config.object_url(), timeout=config.timeout or DEFAULT_TIMEOUT,
                        sign=signer(config), name=url)
    except RemoteError as e:
        hint = _HINT.get(e.status or 0)
        if hint is None:
            raise
        raise read_error(url, f"HTTP {e.status}: {hint}", None, e.status) from None


class S3Client:
    """Signed requests to one S3 object over one keep-alive connection."""

    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        self.url = cfg.object_url()
        p = urlsplit(self.url)
        self._path = p.path
        self._conn = Connection(p.scheme, p.hostname or "", p.port,
                                cfg.timeout or DEFAULT_TIMEOUT)
        self.retried = False

    def call(self, method: str, query: str = "", headers: dict[str, str] | None = None,
             body: bytes | bytearray | memoryview | None = None,
             payload_hash: str = UNSIGNED_PAYLOAD, retry: bool = True
             ) -> tuple[Response, bytes]:
        """Send one request (``query`` as it goes on the wire) and read the reply: its
        head and its body (at most :data:`MAX_REPLY` bytes).  A connection that fails
        before the reply is tried once more when ``retry`` (``retried`` says so
        afterwards: the first attempt may have taken effect); then the
        ``OSError``/``ProtocolError``/``TimeoutError`` is the caller's."""
        self.retried = False
        url = self.url + (f"?{query}" if query else "")
        target = self._path + (f"?{query}" if query else "")
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        creds = self.cfg.creds
        for attempt in (0, 1):
            sent = hdrs if creds is None else sign(method, url, hdrs, creds, self.cfg.region,
                                                   payload_hash=payload_hash)
            try:
                resp = self._conn.request(method, target, sent, body)
                return resp, self._conn.read_body(resp, MAX_REPLY)
            except TimeoutError:
                self._conn.close()
                raise
            except (OSError, ProtocolError):
                self._conn.close()
                if attempt or not retry:
                    raise
                self.retried = True
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()
