"""Opening and creating images: the orchestration layer over the format classes."""

from __future__ import annotations

import os

from diskimg.device import BlockDevice
from diskimg.errors import BackingChainError, DiskImgError, UnsupportedFeatureError, UsageError
from diskimg.hostio import open_host_file, path_name
from diskimg.policy import OpenPolicy, naming_parent
from diskimg.probe import check_format, probe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Hashable, Mapping
    from typing import Any

    from diskimg.hostio.fileobj import BinaryFile
    from diskimg.hostio.host import Host

FORMATS = ("qcow2", "raw", "vmdk", "luks")
PathLike = str | os.PathLike[str]


def open(  # noqa: A001 - mirrors builtins.open on purpose
    path: PathLike | BinaryFile,
    mode: str = "r",
    format: str | None = None,  # noqa: A002
    *,
    backing: bool = True,
    force_share: bool = False,
    untrusted: bool = False,
    policy: OpenPolicy | None = None,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, str] | None = None,
    for_check: bool = False,
    metadata_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> BlockDevice:
    """Open an image.  ``mode`` is ``"r"`` or ``"r+"``; ``format`` None probes (raw last).

    ``backing=False`` opens without the backing chain (reads of unallocated ranges then
    return zeros); ``force_share`` skips QEMU's lock bytes (qemu-img ``-U``); ``untrusted``
    confines backing/data files to the image's directory.  ``options`` are image-opts
    (qcow2: ``encrypt.key-secret`` ...; raw: ``offset`` and ``size``, a window of the
    file, e.g. a disk inside an OVA or tar; qemu's cache and I/O options are taken and
    unused; an option neither implemented nor harmless is refused by name:
    :mod:`diskimg.image_options`).  ``for_check`` opens as ``qemu-img check`` does: a
    qcow2 snapshot table that cannot be read is left to :meth:`check` to report (and
    repair) instead of failing the open.  ``metadata_only`` opens as ``qemu-img info``
    does (qemu's ``BDRV_O_NO_IO``): the key secret an encrypted image's options name is
    neither looked up nor tried until data is read.

    ``path`` may also be a URL (``scheme://...``: :mod:`diskimg.hostio.urls` opens it,
    read-only; ``http://`` and ``https://`` through :func:`diskimg.hostio.http.open_http`,
    whose faults raise :class:`~diskimg.errors.RemoteError` naming the URL and the offset)
    or a binary file object with ``readinto`` and ``seek`` (``"r+"`` needs a writable
    one).  An image that is not a local file opens no local file unless ``policy`` allows
    it (:attr:`OpenPolicy.allow_local_backing`); its backing file is looked for in the
    same store; a vmdk over a file object must be a single file.  The image pickles as
    what opened it (path or URL, mode, format, options, policy -- never secrets); one over
    a file object does not.  An fsspec URL (``s3://``, ``gs://``, ``memory://`` ...; the
    ``diskimg[remote]`` extra) opens through :func:`diskimg.hostio.remote.open_fsspec`,
    with ``storage_options`` (the filesystem's: s3 ``endpoint_url``, ``key``, ``secret``,
    ``anon`` ...; fsspec's configuration and environment apply too); its backing files
    open with the same options.  ``storage_options`` are refused (UsageError) for anything
    but an fsspec URL.  They are part of what the image pickles as: a pickled image
    carries any credentials in them (give credentials through the environment or
    fsspec's configuration instead when the pickle must not hold them).
    """
    if mode not in ("r", "r+"):
        raise UsageError(f"mode must be 'r' or 'r+', not {mode!r}")
    if format is not None and format not in FORMATS and format != "file":
        raise UsageError(f"Unknown file format '{format}'")
    writable = mode == "r+"
    if options:
        from diskimg.image_options import force_share as share_option

        force_share = force_share or share_option(options)
    src: str | Host  # a str: a local file, by the name pathlib prints for it
    recipe: dict[str, object] | None = None  # what reopens it: None over an object/pipe
    if storage_options and not (isinstance(path, str) and _is_url(path)):
        raise UsageError("storage_options apply only to fsspec URLs (s3://, gs://, "
                         f"memory:// ...), not to {path!r}", field="storage_options")
    if isinstance(path, str | os.PathLike):
        shown = os.fspath(path)
        if isinstance(shown, bytes):
            shown = os.fsdecode(shown)
        if shown.startswith("nbd:"):  # qemu's legacy NBD names: the URL they mean
            from diskimg.hostio.urls import top_level_name

            shown = top_level_name(shown)
        src = path_name(shown)
        if _is_url(shown):
            from diskimg.hostio.urls import open_url

            src = open_url(shown, policy or OpenPolicy(untrusted=untrusted), writable,
                           storage_options)
        elif not writable and _is_pipe(shown):
            from diskimg.hostio.pipe import open_pipe

            src = open_pipe(shown, format, options or {})  # read once: cannot reopen
            format = "raw"  # open_pipe refuses any other
        pol = (policy or OpenPolicy(untrusted=untrusted)).for_top(
            src if isinstance(src, str) else src.path)
        if isinstance(src, str) or _is_url(shown):
            recipe = {"path": shown, "mode": mode, "format": format, "backing": backing,
                      "untrusted": untrusted, "force_share": force_share, "policy": pol,
                      "options": dict(options or {}), "for_check": for_check,
                      "metadata_only": metadata_only,
                      "storage_options": dict(storage_options or {})}
    else:
        src = _file_object_host(path, writable)
        shown = str(src.path)
        pol = (policy or OpenPolicy(untrusted=untrusted)).for_top(src.path)
    # a URL's host names it as the image is shown (an NBD URL as qemu spells it)
    label = src.name if not isinstance(src, str) and _is_url(shown) else shown
    dev = _open_one(src, label, writable, format, backing=backing,
                    force_share=force_share, policy=pol, secrets=dict(secrets or {}),
                    options=dict(options or {}), seen=set(), depth=0,
                    for_check=for_check, unlock=not metadata_only,
                    storage_options=storage_options)
    dev.reopen_with = None if recipe is None else (_reopen, recipe)
    return dev


