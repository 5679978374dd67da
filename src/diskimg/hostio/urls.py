"""URL dispatch, in one place: which :class:`~diskimg.hostio.host.Host` opens a
``scheme://`` name.

``diskimg.open(url)`` and the CLI's source opening call :func:`open_url`.  Openers are
looked up by scheme: first those registered with :func:`register`; then ``http``/``https``
by :func:`diskimg.hostio.http.open_http`; ``nbd``, ``nbd+unix``, ``nbds`` ... by
:func:`diskimg.nbd.client_host.open_nbd` (an NBD export; never followed as a backing
name); ``s3://`` and ``s3a://`` by diskimg's own S3 client
(:func:`diskimg.hostio.s3.open_s3`: no botocore) when the ``storage_options`` hold only
the keys it understands and credentials resolve (or ``anon``) -- the rule is
:func:`diskimg.hostio.s3conf.native_config`'s; ``storage_options={"x-client":
"fsspec"}`` forces fsspec; any other scheme, and ``s3://`` otherwise, goes to fsspec
(:func:`diskimg.hostio.remote.open_fsspec`, the ``diskimg[remote]`` extra).  A URL
target of ``convert`` is opened by :func:`diskimg.hostio.url_sink.open_url_sink`, by
the same rule.  A URL is a
``str`` from end to end (never a :class:`~pathlib.Path`, which would fold ``http://h/x``
into ``http:/h/x``).

The backing file a remote image names is opened by :func:`open_backing`: in the same store
(same scheme and host) by default; another host or a local file only when the caller's
:class:`~diskimg.policy.OpenPolicy` allows it.
"""

from __future__ import annotations

from diskimg.errors import BackingChainError, UnsupportedFeatureError, UsageError

# Start-up (issue 20): convert asks every target name :func:`is_url`, so this module
# imports nothing heavy at module level (re, importlib, pathlib and typing are loaded by
# the functions that need them, or only for the type checker).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.hostio.s3conf import S3Config
    from diskimg.policy import OpenPolicy

    #: ``opener(url, policy)`` -> a read-only Host; ``opener(url, policy, writable=True)``
    #: for ``"r+"`` (an opener that cannot write refuses it)
    HostOpener = Callable[..., Host]

_OPENERS: dict[str, HostOpener] = {}
#: schemes whose opener lives in a module of diskimg: (module, function)
_NBD = ("diskimg.nbd.client_host", "open_nbd")
_BUILTIN = {"http": ("diskimg.hostio.http", "open_http"),
            "https": ("diskimg.hostio.http", "open_http"),
            "nbd": _NBD, "nbd+tcp": _NBD, "nbd+unix": _NBD, "nbds": _NBD, "nbds+unix": _NBD}
#: schemes diskimg's own S3 client serves (when :mod:`diskimg.hostio.s3conf` says so)
_S3 = ("s3", "s3a")
#: the opener of every other scheme (the ``diskimg[remote]`` extra)
_FSSPEC = ("diskimg.hostio.remote", "open_fsspec")
#: schemes never followed as a backing name inside an image (a name an image holds must
#: not make diskimg connect to a socket): the one rule, :func:`open_backing`'s
_NEVER_BACKING = ("nbd", "nbd+unix", "nbd+tcp", "nbds", "nbds+unix")


def top_level_name(name: str) -> str:
    """``name`` as opened at the top level (an image given by the user, never a name
    written inside an image): qemu's legacy NBD names ``nbd:HOST:PORT[:exportname=NAME]``
    and ``nbd:unix:PATH[:exportname=NAME]`` become the NBD URL they mean
    (:func:`diskimg.nbd.url.legacy_url`); any other name is returned as it is.  A backing
    name never goes through here: :func:`open_backing` refuses every NBD name, and a
    local backing name ``nbd:...`` is a file name (refused as a protocol name by the
    policy)."""
    if not name.startswith("nbd:") or name.startswith("nbd://"):
        return name
    from diskimg.nbd.url import legacy_url

    return legacy_url(name)


def is_url(name: str) -> bool:
    """Whether ``name`` is a URL (``scheme://...``) rather than a file name."""
    if "://" not in name:  # a plain file name: not even the scheme's rule
        return False
    return scheme(name) != ""


def scheme(url: str) -> str:
    """The URL's scheme, lower case ("" when ``url`` does not begin ``scheme://``: the
    scheme's rule is :func:`diskimg.hostio.names.protocol`'s)."""
    from diskimg.hostio.names import protocol

    got = protocol(url)
    return got.lower() if got is not None and url[len(got) + 1:].startswith("//") else ""


def register(name: str, opener: HostOpener) -> None:
    """Make ``opener`` open ``name://`` URLs (replacing the built-in choice)."""
    _OPENERS[name.lower()] = opener


