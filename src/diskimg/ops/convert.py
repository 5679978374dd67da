"""``convert``: copy the guest bytes of one or more sources (concatenated) into a new or
existing target (qemu-img convert).  A refused convert leaves an existing target as it
was."""

from __future__ import annotations

import os
import stat

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, UsageError
from diskimg.hostio import path_name

from diskimg.ops import SECTOR, ProgressFn, Source, _open, is_stream_path
from diskimg.ops.copier import _Copier
from diskimg.params import renamed
from diskimg.units import SIZE_HELP

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

    from diskimg.hostio.host import Host
    from diskimg.ops.copy_options import RateLimit, Salvage
    from diskimg.ops.stream_convert import StreamTarget


def _snapshot_view(dev: BlockDevice, snapshot: tuple[str | None, str | None]) -> BlockDevice:
    sid, name = snapshot
    # a format without internal snapshots refuses in qemu-img's words (the declared
    # BlockDevice.snapshot_view); a bare ``-l X`` (sid == name) is an id or a name: qemu
    # tries the id first
    tries = [(sid, None), (None, name)] if sid is not None and sid == name else [(sid, name)]
    for s, n in tries:
        try:
            view = dev.snapshot_view(snapshot_id=s, name=n)
            return view
        except DiskImgError as e:
            if "find snapshot" not in str(e):
                raise
    raise DiskImgError("Failed to load snapshot: Can't find snapshot", operation="load snapshot")


