"""Backing chains: ``commit`` (write a top layer's data into a base) and ``rebase``
(change the backing file, copying what differs unless unsafe).  Invariant: a refused
commit or rebase changes no byte of any layer."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskimg import api
from diskimg.device import BlockDevice
from diskimg.errors import DiskImgError, ImageLockedError, UnsupportedFeatureError, UsageError

if TYPE_CHECKING:  # imported where used: info/check/map never start threads
    pass

from diskimg.ops import CHUNK, SECTOR, ProgressFn
from diskimg.params import renamed
from diskimg.slotted import FrozenRecord, set_fields

if TYPE_CHECKING:
    from diskimg.hostio.host import Host


class _Layer(FrozenRecord):
    __slots__ = ("path", "format", "backing_name")
    path: str
    format: str
    backing_name: str | None  # as written in this image's header

    def __init__(self, path: str, format: str, backing_name: str | None) -> None:
        set_fields(self, path, format, backing_name)


def _chain_layers(path: str | os.PathLike[str], fmt: str | None,
                  kw: Mapping[str, Any]) -> list[_Layer]:
    """Path, format and backing-file name of every image in ``path``'s chain, top first."""
    with api.open(path, "r", fmt, force_share=True, **kw) as dev:  # kw: secrets, options
        out = []
        for d in dev.chain():
            out.append(_Layer(d.filename, d.format, d.backing_file_name()[0]))
        return out


def find_backing_image(layers: Sequence[_Layer], name: str) -> int | None:
    """Index in ``layers`` of the image ``name`` designates, as qemu's
    ``bdrv_find_backing_image``: ``name`` is taken relative to each image's directory and
    compared (canonical paths) with that image's backing file."""
    for k in range(len(layers) - 1):
        parent = layers[k]
        cand = name if os.path.isabs(name) else os.path.join(
            os.path.dirname(parent.path), name)
        try:
            if os.path.realpath(cand, strict=True) == os.path.realpath(
                    layers[k + 1].path, strict=True):
                return k + 1
        except OSError:
            continue
    return None


def _progress_steps(progress: ProgressFn | None, total: int) -> Callable[[int], None]:
    def step(done: int) -> None:
        if progress is not None:
            progress(done * 100.0 / total if total else 100.0)
    return step


def commit(
    path: str | os.PathLike[str],
    base: str | None = None,
    drop: bool = False,
    progress: ProgressFn | None = None,
    *,
    format: str | None = None,  # noqa: A002 - the one keyword for an image's format
    fmt: str | None = None,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, str] | None = None,
    rate_limit: int | None = None,
) -> None:
    """``qemu-img commit``: write the data of ``path`` (and of every image between it and
    ``base``) into ``base`` (default: its backing file), then empty ``path`` unless ``drop``.

    As in qemu-img, giving ``base`` implies ``drop`` (intermediate images are never
    emptied), the base grows to the top's size if it is smaller, and no header changes:
    the top keeps naming its backing file.  Zero ranges are written as zeros (unmapped
    where the base allows).  ``options`` are the top's image options; each layer below
    gets them with one more ``backing.`` prefix removed (``encrypt.key-secret`` for an
    encrypted top, ``backing.encrypt.key-secret`` for an encrypted base), so encrypted
    layers are read and written with their own keys.  ``format`` is ``path``'s format
    (None probes; ``fmt`` is its deprecated name).  ``rate_limit`` (``-r``): at most that
    many bytes per second are committed (0 or None: no limit)."""
    fmt = renamed("format", format, "fmt", fmt)
    from diskimg.api import backing_options
    from diskimg.hostio import open_host_file
    from diskimg.qcow2.amend import make_empty, read_header

    kw: dict[str, Any] = {"untrusted": untrusted, "secrets": dict(secrets or {}),
                          "options": dict(options or {})}
    path = os.fspath(path)
    if base is not None:
        drop = True
    top_lock = open_host_file(path, not drop)  # qemu's lock on the top for the job
    data_host: Host | None = None
    try:
        layers = _chain_layers(path, fmt, kw)
        if len(layers) < 2:
            raise UsageError("Image does not have a backing file")
        if base is None:
            base_idx = 1
        else:
            found = find_backing_image(layers, base)
            if found is None:
                raise UsageError(f"Did not find '{base}' in the backing chain of '{path}'")
            base_idx = found
        if not drop and layers[0].format == "qcow2":
            # the top's external data file: its clusters are deallocated when the top is
            # emptied, as qemu's commit does; locked now, before the base changes
            data_host = _open_data_file(top_lock, path, options, untrusted)
        b = layers[base_idx]
        base_opts = dict(options or {})
        for _ in range(base_idx):
            base_opts = backing_options(base_opts)
        with api.open(b.path, "r+", b.format, **{**kw, "options": base_opts}) as base_dev, \
                api.open(path, "r", fmt, force_share=True, **kw) as top:
            _commit_copy(top, base_dev, base_idx, progress, rate_limit)
            base_dev.flush()
        if not drop and layers[0].format == "qcow2":
            h = read_header(top_lock)
            make_empty(top_lock, h, data_host)
    finally:
        if data_host is not None:
            data_host.close()
        top_lock.close()


