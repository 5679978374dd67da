"""The configuration of diskimg's own S3 client (:mod:`diskimg.hostio.s3`): whether an
``s3://`` (or ``s3a://``) URL is served natively, and with which endpoint, region and
credentials.

The rule (:func:`native_config`, called by :mod:`diskimg.hostio.urls`, the one dispatch
place): the native client serves the URL when

- ``storage_options`` hold only the keys it understands: ``endpoint_url``, ``key``,
  ``secret``, ``token``, ``anon``, ``client_kwargs`` (with only ``endpoint_url`` and
  ``region_name``), diskimg's ``x-timeout`` and ``x-client``;
- and credentials resolve (or ``anon`` is true), from the first of: ``storage_options``
  (``key``/``secret``/``token``); the environment (fsspec's ``FSSPEC_S3_KEY`` /
  ``FSSPEC_S3_SECRET`` / ``FSSPEC_S3_TOKEN``, then ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``); the shared credentials file
  (``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``, profile ``AWS_PROFILE``
  or ``default``).

fsspec's own configuration counts as ``storage_options`` given first: once fsspec is
loaded, ``fsspec.config.conf["s3"]`` (its ``FSSPEC_S3_*`` variables and config files, or
what a program set); before, any ``FSSPEC_S3*`` variable other than the four above, or
any file in fsspec's configuration directory (``FSSPEC_CONFIG_DIR`` or
``~/.config/fsspec``), sends the URL to fsspec, which reads them.

Otherwise the URL goes to fsspec (s3fs and botocore find SSO, instance metadata, config
files ...).  ``storage_options={"x-client": "fsspec"}`` forces fsspec;
``{"x-client": "native"}`` forces the native client (an error when no credentials
resolve and ``anon`` is not set).

Endpoint: ``endpoint_url`` (or ``client_kwargs["endpoint_url"]``), else
``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; with one, the
object is addressed path-style (``ENDPOINT/bucket/key``); without, AWS's virtual-hosted
``https://bucket.s3.REGION.amazonaws.com/key`` (path-style for a bucket name with dots).
Region: ``client_kwargs["region_name"]``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the
profile's ``region`` in ``AWS_CONFIG_FILE`` (``~/.aws/config``), else ``us-east-1``.
"""

from __future__ import annotations

import os
import sys

from diskimg.errors import UsageError
from diskimg.hostio.storeopts import CLIENT_KEY, TIMEOUT_KEY, split_timeout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from diskimg.hostio.sigv4 import Credentials

_KEYS = frozenset({"endpoint_url", "key", "secret", "token", "anon", "client_kwargs",
                   TIMEOUT_KEY, CLIENT_KEY})
_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name"})


class S3Config:
    """Where an S3 object is and how requests to it are signed: ``url`` (the
    ``s3://`` URL, what messages name), ``bucket``, ``key``, ``endpoint`` (None: AWS),
    ``region``, ``creds`` (None: anonymous), ``timeout`` (None: the default)."""

    __slots__ = ("bucket", "creds", "endpoint", "key", "region", "timeout", "url")

    def __init__(self, url: str, bucket: str, key: str, endpoint: str | None, region: str,
                 creds: Credentials | None, timeout: float | None) -> None:
        self.url, self.bucket, self.key = url, bucket, key
        self.endpoint, self.region, self.creds, self.timeout = endpoint, region, creds, \
            timeout

    def base(self) -> str:
        """The HTTP URL of the bucket (no slash at the end)."""
        if self.endpoint is not None:
            return f"{self.endpoint.rstrip('/')}/{self.bucket}"
        if "." in self.bucket:
            return f"https://s3.{self.region}.amazonaws.com/{self.bucket}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com"

    def object_url(self) -> str:
        """The HTTP URL of the object (its key URI-encoded)."""
        from diskimg.hostio.sigv4 import quote_key

        return f"{self.base()}/{quote_key(self.key)}"


