"""Which files an image may make diskimg open (backing files, data files, vmdk extents).

qemu-img follows such names anywhere; diskimg never follows ``json:`` or protocol names,
never opens a device (block or character), FIFO, socket or directory an image names,
detects loops, caps chain depth, and with ``untrusted=True`` opens nothing outside the top
image's own directory.  (The image given on the command line may be a block device.)

An image that is not a local file -- opened over a file object or from a URL, whose host's
``path`` is a ``str`` -- never makes diskimg open a local file unless the caller's policy
says so (``allow_local_backing``).
"""

from __future__ import annotations

import os
import stat

from diskimg.errors import BackingChainError
from diskimg.slotted import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from diskimg.hostio.host import Host

MAX_CHAIN_DEPTH = 256


def combine(parent: str, name: str) -> str:
    """The path qemu shows for ``name`` as written in image ``parent``: ``name`` itself
    when absolute or protocol-prefixed (``file:``, ``json:`` ...), else ``name`` beside
    ``parent`` as both are written (``./x``, ``sub/../x`` stay as they are)."""
    from diskimg.hostio.names import protocol  # (a leaf module: on use)

    if name.startswith("/") or protocol(name) is not None:
        return name
    return os.path.join(os.path.dirname(parent), name)


class OpenPolicy(Record):
    """``untrusted``: confine every referenced file to ``allowed_dirs`` (default: the top
    image's directory).  ``max_depth``: longest backing chain accepted.
    ``allow_extents_outside``: let vmdk descriptors name extents outside their directory
    (qemu-img's behaviour; off by default).  ``allow_local_backing``: let an image that is
    not a local file (a file object, a URL) name local files -- a backing file, a data
    file; off by default, so such an image opens no local file.  A relative name is then
    taken relative to the image's own name when that is a local path (an open file's
    ``name``), else to the current directory.  ``allow_remote_backing``: let an image read
    from a URL name a backing file in another store (another scheme or host); its own
    store is allowed.  ``allow_nbd``: let an untrusted policy open an NBD URL given as
    the image to open (an image never names one: NBD backing names are always
    refused)."""

    __slots__ = ("untrusted", "allowed_dirs", "max_depth", "allow_extents_outside",
                 "allow_local_backing", "allow_remote_backing", "allow_nbd")
    untrusted: bool
    allowed_dirs: list[Path]
    max_depth: int
    allow_extents_outside: bool  # vmdk extents outside the descriptor's directory
    allow_local_backing: bool  # a file-object/URL image may name local files
    allow_remote_backing: bool  # a URL image may name another host or store
    allow_nbd: bool  # an untrusted policy may open a top-level NBD URL

    def __init__(self, untrusted: bool = False, allowed_dirs: list[Path] | None = None,
                 max_depth: int = MAX_CHAIN_DEPTH, allow_extents_outside: bool = False,
                 allow_local_backing: bool = False, allow_remote_backing: bool = False,
                 allow_nbd: bool = False) -> None:
        self.untrusted = untrusted
        self.allowed_dirs = [] if allowed_dirs is None else allowed_dirs
        self.max_depth = max_depth
        self.allow_extents_outside = allow_extents_outside
        self.allow_local_backing = allow_local_backing
        self.allow_remote_backing = allow_remote_backing
        self.allow_nbd = allow_nbd

    def for_top(self, top: str | os.PathLike[str]) -> OpenPolicy:
        """The policy to open the top image ``top`` and its chain with.

        An untrusted policy without ``allowed_dirs`` becomes a new policy confined to
        ``top``'s resolved directory; any other policy is returned unchanged (``self``).
        """
        if self.untrusted and not self.allowed_dirs:
            return OpenPolicy(True, [local_parent(top).resolve().parent], self.max_depth,
                              self.allow_extents_outside, self.allow_local_backing,
                              self.allow_remote_backing, self.allow_nbd)
        return self

    def resolve(self, name: str, parent: Path | str, what: str = "backing file") -> Path:
        """Resolve ``name`` (as written in ``parent``) to a path, or raise naming it.
        ``parent`` is the naming image's host ``path``: a ``str`` when it is not a local
        file, whose names are refused unless ``allow_local_backing``.  (The rules:
        :meth:`resolve_name`.)"""
        from pathlib import Path

        return Path(self.resolve_name(name, os.fspath(parent), what,
                                      local=not isinstance(parent, str)))

    def resolve_name(self, name: str, parent: str, what: str = "backing file", *,
                     local: bool) -> str:
        """:meth:`resolve` over names, without pathlib (an image naming a backing file is
        opened without it: start-up, issue 20).  ``parent`` is the naming image's host
        name, ``local`` whether that host is a local file (``Host.local``); the result is
        the path as pathlib would print it (:func:`~diskimg.hostio.file.path_name`)."""
        from diskimg.hostio.file import path_name
        from diskimg.hostio.names import protocol  # (a leaf module: on use)

        if not local:
            if not self.allow_local_backing:
                raise BackingChainError(
                    f"Refusing to open {what} '{name}' named by '{parent}': an image read "
                    "from a file object or URL opens no local file unless the open policy "
                    "allows it (OpenPolicy(allow_local_backing=True))",
                    path=name, operation=f"open {what}", reason="not allowed by the policy")
            parent = local_parent_name(parent)
        else:
            parent = path_name(parent)
        if name.startswith("json:") or (protocol(name) is not None
                                        and not name.startswith("file:")):
            raise BackingChainError(
                f"Refusing to open {what} '{name}' named by '{parent}': json: and protocol "
                "names are not followed")
        if name.startswith("file:"):
            name = name[5:]
        p = path_name(name)
        if not p.startswith("/"):
            p = path_name(f"{_parent_dir(parent)}/{p}")
        real = os.path.realpath(p)
        try:
            st: os.stat_result | None = os.stat(real)
            failed: OSError | None = None
        except OSError as err:
            st, failed = None, err
        why = None if failed is None else _loop(failed)
        if why is not None:  # a symlink loop is told before the policy (as pathlib did)
            raise BackingChainError(
                f"Could not open {what} '{p}' named by '{parent}': {why}",
                path=p, operation=f"open {what}", reason=why) from None
        if self.untrusted:
            if not any(within(real, os.fspath(d)) for d in self.allowed_dirs):
                raise BackingChainError(
                    f"Refusing to open {what} '{name}' named by '{parent}': it lies outside "
                    f"the allowed directories (--untrusted)")
        if isinstance(failed, FileNotFoundError):
            raise BackingChainError(
                f"Could not open {what} '{p}' named by '{parent}': No such file or directory",
                path=p, operation=f"open {what}", reason="No such file or directory"
            ) from None
        if failed is not None:  # ENOTDIR, ENAMETOOLONG, EACCES: still the name's fault
            raise BackingChainError(
                f"Could not open {what} '{p}' named by '{parent}': {failed.strerror}",
                path=p, operation=f"open {what}", reason=failed.strerror
            ) from None
        assert st is not None
        if not stat.S_ISREG(st.st_mode):  # devices too, with or without --untrusted
            kind = " (a block device)" if stat.S_ISBLK(st.st_mode) else ""
            raise BackingChainError(
                f"Refusing to open {what} '{name}' named by '{parent}': not a regular "
                f"file{kind}")
        return p