def _open_data_file(top: Host, path: str, options: Mapping[str, str] | None,
                    untrusted: bool) -> Host | None:
    """The external data file of the qcow2 image ``top`` (at ``path``), opened writable
    and locked, or None when it has none."""
    from diskimg.hostio import open_host_file
    from diskimg.policy import OpenPolicy
    from diskimg.qcow2.amend import read_header
    from diskimg.qcow2.layout import QCOW2_INCOMPAT_DATA_FILE

    h = read_header(top)
    if not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
        return None
    name = (options or {}).get("data-file") or h.data_file
    if not name:
        return None
    pol = OpenPolicy(untrusted=untrusted).for_top(Path(path))
    return open_host_file(pol.resolve(name, Path(path), "data file"), True)


def _commit_copy(top: BlockDevice, base: BlockDevice, base_idx: int,
                 progress: ProgressFn | None, rate_limit: int | None = None) -> None:
    from diskimg.ops.copy_options import RateLimit

    limit = RateLimit(rate_limit) if rate_limit else None
    size = top.size
    if base.size < size:
        fn = base.resize
        fn(size)
    chain = top.chain()
    step = _progress_steps(progress, size)
    step(0)
    buf = bytearray(CHUNK)
    pos = 0
    while pos < size:
        st, depth = top.block_status(pos, min(CHUNK, size - pos))
        n = st.length
        if st.allocated:
            copy = depth < base_idx
            zero = st.zero or not st.data
        else:
            # past the end of a shorter image above the base: zeros decided there
            nxt = depth + 1
            copy = (nxt < base_idx and nxt < len(chain) and pos >= chain[nxt].size)
            zero = True
        if copy:
            if limit is not None:
                limit(n)  # qemu's commit job counts every range it commits
            if zero:
                base.write_zeroes(pos, n, may_unmap=True)
                base.flush()  # free unmapped clusters now, so they are reused in order
            else:
                mv = memoryview(buf)[:n]
                top.readinto(pos, mv)
                base.write(pos, mv)
        pos += n
        step(pos)


# --- rebase -------------------------------------------------------------------------


