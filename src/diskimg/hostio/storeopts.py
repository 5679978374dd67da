"""diskimg's own ``storage_options`` keys, taken out before the options reach a store's
client: ``x-timeout`` (seconds a read or the open may take: :mod:`diskimg.hostio.remote`)
and ``x-client`` (``"native"`` or ``"fsspec"``: which client serves ``s3://``,
:mod:`diskimg.hostio.s3conf`)."""

from __future__ import annotations

from diskimg.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

TIMEOUT_KEY = "x-timeout"
CLIENT_KEY = "x-client"


def split_timeout(url: str, storage_options: Mapping[str, Any] | None
                  ) -> tuple[dict[str, Any], float | None]:
    """``storage_options`` without diskimg's own keys (``x-timeout``, and ``x-client``,
    :mod:`diskimg.hostio.s3conf`'s), and the ``x-timeout`` value (seconds, more than 0;
    None when absent)."""
    opts = dict(storage_options or {})
    opts.pop(CLIENT_KEY, None)
    if TIMEOUT_KEY not in opts:
        return opts, None
    raw = opts.pop(TIMEOUT_KEY)
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = 0.0
    if not 0 < t <= 86400:
        raise UsageError(f"Cannot open '{url}': storage_options['{TIMEOUT_KEY}'] must be "
                         f"a number of seconds, more than 0 and at most 86400 (got {raw!r})",
                         path=url, field=TIMEOUT_KEY)
    return opts, t
