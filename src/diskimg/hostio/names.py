"""The protocol prefix of a name an image holds (a backing file, a data file, an extent):
the one grammar :mod:`diskimg.policy` and :mod:`diskimg.hostio.urls` test names against.
A leaf module, imported when an image names a file (start-up: no ``re``)."""

from __future__ import annotations


def protocol(name: str) -> str | None:
    """The protocol ``name`` begins with, as written, when it begins ``protocol:`` (an
    ASCII letter, then ASCII letters, digits, ``+``, ``.`` or ``-``: RFC 3986's scheme,
    qemu's protocol prefix: ``file:``, ``json:``, ``nbd:``, ``https:`` ...); else None.
    The one rule for both (:func:`diskimg.hostio.urls.is_url` adds the ``//``;
    :mod:`diskimg.policy` follows no such name); written without ``re``, which an image
    naming a backing file need not load (start-up)."""
    head, colon, _ = name.partition(":")
    if colon and head.isascii() and head[:1].isalpha() \
            and head.replace("+", "").replace(".", "").replace("-", "").isalnum():
        return head
    return None
