"""The one choice of the sink behind a URL target of ``convert``
(:mod:`diskimg.ops.stream_convert`): diskimg's own S3 client or fsspec, by the rule of
:mod:`diskimg.hostio.s3conf` (the same as for reading, :mod:`diskimg.hostio.urls`)."""

from __future__ import annotations

from diskimg.hostio.urls import s3_config

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from diskimg.hostio.sink import Sink


def open_url_sink(url: str, storage_options: Mapping[str, Any] | None = None, *,
                  size_hint: int | None = None) -> Sink:
    """A new object at ``url`` written front to back (``convert``'s URL targets):
    ``s3://`` by the native client when :mod:`diskimg.hostio.s3conf`'s rule says so
    (:class:`~diskimg.hostio.s3sink.S3Sink`), any other store (and ``s3://`` otherwise)
    through fsspec (:func:`~diskimg.hostio.remote.open_fsspec_sink`)."""
    cfg = s3_config(url, storage_options)
    if cfg is not None:
        from diskimg.hostio.s3sink import open_s3_sink

        return open_s3_sink(cfg, size_hint=size_hint)
    from diskimg.hostio.remote import open_fsspec_sink

    return open_fsspec_sink(url, storage_options, size_hint=size_hint)