def _is_url(name: str) -> bool:
    """:func:`diskimg.hostio.urls.is_url`, imported only for a name with ``://``."""
    if "://" not in name:
        return False
    from diskimg.hostio.urls import is_url

    return is_url(name)


def _is_pipe(name: str) -> bool:
    """:func:`diskimg.hostio.pipe.is_pipe`, imported only for a name that is not a
    regular file (one ``stat``)."""
    import stat

    try:
        if stat.S_ISREG(os.stat(name).st_mode):
            return False
    except OSError:
        return False
    from diskimg.hostio.pipe import is_pipe

    return is_pipe(name)


def _file_object_host(obj: BinaryFile, writable: bool) -> Host:
    """The host over a file object given to :func:`open` (``"r+"``: it must be writable)."""
    import io

    from diskimg.hostio.fileobj import FileObjectHost, label

    if writable and not (isinstance(obj, io.IOBase) and obj.writable()):
        raise UsageError(f"'{label(obj)}' is not writable: mode 'r+' needs a file object "
                         "whose writable() is True")
    return FileObjectHost(obj, writable=writable)


def _reopen(args: dict[str, object]) -> BlockDevice:
    """Unpickle an image: open it again as it was opened (see :func:`open`)."""
    dev: BlockDevice = open(**args)  # type: ignore[arg-type]
    return dev