def split_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; a URL without a key is a UsageError."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise UsageError(f"'{url}' does not name an object (s3://BUCKET/KEY)", path=url)
    return bucket, key


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _ini(path: str | None, default: str, section: str) -> dict[str, str]:
    """The options of ``section`` in the ini file at ``path`` (default ``default``)."""
    import configparser

    p = os.path.expanduser(path or default)
    if not os.path.isfile(p):
        return {}
    cp = configparser.RawConfigParser()
    try:
        cp.read(p, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}
    return dict(cp[section]) if cp.has_section(section) else {}


def _credentials(opts: Mapping[str, Any]) -> Credentials | None:
    from diskimg.hostio.sigv4 import Credentials

    if opts.get("key") and opts.get("secret"):
        return Credentials(str(opts["key"]), str(opts["secret"]),
                           str(opts["token"]) if opts.get("token") else None)
    for k, s, t in (("FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN"),
                    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")):
        key, secret = os.environ.get(k), os.environ.get(s)
        if key and secret:
            return Credentials(key, secret, os.environ.get(t) or None)
    profile = _env("AWS_PROFILE") or "default"
    sec = _ini(os.environ.get("AWS_SHARED_CREDENTIALS_FILE"), "~/.aws/credentials", profile)
    if sec.get("aws_access_key_id") and sec.get("aws_secret_access_key"):
        return Credentials(sec["aws_access_key_id"], sec["aws_secret_access_key"],
                           sec.get("aws_session_token") or None)
    return None


def _region(ck: Mapping[str, Any]) -> str:
    if ck.get("region_name"):
        return str(ck["region_name"])
    env = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if env:
        return env
    profile = _env("AWS_PROFILE") or "default"
    section = profile if profile == "default" else f"profile {profile}"
    return _ini(os.environ.get("AWS_CONFIG_FILE"), "~/.aws/config",
                section).get("region") or "us-east-1"


#: fsspec's environment variables for s3 that this module reads (any other FSSPEC_S3*
#: variable configures s3fs in a way the native client does not follow)
_FSSPEC_ENV = frozenset({"FSSPEC_S3_ENDPOINT_URL", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET",
                         "FSSPEC_S3_TOKEN"})


def _fsspec_conf() -> dict[str, Any] | None:
    """fsspec's own s3 configuration as storage_options defaults (``fsspec.config.conf
    ["s3"]`` when fsspec is loaded: what its env variables and config files set, or a
    program set), or None when fsspec is configured in a way read only by fsspec: other
    ``FSSPEC_S3*`` variables, or (fsspec not loaded) a file in its configuration
    directory (``FSSPEC_CONFIG_DIR``, ``~/.config/fsspec``)."""
    mod = sys.modules.get("fsspec.config")
    if mod is not None:
        conf = mod.__dict__.get("conf", {}).get("s3")
        return dict(conf) if isinstance(conf, dict) else {}
    if any(k.startswith("FSSPEC_S3") and k not in _FSSPEC_ENV for k in os.environ):
        return None
    d = os.environ.get("FSSPEC_CONFIG_DIR") or os.path.expanduser("~/.config/fsspec")
    try:
        return None if os.listdir(d) else {}
    except OSError:
        return {}


def native_config(url: str, storage_options: Mapping[str, Any] | None) -> S3Config | None:
    """The native client's configuration for ``url`` (``s3://`` or ``s3a://``), or None
    when the URL goes to fsspec (the rule in this module's docstring)."""
    opts = dict(storage_options or {})
    client = opts.get(CLIENT_KEY, "")
    if client not in ("", "native", "fsspec"):
        raise UsageError(f"storage_options['{CLIENT_KEY}'] must be 'native' or 'fsspec' "
                         f"(got {client!r})", path=url, field=CLIENT_KEY)
    if client == "fsspec":
        return None
    fsconf = _fsspec_conf()
    if fsconf is None and client != "native":
        return None                      # fsspec is configured in ways not read here
    opts = {**(fsconf or {}), **opts}
    ck = opts.get("client_kwargs") or {}
    known = set(opts) <= _KEYS and isinstance(ck, dict) and set(ck) <= _CLIENT_KWARGS
    if not known:
        if client == "native":
            extra = sorted(set(opts) - _KEYS) or sorted(set(ck) - _CLIENT_KWARGS)
            raise UsageError(f"Cannot open '{url}' with the native S3 client: it does not "
                             f"understand storage_options {extra}", path=url,
                             field="storage_options")
        return None
    anon = opts.get("anon")
    anon = anon.strip().lower() in ("1", "true", "yes") if isinstance(anon, str) else bool(anon)
    creds = None if anon else _credentials(opts)
    if creds is None and not anon:
        if client == "native":
            raise UsageError(f"Cannot open '{url}' with the native S3 client: no "
                             "credentials (storage_options key/secret, AWS_ACCESS_KEY_ID "
                             "and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials) and not "
                             "anon", path=url, field="storage_options")
        return None
    _, timeout = split_timeout(url, opts)
    bucket, key = split_url(url)
    endpoint = (opts.get("endpoint_url") or ck.get("endpoint_url") or
                _env("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    if endpoint is not None:
        endpoint = str(endpoint)
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"Cannot open '{url}': endpoint_url {endpoint!r} is not an "
                             "http:// or https:// URL", path=url, field="endpoint_url")
    return S3Config(url, bucket, key, endpoint, _region(ck), creds, timeout)