def convert(
    sources: Source | Sequence[Source],
    dst: str | os.PathLike[str] | BlockDevice | StreamTarget,
    out_format: str = "raw",
    *,
    format: str | None = None,  # noqa: A002 - the one keyword for an image's format
    src_format: str | None = None,
    options: Mapping[str, Any] | None = None,
    sparse_size: int = 4096,
    target_exists: bool = False,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    progress: ProgressFn | None = None,
    snapshot: tuple[str | None, str | None] | None = None,
    compress: bool = False,
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    target_options: Mapping[str, str] | None = None,
    workers: int | None = None,
    sync: bool = False,
    bitmaps: bool = False,
    skip_broken_bitmaps: bool = False,
    warn: Callable[[str], None] | None = None,
    rate_limit: int | None = None,
    target_is_zero: bool = False,
    salvage: bool | Callable[[str], None] = False,
    on_created: Callable[[], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Copy the guest contents of ``sources`` (concatenated) into image ``dst``.

    ``format`` is the sources' format (None probes; ``src_format`` is its deprecated
    name), ``out_format`` the target's.
    Holes and zero runs are never read (block status) and never written to a fresh target;
    ``sparse_size`` (``-S``, 0 = fully allocate) turns zero runs in data into holes;
    ``backing_file`` gives the target a backing file and copies only the sources' top layer
    (qemu-img ``-B``); ``target_exists`` writes into an existing image (``-n``; ``dst`` may
    then be an open writable device).  ``progress`` receives percentages.  Sources may be
    paths or open devices.  ``compress`` (``-c``) compresses every cluster in ``workers``
    threads (``-m``; default: the number of CPUs, at most 8).  Like qemu-img convert (whose
    target cache mode defaults to ``unsafe``) the target is not synced to stable storage
    unless ``sync`` is true; everything is written before this returns.
    ``bitmaps`` (``--bitmaps``) copies the persistent bitmaps of a single qcow2 source
    into the qcow2 v3 target after the data; ``skip_broken_bitmaps`` skips inconsistent
    ones (each named to ``warn``) instead of refusing.

    ``rate_limit`` (``-r``): copy data at that many bytes per second at most (0 or None:
    no limit).  ``target_is_zero`` (``--target-is-zero``, needs ``target_exists``): the
    existing target already reads as zeros, so zero runs are not written.  ``salvage``
    (``--salvage``): a source range that cannot be read becomes zeros instead of ending the
    copy; a callable receives qemu-img's warning line for each unreadable sector.
    ``on_created`` is called once a new target has been created (before it is opened).

    ``dst`` may be a stream (see :mod:`diskimg.ops.stream_convert`): a file descriptor,
    a writable binary file object, a :class:`~diskimg.hostio.sink.Sink`, or the path of a
    FIFO or socket; raw, streamOptimized vmdk and qcow2 are then written front to back,
    and what cannot be streamed is refused before anything is written.  An fsspec URL
    (``s3://bucket/key``, ``gs://...``, ``memory://...``; the ``diskimg[remote]`` extra)
    is such a target: a new object uploaded in parts (:func:`~diskimg.hostio.remote.
    open_fsspec_sink`), visible only once complete: a failed convert leaves no object,
    and an existing object is replaced only when the new one is complete.
    ``storage_options`` (the filesystem's: endpoint, credentials ...) open a URL target
    and the fsspec URL sources.

    A failed convert removes the target file it created (a path that did not exist
    before); an existing target (``target_exists``, or a file that was overwritten) keeps
    what was written, as in qemu-img.
    """
    src_format = renamed("format", format, "src_format", src_format)
    if isinstance(dst, str) and dst.startswith("nbd:"):
        from diskimg.hostio.urls import top_level_name

        dst = top_level_name(dst)  # qemu's legacy NBD names: the URL they mean
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    srcs = [sources] if isinstance(sources, str | os.PathLike | BlockDevice) else list(sources)
    if not srcs:
        raise UsageError("Must specify image file name")
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size > 16 << 20:
        raise UsageError("Invalid buffer size for sparse output specified. Valid sizes are "
                         "multiples of 512 up to 16777216. Select 0 to disable sparse "
                         "detection (fully allocates output).")
    if backing_file is not None and out_format == "raw":
        raise UsageError("Backing file not supported for file format 'raw'")
    if backing_file is not None and backing_fmt is None and not target_exists:
        raise UsageError("Use of backing file requires explicit backing format")
    if compress and out_format == "raw":
        raise UsageError("Compression not supported for this file format")
    if compress and str((options or {}).get("preallocation", "off")) != "off":
        raise UsageError("Compression and preallocation not supported at the same time")
    if target_is_zero and not target_exists:
        raise UsageError("--target-is-zero requires use of -n flag")
    if target_is_zero and backing_file is not None:
        raise UsageError("Cannot use --target-is-zero when the destination image has a "
                         "backing file")
    if rate_limit is not None and rate_limit < 0:
        raise UsageError(SIZE_HELP.replace("image size", "rate limit"), field="size")
    if storage_options and not (isinstance(dst, str) and _is_fsspec(dst)) and \
            not any(_is_fsspec(s) for s in srcs):
        raise UsageError("storage_options apply only to fsspec URLs (s3://, gs://, "
                         "memory:// ...): neither the target nor a source is one",
                         field="storage_options")
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    if isinstance(dst, str | os.PathLike) and isinstance(os.fspath(dst), str):
        path_name(dst)  # a name the host cannot take: refused before anything
    # the streaming code (and --bitmaps') is imported only when used (start-up, issue 20)
    streamed = (is_stream_path(dst) if isinstance(dst, str | os.PathLike)
                else not isinstance(dst, BlockDevice) and _is_stream(dst))
    if streamed:
        from diskimg.ops.stream_convert import refusal

        why = refusal(out_format, len(srcs), options or {}, compress=compress, dst=dst,
                      backing_file=backing_file, target_exists=target_exists,
                      bitmaps=bitmaps, salvage=salvage is not False,
                      rate_limit=rate_limit)
        if why is not None:
            raise UsageError(why)
    opened: list[tuple[BlockDevice, bool]] = []
    created: str | os.PathLike[str] | None = None  # the target path this call creates
    made: os.stat_result | None = None
    #: the other files a new target consists of (vmdk extents, a qcow2 data file) that
    #: did not exist before: removed with it when the convert fails
    made_too: list[tuple[str, os.stat_result]] = []
    listed: dict[str, set[str]] = {}
    try:
        for s in srcs:
            dev, owned = _open(s, src_format, {**kw, "storage_options": storage_options}
                               if storage_options and _is_fsspec(s) else kw)
            opened.append((dev, owned))
        devs = [d for d, _ in opened]
        if snapshot is not None:
            if len(devs) != 1:
                raise UsageError("No support for concatenating multiple snapshot")
            devs = [_snapshot_view(devs[0], snapshot)]
        total = sum(d.size for d in devs)
        if streamed:
            from diskimg.ops.stream_convert import convert_to_stream

            convert_to_stream(devs, dst, out_format, options or {}, progress=progress,
                              on_created=on_created, workers=workers,
                              storage_options=storage_options)
            return
        assert isinstance(dst, str | os.PathLike | BlockDevice)
        if skip_broken_bitmaps and not bitmaps:
            raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
        skip: list[str] = []
        if bitmaps and (not target_exists or isinstance(dst, BlockDevice)):
            from diskimg.ops.bitmap_copy import check_copy

            skip = check_copy(devs, out_format, options,
                              dst if isinstance(dst, BlockDevice) else None,
                              skip_broken_bitmaps)
        if isinstance(dst, BlockDevice):
            if not target_exists:
                raise UsageError("an open target device needs target_exists=True")
            tgt = dst
        else:
            if not target_exists:
                if not os.path.lexists(dst) and not _is_nbd(dst):
                    created = dst
                    listed = _listings(dst, (options or {}).get("data_file"))
                api.create(dst, out_format, total, backing_file=backing_file,
                           backing_fmt=backing_fmt, options=options, secrets=secrets)
                if created is not None:
                    made = os.stat(created)  # the file removed on failure is this one
                if on_created is not None:
                    on_created()
            topts = dict(target_options or {})
            key_option = "key-secret" if out_format == "luks" else "encrypt.key-secret"
            key = (options or {}).get(key_option)
            if key is not None and not target_exists:
                topts.setdefault(key_option, str(key))  # the new image's key
            tgt = api.open(dst, "r+", out_format, secrets=dict(secrets or {}),
                           options=topts)
        try:
            if created is not None:
                made_too = _new_files(tgt, created, listed)
            if not sync and not isinstance(dst, BlockDevice):
                for hf in _host_files(tgt):
                    hf.sync = False
            if tgt.size < total:
                raise UsageError("output file is smaller than input file")
            if bitmaps and target_exists and not isinstance(dst, BlockDevice):
                from diskimg.ops.bitmap_copy import check_copy

                skip = check_copy(devs, out_format, options, tgt, skip_broken_bitmaps)
            cluster = tgt.cluster_size or 0
            align = max(_pow2floor(max(sparse_size, SECTOR) // SECTOR), cluster // SECTOR
                        if compress else 1)
            target_backing = backing_file is not None
            # qemu-img's rule: only a new target without backing file may leave zero runs
            # unwritten, and only if its format says it reads as zeros (not, e.g., an
            # encrypted qcow2 with preallocated clusters)
            zero_init = target_is_zero or (not target_exists and not target_backing
                                           and sparse_size > 0 and tgt.has_zero_init())
            backing_end = tgt.backing.size if (target_backing and not target_exists
                                               and tgt.backing is not None) else None
            limit: RateLimit | None = None
            salvaged: Salvage | None = None
            if rate_limit or salvage is not False:  # (-r, --salvage: their module then)
                from diskimg.ops.copy_options import RateLimit, Salvage

                limit = RateLimit(rate_limit) if rate_limit else None
                salvaged = None if salvage is False else \
                    Salvage(salvage if callable(salvage) else None)
            cp = _Copier(tgt, zero_init=zero_init, target_backing=target_backing,
                         backing_end=backing_end, min_sparse=sparse_size, alignment=align,
                         compress=compress, total=total, progress=progress,
                         limit=limit, salvage=salvaged)
            if progress is not None:
                progress(0.0)
            if cp.salvage is not None:
                cp.survey(devs)
            if compress:
                cp.copy_compressed(devs, workers)
            else:
                # the reader thread must not share a device with the writer
                pipelined = not any(d is tgt for d in devs)
                base = 0
                for d in devs:
                    cp.copy(d, base, pipelined)
                    base += d.size
            tgt.flush()
            if bitmaps:
                from diskimg.ops.bitmap_copy import copy_bitmaps

                copy_bitmaps(devs[0], tgt, skip, warn)
                tgt.flush()
        finally:
            if tgt is not dst:  # (a borrowed device stays open)
                tgt.close()
    except BaseException:
        if created is not None:
            _remove_created(created, made)
            for path, st in made_too:
                _remove_created(path, st)
        raise
    finally:
        for dev, owned in opened:
            if owned:
                dev.close()


def _is_stream(dst: object) -> bool:
    from diskimg.ops.stream_convert import is_stream

    return is_stream(dst)


def _is_nbd(dst: str | os.PathLike[str]) -> bool:
    """An NBD URL: the export exists already (api.create writes onto it; never removed)."""
    if not isinstance(dst, str) or "://" not in dst:
        return False  # not a URL: decided without importing the URL parser (start-up)
    from diskimg.nbd.url import is_nbd_url

    return is_nbd_url(dst)


def _is_fsspec(src: Source) -> bool:
    """Whether source ``src`` is an fsspec URL (``storage_options`` open it)."""
    from diskimg.hostio.remote import is_fsspec_url

    return is_fsspec_url(src)


def _listings(dst: str | os.PathLike[str], data_file: object) -> dict[str, set[str]]:
    """The names in the directories a new target's files go to (the target's own, and a
    qcow2 ``data_file``'s, relative to it), taken before the target is created."""
    base = os.path.dirname(os.path.abspath(dst))
    dirs = {base}
    if isinstance(data_file, str) and data_file:
        dirs.add(os.path.dirname(os.path.join(base, data_file)))
    out: dict[str, set[str]] = {}
    for d in dirs:
        try:
            out[d] = set(os.listdir(d))
        except OSError:
            pass
    return out


def _new_files(tgt: BlockDevice, dst: str | os.PathLike[str],
               listed: dict[str, set[str]]) -> list[tuple[str, os.stat_result]]:
    """The target's other host files (extents, data file) that were not in ``listed``
    before it was created, with their identity for :func:`_remove_created`."""
    out = []
    top = os.path.abspath(dst)
    for h in tgt.host_files():
        p = os.path.abspath(h.name)  # (h.path would import pathlib: start-up)
        d, name = os.path.split(p)
        if p != top and d in listed and name not in listed[d]:
            try:
                out.append((p, os.stat(p)))
            except OSError:
                pass
    return out


def _remove_created(path: str | os.PathLike[str], made: os.stat_result | None) -> None:
    """Remove the target file a failed convert created: only a regular file that is still
    the one created (same device and inode), never anything else at that path."""
    if made is None:
        # creation itself failed part-way: whatever is there now was made by it
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
    else:
        try:
            st = os.lstat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
            return
    try:
        os.unlink(path)
    except OSError:
        pass


def _host_files(dev: BlockDevice) -> list[Host]:
    """The writable host files behind ``dev`` (its declared :meth:`~BlockDevice.host_files`:
    qcow2 image and data file, raw file, vmdk descriptor and extents)."""
    return [h for h in dev.host_files() if h.writable]


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 1