def _open_one(src: str | Host, name: str, writable: bool, fmt: str | None, *, backing: bool,
              force_share: bool, policy: OpenPolicy, secrets: dict[str, bytes],
              options: dict[str, str], seen: set[Hashable], depth: int,
              for_check: bool = False, unlock: bool = True,
              storage_options: Mapping[str, Any] | None = None, top: str | None = None
              ) -> BlockDevice:
    """Open ``src`` (a local file's name, or a host) and, with ``backing``, its chain;
    ``name`` is what the image is shown by (as given: ``./x`` stays).  A URL image's
    backing files open with ``storage_options``, confined by ``policy`` relative to the
    chain's ``top`` (default: this image)."""
    path = src if isinstance(src, str) else src.path
    top = top if top is not None else str(path)
    if depth > policy.max_depth:
        if not isinstance(src, str):
            src.close()
        raise BackingChainError(f"Backing chain of '{path}' is deeper than "
                                f"{policy.max_depth} images")
    host = open_host_file(src, writable, lock_mode=not force_share) \
        if isinstance(src, str) else src
    try:
        if depth and host.is_device():
            # the policy refused it by name; this is the file actually opened (a name
            # swapped for a device in between is refused too)
            raise BackingChainError(f"Refusing to open backing file '{path}': not a regular "
                                    "file (a block device)")
        key = host.identity()
        if key in seen:
            raise BackingChainError(f"Backing chain loop: '{path}' appears twice in its own "
                                    "backing chain", path=str(path),
                                    operation="follow backing chain")
        seen.add(key)
        dev = _device_over(host, fmt, policy=policy, secrets=secrets, options=options,
                           for_check=for_check, unlock=unlock, backing=backing,
                           writable=writable)
    except BaseException:
        host.close()
        raise
    dev.filename = name  # as given (qemu prints ./x and sub/../x as they are written)
    try:
        if backing:
            bname, bfmt = dev.backing_file_name()
            if bname is not None:  # (the chain's helpers: imported only for one)
                from diskimg import backing_open as B

                local = host.local
                parent = naming_parent(host)
                bsrc = B.resolve(policy, bname, parent, local=local,
                                 url=not local and _is_url(parent), top=top,
                                 storage_options=storage_options)
                bpath = bsrc if isinstance(bsrc, str) else bsrc.path
                try:
                    bfmt, bopts = B.open_options(options, backing_format(bfmt, bpath), bpath)
                    dev.backing = _open_one(bsrc, B.display(name, bname), False,
                                            bfmt, backing=True,
                                            force_share=force_share, policy=policy,
                                            secrets=secrets, options=bopts,
                                            seen=seen, depth=depth + 1, unlock=unlock,
                                            storage_options=storage_options, top=top)
                except DiskImgError as e:
                    B.blame(e, bpath)
                    raise
                dev.backing.is_backing = True  # its finalizer leaves the warning to dev
                dev.backing_attached()
    except BaseException:
        dev.close()
        raise
    return dev


def _device_over(host: Host, fmt: str | None, *, policy: OpenPolicy,
                 secrets: dict[str, bytes], options: dict[str, str],
                 for_check: bool = False, unlock: bool = True, backing: bool = True,
                 writable: bool = False) -> BlockDevice:
    """The image of format ``fmt`` (None: probe) over ``host``; the caller closes
    ``host`` if this raises."""
    probed = fmt is None
    if fmt is None:
        fmt = probe(host)
    else:
        check_format(host, fmt)
    dev: BlockDevice
    if options:
        from diskimg.image_options import check

        check(fmt, options, backing=backing, writable=writable)
    if fmt in ("raw", "file"):
        from diskimg.raw import RawImage

        dev = RawImage(host, probed=probed, options=options, driver=fmt)
    elif fmt == "qcow2":
        from diskimg.qcow2.image import Qcow2Image

        dev = Qcow2Image(host, secrets=secrets, options=options, policy=policy,
                         for_check=for_check, unlock=unlock)
    elif fmt == "luks":
        from diskimg.luks import LuksImage

        dev = LuksImage(host, secrets=secrets, options=options, unlock=unlock)
    elif fmt == "vmdk":
        from diskimg.vmdk import open_vmdk

        dev = open_vmdk(host, policy=policy)
    else:  # a backing format name diskimg does not implement
        raise UsageError(f"Unknown driver '{fmt}'", field="backing format")
    return dev