def _loop(err: OSError) -> str | None:
    """The words for ``err`` when it is a symlink loop (ELOOP), else None."""
    import errno  # only a name that did not stat gets here

    return os.strerror(errno.ELOOP) if err.errno == errno.ELOOP else None


def _parent_dir(name: str) -> str:
    """``str(pathlib.Path(name).parent)`` of a name :func:`path_name` made."""
    head, sep, tail = name.rpartition("/")
    if not sep:
        return "."
    if not tail:
        return name                       # the root itself
    return head or name[:len(name) - len(tail)]   # "/x" -> "/", "//x" -> "//"


def within(real: str, folder: str) -> bool:
    """``pathlib.Path(real).is_relative_to(folder)`` for a resolved ``real``: the same
    components, compared as names (no file system access)."""
    from diskimg.hostio.file import path_name

    d = path_name(folder)
    return real == d or real.startswith(d if d.endswith("/") else d + "/")


def local_parent(name: Path | str | os.PathLike[str]) -> Path:
    """The local path relative names in the image ``name`` are taken against: ``name``
    itself when it is a local path, else (a URL, a file object's ``<label>``) a name in the
    current directory."""
    from pathlib import Path

    if not isinstance(name, str):
        return Path(name)
    return Path(local_parent_name(name))


def naming_parent(host: Host) -> str:
    """The name the files ``host``'s image names are resolved against: a local file's
    name (so that no :class:`~pathlib.Path` is built), else its ``path`` -- a URL as given
    (an NBD host's ``name`` is qemu's spelling of it) or a file object's label."""
    return host.name if host.local else str(host.path)


def local_parent_name(name: str) -> str:
    """:func:`local_parent` of a name that is not a local file's host name: a URL's or a
    file object's ``<label>`` is a name in the current directory; any other is itself."""
    from diskimg.hostio.file import path_name
    from diskimg.hostio.names import protocol  # (a leaf module: on use)

    if name.startswith("<") or protocol(name) is not None:
        return os.path.join(os.getcwd(), "-")
    return path_name(name)


def full_name(name: str, parent: Path | str) -> str:
    """``name`` as written in ``parent`` made whole for display (qemu-img info's
    ``full_backing_filename``): joined to a URL parent as a URL, to a local one as a path."""
    from diskimg.hostio.names import protocol  # (a leaf module: on use)

    if name.startswith("/") or protocol(name) is not None:
        return name
    if isinstance(parent, str) and protocol(parent) is not None:
        from diskimg.hostio.urls import join

        return join(parent, name)
    return str(local_parent(parent).parent / name)
