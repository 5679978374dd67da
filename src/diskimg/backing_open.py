"""Following an image's backing file, for :func:`diskimg.open`: where the file is, which
format and image options it opens with, the name it is shown by, and qemu's words when it
does not open.  Imported only when an image names a backing file (an image without one
loads none of this: start-up, issue 20)."""

from __future__ import annotations

import os

from diskimg.errors import BackingChainError, DiskImgError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.policy import OpenPolicy

    PathLike = str | os.PathLike[str]


def resolve(policy: OpenPolicy, name: str, parent: str, *, local: bool, url: bool,
            top: str | None = None,
            storage_options: Mapping[str, Any] | None = None) -> str | Host:
    """The backing file ``name`` of the image whose host is named ``parent`` (``local``:
    a local file; ``url``: an image read from a URL): a local path (the policy's
    :meth:`~OpenPolicy.resolve_name`), or for an image read from a URL, a host in the
    same store (:func:`diskimg.hostio.urls.open_backing`)."""
    if url:
        from diskimg.hostio.urls import open_backing

        got = open_backing(name, parent, policy, top=top, storage_options=storage_options)
        return got if not isinstance(got, os.PathLike) else os.fspath(got)
    return policy.resolve_name(name, parent, local=local)


def blame(e: DiskImgError, path: Path | str) -> None:
    """qemu's words for a backing file that would not open (a wrong passphrase, a
    corrupt header): ``Could not open backing file: `` before the reason, once per level
    of the chain; the innermost level also records the file and the bare reason
    (:attr:`DiskImgError.backing_path`).  The error keeps its class and offset.
    BackingChainError already names the files involved (missing, looping, refused by the
    policy) and is left as it is."""
    if isinstance(e, BackingChainError) or len(e.args) != 1 or not isinstance(e.args[0], str):
        return
    if e.backing_path is None:
        e.backing_path, e.backing_reason = str(path), e.args[0]
    e.args = (f"Could not open backing file: {e.args[0]}",)


def open_options(options: Mapping[str, str], bfmt: str | None,
                 bpath: Path | str) -> tuple[str | None, dict[str, str]]:
    """The format and image options to open the backing file ``bpath`` with.
    ``backing.driver`` sets its format (as in qemu); ``backing.file.filename`` may only
    name the file the header names (diskimg follows no other), and the other
    ``backing.file.*`` options are the file protocol's."""
    if not any(k.startswith("backing.") for k in options):
        return bfmt, {}
    from diskimg.image_options import backing_options as split
    from diskimg.image_options import check_protocol

    driver, sub = split(options)
    proto = {k[len("file."):]: v for k, v in sub.items() if k.startswith("file.")}
    fname = proto.pop("filename", None)
    check_protocol(proto)
    if fname is not None and not _same_file(fname, bpath):
        raise UsageError(f"Image option 'backing.file.filename' names '{fname}', not the "
                         f"backing file '{bpath}' of the image header: diskimg follows "
                         "only the header's backing file", field="backing.file.filename")
    return driver or bfmt, {k: v for k, v in sub.items() if not k.startswith("file.")}


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def display(parent: str, name: str) -> str:
    """The name a backing file opened for ``name`` (written in ``parent``) is shown by."""
    from diskimg.policy import combine

    if name.startswith("file:"):  # the policy opens it as a plain path (policy.resolve)
        name = name[5:]
    return combine(parent, name)
