"""Names an image holds, two rules, each written once.

The protocol prefix of a file name an image holds (a backing file, a data file, an
extent): the one grammar :mod:`diskimg.policy` and :mod:`diskimg.hostio.urls` test names
against.

How every name an image stores is kept as bytes and handled as text (qcow2's snapshot ids
and names, bitmap names, feature names, backing file, backing format and data file; vmdk's
extent and parent file names): a name is stored as its UTF-8 bytes.  Bytes that are not
UTF-8 survive as lone surrogates (``surrogateescape``, as ``sys.argv`` and ``os.fsdecode``
decode them), so a name read and written back is the same bytes, a name typed on the
command line finds it, a file name opens that file, the CLI prints its bytes as they are
(its streams use ``surrogateescape``) and JSON shows U+FFFD for each, as qemu does.  Text
that no decoding of bytes gives (a lone surrogate that stands for no byte) is the caller's
error; so is a NUL byte in a name QEMU reads as a C string, where it would end the name
early (the name read back, and the file opened, would be another).

A leaf module of pure functions (no I/O), imported when an image names a file or stores a
name (start-up: no ``re``; an image without names never loads it).
"""

from __future__ import annotations

from diskimg.errors import UsageError


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


def name_text(raw: bytes) -> str:
    """A stored name as text (the inverse of :func:`raw_name`)."""
    return raw.decode("utf-8", "surrogateescape")


def raw_name(text: str, what: str = "Name") -> bytes:
    """The bytes that store ``text``; :class:`UsageError` naming ``what`` for a lone
    surrogate that stands for no byte."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid text (a lone surrogate that stands for no "
                         "byte)") from None


def raw_c_name(text: str, what: str) -> bytes:
    """:func:`raw_name` of a name read as a C string (a qcow2 backing or data file name or
    backing format, a vmdk extent or parent file name): also :class:`UsageError` for a NUL
    byte."""
    raw = raw_name(text, what)
    if b"\0" in raw:
        raise UsageError(f"{what} cannot hold a NUL byte")
    return raw