def backing_options(options: Mapping[str, str]) -> dict[str, str]:
    """The image options of the backing file: qemu's ``backing.`` prefix removed
    (``backing.encrypt.key-secret=s`` unlocks an encrypted backing file), without
    ``driver`` (its format) and ``file.*`` (its file)."""
    from diskimg.image_options import backing_options as split

    return {k: v for k, v in split(options)[1].items() if not k.startswith("file.")}


#: qemu's device protocol drivers, which a backing format may name: they take only a
#: device, and a backing file that is a device is refused (policy.py)
_DEVICE_DRIVERS = ("host_device", "host_cdrom")
#: the names ``create -F`` and ``rebase -F`` accept, as qemu-img 7.2 does (``file``, the
#: file protocol: the file's bytes, a raw image that info names ``file``)
BACKING_FORMATS = (*FORMATS, "file", *_DEVICE_DRIVERS)


def backing_format(bfmt: str | None, name: PathLike) -> str | None:
    """The format to open a backing file with, from the backing format its image names
    (or ``create -F`` / ``rebase -F`` give), refused in qemu's words for a device
    driver."""
    if bfmt in _DEVICE_DRIVERS:  # policy.resolve has refused a device before this
        raise UsageError(f"'{bfmt}' driver requires '{name}' to be either a character or "
                         "block device", field="backing format")
    return bfmt


def create(
    path: PathLike,
    format: str,  # noqa: A002
    size: int | None,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    options: Mapping[str, Any] | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> None:
    """Create an image at ``path`` (overwriting it) like ``qemu-img create``.

    ``size`` in bytes may be None when a backing file gives it.  ``options`` take qemu-img's
    ``-o`` names (``cluster_size``, ``compat``, ``preallocation``, ``lazy_refcounts``,
    ``refcount_bits``, ``extended_l2`` ...) as strings or Python values.
    """
    nbd = False
    if isinstance(path, str) and path.startswith("nbd:"):
        from diskimg.hostio.urls import top_level_name

        path = top_level_name(path)  # qemu's legacy NBD names: the URL they mean
    if isinstance(path, str) and "://" in path:
        from diskimg.nbd.url import is_nbd_url

        nbd = is_nbd_url(path)
        if nbd and format != "raw":  # not a local name either: refused before anything
            raise UnsupportedFeatureError(
                f"Cannot create a {format} image on the NBD export '{path}': only raw "
                "(its bytes as they are)", path=path, field="protocol")
    if not nbd:  # a name the host cannot take: refused before anything (path_name)
        path_name(path)
    if size is not None:  # before anything touches the file: a refusal creates nothing
        from diskimg.params import check_int

        size = check_int("size", size, minimum=None)
    opts = dict(options or {})
    if format not in FORMATS:
        raise UsageError(f"Unknown file format '{format}'")
    if format in ("raw", "luks") and backing_file:
        raise UsageError(f"Backing file not supported for file format '{format}'")
    if backing_file is not None and backing_fmt is None and not unsafe:
        raise UsageError("Backing file specified without backing format")
    if backing_file is not None:
        from pathlib import Path  # (not for an image without one: start-up, issue 20)
    if size is None:
        if backing_file is None:
            raise UsageError("Image creation needs a size parameter")
        bpath = OpenPolicy().resolve(backing_file, Path(os.path.abspath(path)))
        with open(bpath, "r", backing_format(backing_fmt, bpath), force_share=True) as b:
            size = b.size
    elif backing_file is not None and not unsafe:
        bpath = OpenPolicy().resolve(backing_file, Path(os.path.abspath(path)))
        with open(bpath, "r", backing_format(backing_fmt, bpath), force_share=True):
            pass
    if size < 0:
        raise UsageError("Image size must be less than 8 EiB!")
    from diskimg.image_create import make_image  # (not loaded by a command that opens)

    make_image(path, format, size, backing_file, backing_fmt, opts, secrets, nbd=nbd)