def rebase(
    path: str | os.PathLike[str],
    backing: str | None,
    backing_fmt: str | None = None,
    *,
    unsafe: bool = False,
    format: str | None = None,  # noqa: A002 - the one keyword for an image's format
    fmt: str | None = None,
    progress: ProgressFn | None = None,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    force_share: bool = False,
    options: Mapping[str, str] | None = None,
) -> None:
    """``qemu-img rebase``: make ``path`` use ``backing`` (``None`` or ``""``: no backing
    file) without changing what the guest sees.

    Safe mode reads the old and new backing chains and copies into ``path`` every range
    where they differ and ``path`` does not decide the contents itself; ``unsafe`` only
    rewrites the backing file name and format in the header.  ``backing`` is stored as
    given and resolved, like qemu, relative to ``path``'s directory.  ``options`` are
    ``path``'s image options (``encrypt.key-secret``; ``backing.encrypt.key-secret`` for
    an encrypted old backing file).  As in qemu-img the new backing file is opened with
    no options, so it cannot be encrypted in safe mode.  ``format`` is ``path``'s format
    (None probes; ``fmt`` is its deprecated name).  ``rate_limit`` (``-r``): at most that
    many bytes per second are committed (0 or None: no limit)."""
    fmt = renamed("format", format, "fmt", fmt)
    from diskimg.errors import MissingSecretError
    from diskimg.policy import OpenPolicy
    from diskimg.qcow2.amend import read_header, set_backing
    from diskimg.qcow2.image import Qcow2Image

    kw: dict[str, Any] = {"untrusted": untrusted, "secrets": dict(secrets or {})}
    path = os.fspath(path)
    new_name = backing or None
    with api.open(path, "r+", fmt, backing=not unsafe, force_share=force_share,
                  options=dict(options or {}), **kw) as dev:
        if not isinstance(dev, Qcow2Image):  # the one format that stores a backing name
            raise UnsupportedFeatureError(
                f"Could not change the backing file to '{backing or ''}': Operation not "
                "supported")
        if not unsafe:
            new_dev: BlockDevice | None = None
            in_chain: BlockDevice | None = None
            try:
                if new_name is not None:
                    pol = OpenPolicy(untrusted=untrusted).for_top(Path(path))
                    bpath = pol.resolve(new_name, Path(path))
                    # a file of the current chain is read as the chain has it open, whatever
                    # -F says (qemu: bdrv_find_backing_image)
                    in_chain = _chain_member(dev, bpath)
                    try:
                        if in_chain is None:
                            new_dev = api.open(bpath, "r",
                                               api.backing_format(backing_fmt, bpath),
                                               force_share=force_share, **kw)
                        if new_dev is not None and new_dev.encrypted:
                            raise MissingSecretError(
                                "Parameter 'encrypt.key-secret' is required for cipher")
                    except DiskImgError as e:
                        cls = ImageLockedError if isinstance(e, ImageLockedError) \
                            else DiskImgError  # a held file stays an ImageLockedError
                        raise cls(f"Could not open new backing file '{bpath}': {e}") from e
                _rebase_copy(dev, new_dev or in_chain, progress)
            finally:
                if new_dev is not None:
                    new_dev.close()
        dev.flush()
        host = dev.host
        set_backing(host, new_name, backing_fmt if new_name else None)
        # keep the open device's idea of the header in step, so closing it is harmless
        new_h = read_header(host)
        dev.header.backing_file = new_h.backing_file
        dev.header.extensions = new_h.extensions


def _chain_member(dev: BlockDevice, path: Path) -> BlockDevice | None:
    """The image of ``dev``'s backing chain that is the file ``path``, if any."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    for d in dev.chain()[1:]:
        if d.host_files()[0].identity() == (st.st_dev, st.st_ino):
            return d
    return None


def _rebase_copy(dev: BlockDevice, new: BlockDevice | None,
                 progress: ProgressFn | None) -> None:
    """Copy into ``dev`` every range it does not allocate where its current backing
    chain and ``new`` read differently (qemu's safe rebase)."""
    old = dev.backing
    size = dev.size
    old_size = old.size if old is not None else 0
    new_size = new.size if new is not None else 0
    step = _progress_steps(progress, size)
    step(0)
    pos = 0
    while pos < size:
        run = dev.plan(pos, min(CHUNK, size - pos))  # this layer only
        n = run.length
        if not run.allocated:
            if pos < old_size < pos + n:
                n = old_size - pos  # (qemu's: the old backing file's end ends a chunk)
            a = _read_or_zeros(old, old_size, pos, n)
            b = _read_or_zeros(new, new_size, pos, n)
            if a != b:
                # copy the old contents of the differing sectors into the overlay;
                # past the old backing file's end they are zeros: written as such
                # (zero clusters where the format has them), as qemu-img does
                for s, e in _differing_sectors(a, b):
                    if pos >= old_size:
                        dev.write_zeroes(pos + s, e - s, may_unmap=False)
                    else:
                        dev.write(pos + s, a[s:e])
        pos += n
        step(pos)


def _differing_sectors(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Runs [start, end) of 512-byte sectors where ``a`` and ``b`` differ."""
    runs: list[tuple[int, int]] = []
    n = len(a)
    blk = 65536
    for base in range(0, n, blk):
        top = min(n, base + blk)
        if a[base:top] == b[base:top]:
            continue
        for s in range(base, top, SECTOR):
            e = min(top, s + SECTOR)
            if a[s:e] != b[s:e]:
                if runs and runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], e)
                else:
                    runs.append((s, e))
    return runs


def _read_or_zeros(d: BlockDevice | None, dsize: int, pos: int, n: int) -> bytes:
    if d is None or pos >= dsize:
        return bytes(n)
    k = min(n, dsize - pos)
    data = d.read(pos, k)
    return data if k == n else data + bytes(n - k)
