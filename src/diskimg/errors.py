"""The whole diskimg exception hierarchy, and nothing else.

Each class says whose fault a failure is: the caller's (:class:`UsageError`), the image's
bytes (:class:`FormatError` and subclasses), the files around it
(:class:`BackingChainError`), secrets (:class:`EncryptionError`) or another process
(:class:`ImageLockedError`).

Besides its message, an error may say which file (``path``), which operation
(``operation``: ``"open"``, ``"open backing file"`` ...), why (``reason``, the words
after the file and the operation) and which option or field (``field``) it is about, and
carry further lines of its own (``notes``).  ``str(error)`` is the message alone; the CLI
(``diskimg.cli.errors``) words these fields as qemu-img does and exits 1.
"""

from __future__ import annotations


class DiskImgError(Exception):
    """Base class of every error diskimg raises on purpose."""

    #: when opening a backing file failed: that file, and the error's words before
    #: ``Could not open backing file: `` was put in front of them (set once, innermost)
    backing_path: str | None = None
    backing_reason: str | None = None
    #: the file the error is about, the operation that failed and why (None: not known)
    path: str | None = None
    operation: str | None = None
    reason: str | None = None
    #: the option or header field at fault (``"size"``: a size that does not parse)
    field: str | None = None
    #: further lines after the message, each one of its own (not part of ``str(error)``)
    notes: tuple[str, ...] = ()

    def __init__(self, *args: object, path: str | None = None,
                 operation: str | None = None, reason: str | None = None,
                 field: str | None = None, notes: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        # set on the instance only when given: ImageLockedError (an OSError too) keeps
        # its own ``filename`` and the class defaults above stay shared
        if path is not None:
            self.path = path
        if operation is not None:
            self.operation = operation
        if reason is not None:
            self.reason = reason
        if field is not None:
            self.field = field
        if notes:
            self.notes = notes


class UsageError(DiskImgError, ValueError):
    """The caller asked for something impossible: a bad option, size or mode."""


class ClosedImageError(UsageError):
    """A call on an image (or a view or file object over it) after ``close()``."""


class FormatError(DiskImgError):
    """The bytes of an image are not what its format allows."""

    def __init__(self, message: str, *, offset: int | None = None, path: str | None = None,
                 operation: str | None = None, reason: str | None = None,
                 field: str | None = None, notes: tuple[str, ...] = ()) -> None:
        super().__init__(message, path=path, operation=operation, reason=reason,
                         field=field, notes=notes)
        self.offset = offset


class WrongFormatError(FormatError):
    """Probe result: the file is not in the format that was asked for."""


class UnsupportedFeatureError(FormatError):
    """Valid image, but it uses a feature diskimg does not implement."""


class CorruptImageError(FormatError):
    """Metadata is inconsistent (tables overlap, point past the end, ...)."""


class BackingChainError(DiskImgError):
    """A backing file is missing, loops, is too deep, or was refused by the open policy."""


class EncryptionError(DiskImgError):
    """Problems with encryption keys or secrets."""


class MissingSecretError(EncryptionError):
    """The image is encrypted and no secret was given (raised on data access only)."""


class InvalidPassphraseError(EncryptionError):
    """No key slot opens with the given passphrase."""


class ImageLockedError(DiskImgError, BlockingIOError):
    """Another process holds QEMU's lock bytes on the image."""


class RemoteError(DiskImgError):
    """A remote source (an HTTP URL) failed: an HTTP status, a dropped connection, a
    timeout, a response that is not the bytes asked for, or an object that changed since
    it was opened.  ``url`` and ``offset`` (None: not a read) say where; ``status`` is the
    HTTP status when there was one."""

    def __init__(self, message: str, *, url: str | None = None, offset: int | None = None,
                 status: int | None = None, path: str | None = None,
                 operation: str | None = None, reason: str | None = None,
                 field: str | None = None, notes: tuple[str, ...] = ()) -> None:
        super().__init__(message, path=path or url, operation=operation, reason=reason,
                         field=field, notes=notes)
        self.url = url or path
        self.offset = offset
        self.status = status


class PoolError(DiskImgError):
    """Storage pool or volume problems: exists, not found, bad XML."""


__all__ = [
    "BackingChainError",
    "ClosedImageError",
    "CorruptImageError",
    "DiskImgError",
    "EncryptionError",
    "FormatError",
    "ImageLockedError",
    "InvalidPassphraseError",
    "MissingSecretError",
    "PoolError",
    "RemoteError",
    "UnsupportedFeatureError",
    "UsageError",
    "WrongFormatError",
]
