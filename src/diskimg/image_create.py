"""Making a new image file, for :func:`diskimg.create` once it has checked its arguments
(and opened the backing file it was given, if any): a raw file, an NBD export's bytes, or
a luks, qcow2 or vmdk image; a refused create leaves no file behind.  Imported only by a
create (a command that opens images loads none of this: start-up, issue 20)."""

from __future__ import annotations

import os

from diskimg.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    PathLike = str | os.PathLike[str]


def make_image(path: PathLike, format: str, size: int,  # noqa: A002 - create's names
               backing_file: str | None, backing_fmt: str | None, opts: dict[str, Any],
               secrets: Mapping[str, bytes] | None, *, nbd: bool = False,
               lock: bool = True) -> None:
    """Create the image of :func:`diskimg.create` at ``path`` (``nbd``: on the NBD
    export ``path`` names, raw only); ``opts`` are its ``-o`` options, checked here.

    ``lock`` False: QEMU's lock bytes on the files made are neither tested nor taken.
    Only for a caller that already holds the write lock on ``path`` through a descriptor
    of its own (which a second one would conflict with), or was told to override a
    running QEMU's (``virsh vol-wipe --force``)."""
    if nbd:
        from diskimg.nbd.client_host import create_raw_on_export

        prealloc = str(opts.pop("preallocation", "off"))
        if opts:  # checked first: a refusal writes nothing
            raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
        create_raw_on_export(str(path), size, prealloc)
        return
    if format == "raw":
        from diskimg.hostio import open_host_file
        from diskimg.raw import create_raw

        prealloc = str(opts.pop("preallocation", "off"))
        if opts:  # checked first: a refusal creates and changes nothing (as qemu-img)
            raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
        existed = os.path.lexists(path)
        host = open_host_file(path, True, create=True, truncate=False, lock_mode=lock)
        try:
            create_raw(host, size, prealloc)
        except BaseException:
            if not existed:  # a refusal leaves no file behind (qemu-img leaves it empty)
                from diskimg.pool.locking import unlink_if_same

                unlink_if_same(host.fd, os.fspath(path))
            raise
        finally:
            host.close()
        return
    existed = os.path.lexists(path)
    try:
        _create_image(path, format, size, backing_file, backing_fmt, opts, secrets, lock)
    except BaseException:
        if not existed:  # a refused create leaves no file behind
            _remove_created(path)
        raise


def _create_image(path: PathLike, format: str, size: int,  # noqa: A002
                  backing_file: str | None, backing_fmt: str | None, opts: dict[str, Any],
                  secrets: Mapping[str, bytes] | None, lock: bool) -> None:
    """The luks, qcow2 and vmdk branches of :func:`make_image`."""
    if format == "luks":
        from diskimg.luks import create_luks_image

        create_luks_image(path, size, opts, dict(secrets or {}), lock=lock)
        return
    if format == "qcow2":
        from diskimg.hostio.file import path_name
        from diskimg.qcow2.create import create_qcow2

        create_qcow2(path_name(path), size, backing_file=backing_file, backing_fmt=backing_fmt,
                     options=opts, secrets=dict(secrets or {}), lock=lock)
        return
    from pathlib import Path

    from diskimg.vmdk import create_vmdk

    create_vmdk(Path(path), size, backing_file=backing_file, options=opts, lock=lock)


def _remove_created(path: PathLike) -> None:
    """Remove the file a failed create made at ``path`` (a regular file only, and only
    while the name still refers to it: never a file someone else put there since)."""
    import stat

    from diskimg.pool.locking import unlink_if_same

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            unlink_if_same(fd, os.fspath(path))
    finally:
        os.close(fd)
