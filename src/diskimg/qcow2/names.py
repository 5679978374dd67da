"""The one rule for names a qcow2 image stores as bytes (snapshot ids and names, bitmap
names) and diskimg handles as text: bytes that are not UTF-8 survive as lone surrogates
(``surrogateescape``, as ``sys.argv`` decodes them), so a name read and written back is
the same bytes, a name typed on the command line finds it, the CLI prints its bytes as
they are (its streams use ``surrogateescape``) and JSON shows U+FFFD for each, as qemu
does."""

from __future__ import annotations

__all__ = ["name_text", "raw_name"]


def name_text(raw: bytes) -> str:
    """A stored name as text (the inverse of :func:`raw_name`)."""
    return raw.decode("utf-8", "surrogateescape")


def raw_name(text: str) -> bytes:
    """The bytes that store ``text``; UnicodeEncodeError for a lone surrogate that stands
    for no byte (one no decoding of bytes gives)."""
    return text.encode("utf-8", "surrogateescape")