def open_url(url: str, policy: OpenPolicy, writable: bool = False,
             storage_options: Mapping[str, Any] | None = None) -> Host:
    """Open the bytes at ``url``; an :class:`UnsupportedFeatureError` naming the scheme
    when nothing here opens it.  ``storage_options`` (the fsspec filesystem's: endpoint,
    credentials ...) go to :func:`~diskimg.hostio.remote.open_fsspec`; a URL that fsspec
    does not open (``http``/``https``, ``nbd``, a registered opener, ``file``) refuses
    them with a :class:`UsageError` rather than dropping them."""
    s = scheme(url)
    opener = _OPENERS.get(s)
    if storage_options and (opener is not None or s in _BUILTIN or s == "file"):
        raise UsageError(f"storage_options apply only to fsspec URLs (s3://, gs://, "
                         f"memory:// ...), not to '{url}'", path=url,
                         field="storage_options")
    if opener is not None:
        return _call(opener, url, policy, writable)
    if s == "file":
        raise UnsupportedFeatureError(f"Unsupported protocol 'file' in '{url}': give a "
                                      "local file by its path", path=url, field="protocol")
    if s in _BUILTIN:
        mod, fn = _BUILTIN[s]
        what = "NBD client" if (mod, fn) == _NBD else "HTTP host"
        opener = _load(mod, fn, url, f"Unsupported protocol '{s}' in '{url}': this "
                                     f"diskimg has no {what} yet")
        return _call(opener, url, policy, writable)
    if s in _S3:
        cfg = s3_config(url, storage_options)
        if cfg is not None:   # s3 -> http imports policy, which imports this module
            opener = _load("diskimg.hostio.s3", "open_s3", url, "no native S3 client")
            return opener(url, policy, writable, config=cfg)
    if _find_spec("fsspec") is None:
        raise UnsupportedFeatureError(
            f"Unsupported protocol '{s}' in '{url}': it needs fsspec; install "
            "diskimg[remote] (pip install 'diskimg[remote]')", path=url, field="protocol")
    opener = _load(*_FSSPEC, url,
                   f"Unsupported protocol '{s}' in '{url}': this diskimg has no fsspec "
                   "host yet")
    if storage_options:
        return opener(url, policy, writable, storage_options)
    return _call(opener, url, policy, writable)


def s3_config(url: str, storage_options: Mapping[str, Any] | None) -> S3Config | None:
    """The native S3 client's configuration of ``url``, or None: fsspec opens it (not
    an ``s3://`` URL, or the rule of :mod:`diskimg.hostio.s3conf` says so)."""
    if scheme(url) not in _S3:
        return None
    from diskimg.hostio.s3conf import native_config

    return native_config(url, storage_options)


def _call(opener: HostOpener, url: str, policy: OpenPolicy, writable: bool) -> Host:
    """``opener(url, policy)``; ``writable=True`` is passed only when asked for, so a
    read-only opener (``open_http(url, policy, *, timeout=...)``) needs no such argument."""
    return opener(url, policy, writable=True) if writable else opener(url, policy)


def _find_spec(name: str) -> object:
    import importlib.util

    return importlib.util.find_spec(name)


def _load(module: str, name: str, url: str, missing: str) -> HostOpener:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise UnsupportedFeatureError(missing, path=url, field="protocol") from None
    opener: HostOpener = mod.__dict__[name]
    return opener


def join(parent: str, name: str) -> str:
    """The relative name ``name`` written in the object at URL ``parent``, as a URL in the
    same store: beside ``parent``, ``..`` taken away (never above the root); any scheme
    (``urllib.parse.urljoin`` joins only the schemes it knows).  Query and fragment of
    ``parent`` are not carried over."""
    import posixpath
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(parent)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(p.path) or "/", name))
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return urlunsplit((p.scheme, p.netloc, path, "", ""))


def open_backing(name: str, parent: str, policy: OpenPolicy, *, top: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> Path | Host:
    """The backing file ``name`` written in the image at URL ``parent`` (whose chain's top
    image is ``top``, default ``parent``).

    A relative name is joined to ``parent`` (the same store).  A URL naming another scheme
    or host is refused unless ``policy.allow_remote_backing``; a local name (an absolute
    path, ``file:``) is the policy's to allow (:meth:`OpenPolicy.resolve`, which refuses it
    unless ``allow_local_backing``).  An untrusted policy also refuses, for every scheme,
    a URL outside the top image's prefix (``scheme://host/dir/``).  ``storage_options``
    (those the top image was opened with) go with a backing file in the same scheme.
    An NBD name (``nbd://``, ``nbd+unix://`` ...; or a relative name in an image read from
    an NBD export) is always refused."""
    from urllib.parse import urlsplit

    if name.startswith("json:"):
        raise BackingChainError(f"Refusing to open backing file '{name}' named by "
                                f"'{parent}': json: names are not followed")
    if name.startswith("/") or name.startswith("file:"):
        return policy.resolve(name, parent)
    full = name if is_url(name) else join(parent, name)
    a, b = urlsplit(parent), urlsplit(full)
    if b.scheme.lower() in _NEVER_BACKING:
        raise BackingChainError(
            f"Refusing to open backing file '{name}' named by '{parent}': NBD names are not "
            "followed", path=name, operation="open backing file",
            reason="not allowed by the policy")
    if (a.scheme.lower(), a.netloc.lower()) != (b.scheme.lower(), b.netloc.lower()) and \
            not policy.allow_remote_backing:
        raise BackingChainError(
            f"Refusing to open backing file '{name}' named by '{parent}': it lies in another "
            "store (OpenPolicy(allow_remote_backing=True) allows it)",
            path=name, operation="open backing file", reason="not allowed by the policy")
    if policy.untrusted:
        prefix = (top or parent).rsplit("/", 1)[0] + "/"
        if not full.startswith(prefix):
            raise BackingChainError(
                f"Refusing to open backing file '{name}' named by '{parent}': it lies "
                f"outside '{prefix}' (untrusted)", path=name,
                operation="open backing file", reason="not allowed by the policy")
    same = a.scheme.lower() == b.scheme.lower()
    return open_url(full, policy, False, storage_options if same else None)
