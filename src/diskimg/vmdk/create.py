"""Creating vmdk images: the five subformats qemu-img creates (byte-identical to qemu-img
7.2 except the random CID) and :func:`write_stream_optimized`, a streamOptimized copy of
any device written front to back.

Invariant: a refused create changes no file (every option is checked and every existing
extent file locked before anything is emptied).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from diskimg.device import BlockDevice
from diskimg.errors import UsageError
from diskimg.hostio import open_host_file
from diskimg.hostio.sink import Sink
from diskimg.options import check_preallocation
from diskimg.options import parse_bool as _bool
from diskimg.policy import OpenPolicy
from diskimg.raw import create_raw
from diskimg.vmdk import sparse as S
from diskimg.vmdk.descriptor import NO_PARENT, new_cid, stored_text
from diskimg.vmdk.extent_line import ExtentLine
from diskimg.vmdk.image import VmdkImage
from diskimg.vmdk.stream import StreamWriter

if TYPE_CHECKING:
    from diskimg.hostio.host import Host

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
SPLIT_SIZE = 2 * 1024 * 1024 * 1024
GRAIN_SECTORS = 128
GTES = 512


def build(*, cid: int, parent_cid: int, create_type: str, parent_hint: str | None,
          extents: list[ExtentLine], hw_version: str, cylinders: int, heads: int,
          adapter_type: str, tools_version: str) -> str:
    """The descriptor text ``qemu-img create`` writes (qemu 7.2's template)."""
    # qemu's template: the parent line takes the place of the blank line after createType
    parent = f'parentFileNameHint="{parent_hint}"' if parent_hint else ""
    ext = "".join(e.pack() + "\n" for e in extents)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:x}\n"
        f"parentCID={parent_cid:x}\n"
        f'createType="{create_type}"\n'
        f"{parent}"
        "\n"
        "# Extent description\n"
        f"{ext}"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hw_version}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{tools_version}"\n'
    )


def sparse_layout(capacity: int, *, zeroed_grain: bool = False,
                  compress: bool = False) -> tuple[S.SparseHeader, int, int, int]:
    """qemu 7.2's new sparse extent: (header, gt_count, gt_sectors, gd_sectors).

    Layout in sectors: header 0, descriptor 1..20, redundant GD at 21 followed by its grain
    tables, then the GD and its grain tables; the first grain at ``overhead`` (grain
    aligned).
    """
    grains = -(-capacity // GRAIN_SECTORS)
    gt_size = -(-GTES * 4 // S.SECTOR)
    gt_count = -(-grains // GTES)
    gd_sectors = -(-gt_count * 4 // S.SECTOR)
    rgd = 1 + 20
    gd = rgd + gd_sectors + gt_size * gt_count
    overhead = -(-(gd + gd_sectors + gt_size * gt_count) // GRAIN_SECTORS) * GRAIN_SECTORS
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = S.FLAG_RGD | S.FLAG_NL_DETECT
    if compress:
        flags |= S.FLAG_COMPRESS | S.FLAG_MARKER
    if zeroed_grain:
        flags |= S.FLAG_ZERO_GRAIN
    h = S.SparseHeader(version, flags, capacity, GRAIN_SECTORS, 1, 20, GTES, rgd, gd,
                       overhead, 0, S.EOL_CHARS,
                       S.COMPRESSION_DEFLATE if compress else S.COMPRESSION_NONE)
    return h, gt_count, gt_size, gd_sectors


def _init_sparse(host: Host, capacity: int, zeroed_grain: bool) -> S.SparseHeader:
    h, gt_count, gt_size, gd_sectors = sparse_layout(capacity, zeroed_grain=zeroed_grain)
    host.pwrite(0, h.pack())
    host.truncate(h.overhead * S.SECTOR)
    for base in (h.rgd_offset, h.gd_offset):
        first = base + gd_sectors
        gd = b"".join((first + gt_size * i).to_bytes(4, "little") for i in range(gt_count))
        if gd:
            host.pwrite(base * S.SECTOR, gd)
    return h


def stream_header(capacity: int) -> S.SparseHeader:
    """VMware's streamOptimized header: version 3, markers, GD at the end (footer)."""
    return S.SparseHeader(3, S.FLAG_NL_DETECT | S.FLAG_COMPRESS | S.FLAG_MARKER, capacity,
                          GRAIN_SECTORS, 1, 20, GTES, 0, S.GD_AT_END, GRAIN_SECTORS, 0,
                          S.EOL_CHARS, S.COMPRESSION_DEFLATE)


class _Options(NamedTuple):
    """A new vmdk's ``-o`` options, checked."""

    sub: str
    adapter: str
    hw_version: str
    tools: str
    zeroed: bool
    size: int               # rounded up to a sector
    heads: int


def _parse_options(size: int, opts: dict[str, Any]) -> _Options:
    """Check and take qemu's vmdk ``-o`` options out of ``opts`` (``backing_file`` is
    the caller's); an unknown one is refused."""
    opts.pop("size", None)
    opts.pop("backing_fmt", None)
    sub = str(opts.pop("subformat", "monolithicSparse"))
    adapter = str(opts.pop("adapter_type", "ide"))
    hw = opts.pop("hwversion", None)
    compat6 = _bool("compat6", opts.pop("compat6", False))
    tools = str(opts.pop("toolsversion", "2147483647"))
    zeroed = _bool("zeroed_grain", opts.pop("zeroed_grain", False))
    # the file protocol's option: checked, and (as in qemu) it allocates nothing more
    check_preallocation("vmdk", str(opts.pop("preallocation", "off")), ("off", "falloc", "full"))
    if opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
    if sub not in SUBFORMATS:
        raise UsageError(f"invalid parameter value: {sub}")
    if adapter not in ADAPTER_TYPES:
        raise UsageError(f"invalid parameter value: {adapter}")
    if compat6 and hw is not None:
        raise UsageError("compat6 cannot be enabled with hwversion set")
    if zeroed and sub in ("monolithicFlat", "twoGbMaxExtentFlat"):
        raise UsageError("Flat image can't enable zeroed grain")
    hw_version = str(hw) if hw is not None else ("6" if compat6 else "4")
    size = -(-size // S.SECTOR) * S.SECTOR
    if size < 0 or size // S.SECTOR > (1 << 63) // S.SECTOR - 1:
        raise UsageError("Image size must be less than 8 EiB!")
    heads = 16 if adapter == "ide" else 255
    return _Options(sub, adapter, hw_version, tools, zeroed, size, heads)


def _descriptor(o: _Options, parent_cid: int, backing_file: str | None,
                extents: list[ExtentLine]) -> bytes:
    """The descriptor text naming ``extents`` and the parent by their files' bytes."""
    named = [ExtentLine(x.access, x.sectors, x.type,
                        None if x.filename is None else stored_text(x.filename, "Extent name"),
                        x.offset) for x in extents]
    hint = None if backing_file is None else stored_text(backing_file, "Backing file name")
    return build(cid=new_cid(), parent_cid=parent_cid, create_type=o.sub,
                 parent_hint=hint, extents=named, hw_version=o.hw_version,
                 cylinders=o.size // (63 * o.heads * S.SECTOR), heads=o.heads,
                 adapter_type=o.adapter, tools_version=o.tools).encode("latin-1")


def _stream_head(cap: int, zeroed: bool, text: bytes) -> tuple[S.SparseHeader, bytes]:
    """A streamOptimized extent's first ``overhead`` sectors: header and descriptor."""
    h = stream_header(cap)
    if zeroed:
        h = h.with_(flags=h.flags | S.FLAG_ZERO_GRAIN)
    return h, (h.pack() + text.ljust(20 * S.SECTOR, b"\0")).ljust(h.overhead * S.SECTOR,
                                                                 b"\0")


def stream_preamble(size: int, options: dict[str, Any] | None = None,
                    name: str = "disk.vmdk") -> tuple[S.SparseHeader, bytes]:
    """The header and the first bytes (header + embedded descriptor naming ``name``) of a
    streamOptimized vmdk of ``size`` bytes, for a destination that cannot seek: the same
    bytes :func:`create_vmdk` writes (GD_AT_END: the tables follow the grains, the
    footer says where).  ``options`` as for ``create``; the subformat must be
    streamOptimized and there is no backing file."""
    opts = dict(options or {})
    opts.setdefault("subformat", "streamOptimized")
    if opts.pop("backing_file", None):
        raise UsageError("a streamed vmdk cannot have a backing file")
    o = _parse_options(size, opts)
    if o.sub != "streamOptimized":
        raise UsageError(f"vmdk subformat '{o.sub}' cannot be written to a stream: its "
                         "tables come before the data and are filled in afterwards; use "
                         "subformat=streamOptimized")
    cap = o.size // S.SECTOR
    text = _descriptor(o, NO_PARENT, None, [ExtentLine("RW", cap, "SPARSE", name)])
    return _stream_head(cap, o.zeroed, text)


def _split_name(path: Path) -> tuple[str, str]:
    base = path.name
    dot = base.rfind(".")
    return (base[:dot], base[dot:]) if dot > 0 else (base, "")


def backing_cid(path: str | os.PathLike[str], backing_file: str) -> int:
    """The CID of the vmdk ``backing_file`` names (resolved against the directory of
    ``path``, the new image): what its child's descriptor records as ``parentCID``.
    Read without QEMU's lock (only its header and descriptor are read); a file that is
    missing or not a vmdk is refused (UsageError, DiskImgError)."""
    bpath = OpenPolicy().resolve(backing_file, Path(os.path.abspath(path)))
    bh = open_host_file(bpath, False, lock_mode=False)
    try:
        from diskimg.probe import probe_bytes

        fmt = probe_bytes(bh.pread(0, 2048))
        if fmt != "vmdk":
            raise UsageError("backing_file must be a vmdk image")
        with VmdkImage(bh) as parent:
            cid: int = parent.cid
            return cid
    finally:
        bh.close()


def create_vmdk(path: str | os.PathLike[str], size: int, *, backing_file: str | None = None,
                options: dict[str, Any] | None = None, lock: bool = True) -> None:
    """Create a vmdk like ``qemu-img create -f vmdk`` with qemu's ``-o`` options.
    ``lock`` False: QEMU's lock bytes on the files it makes are neither tested nor taken
    (for a caller that holds the write lock through a descriptor of its own)."""
    path = Path(path)
    opts = dict(options or {})
    backing_file = backing_file or opts.pop("backing_file", None)
    o = _parse_options(size, opts)
    sub, zeroed, size = o.sub, o.zeroed, o.size
    parent_cid = backing_cid(path, backing_file) if backing_file else NO_PARENT
    prefix, postfix = _split_name(path)
    d = path.parent
    cap = size // S.SECTOR
    extents: list[ExtentLine] = []
    flat = sub in ("monolithicFlat", "twoGbMaxExtentFlat")
    split = sub.startswith("twoGb")
    parts: list[tuple[str, int]] = []       # (extent file name, bytes)
    if sub in ("monolithicSparse", "streamOptimized"):
        extents.append(ExtentLine("RW", cap, "SPARSE", path.name))
    else:
        remaining = size
        while remaining > 0:          # size 0: no extent at all, as qemu-img
            n = min(SPLIT_SIZE, remaining) if split else remaining
            idx = len(parts) + 1
            if split:
                name = f"{prefix}-{'f' if flat else 's'}{idx:03d}{postfix}"
            else:
                name = f"{prefix}-flat{postfix}"
            parts.append((name, n))
            remaining -= n
    # QEMU's lock on the descriptor, held throughout, and on every existing extent file
    # before anything is emptied: a refused create changes no file
    desc_host = open_host_file(path, True, create=True, truncate=False, lock_mode=lock)
    try:
        for name, _n in parts:
            if os.path.lexists(d / name):
                open_host_file(d / name, True, lock_mode=lock).close()
        # the largest file this create makes, tried on the locked descriptor (the extents
        # share its directory): a file system that cannot hold it refuses before any change
        sizes = [n if flat else sparse_layout(n // S.SECTOR)[0].overhead * S.SECTOR
                 for _name, n in parts]
        if sub == "monolithicSparse":
            sizes.append(sparse_layout(cap)[0].overhead * S.SECTOR)
        desc_host.empty(max(sizes, default=0))
        for name, n in parts:
            eh = open_host_file(d / name, True, create=True, lock_mode=lock)
            try:
                if flat:  # a new file of the file protocol: its first block allocated
                    create_raw(eh, n)
                    extents.append(ExtentLine("RW", n // S.SECTOR, "FLAT", name, 0))
                else:
                    _init_sparse(eh, n // S.SECTOR, zeroed)
                    extents.append(ExtentLine("RW", n // S.SECTOR, "SPARSE", name))
            finally:
                eh.close()
        text = _descriptor(o, parent_cid, backing_file, extents)
        _write_descriptor(desc_host, sub, cap, zeroed, text)
    finally:
        desc_host.close()


def _write_descriptor(desc_host: Host, sub: str, cap: int, zeroed: bool,
                      text: bytes) -> None:
    """The descriptor file of a new image: sparse header + embedded descriptor
    (monolithicSparse, streamOptimized) or the descriptor text alone."""
    if sub == "monolithicSparse":
        _init_sparse(desc_host, cap, zeroed)
        desc_host.pwrite(S.SECTOR, text)
    elif sub == "streamOptimized":
        h, head = _stream_head(cap, zeroed, text)
        desc_host.pwrite(0, head)
        StreamWriter(desc_host, h, h.overhead * S.SECTOR, threads=1).finish()
    else:
        desc_host.pwrite(0, text)


def write_stream_optimized(src: BlockDevice, dst: str | os.PathLike[str] | Sink, *,
                           options: dict[str, Any] | None = None, level: int = 6,
                           threads: int | None = None,
                           progress: Callable[[int, int], None] | None = None,
                           name: str = "disk.vmdk") -> None:
    """Write ``src`` as a streamOptimized vmdk at ``dst``, front to back in one pass.

    All-zero grains are skipped; grains are deflated on a thread pool (zlib releases the
    GIL) and appended in guest order.  ``dst`` may be a :class:`Sink` (a pipe, a socket,
    stdout): then nothing is sought back to, and the bytes are those a path gets (the
    embedded descriptor names ``name`` as its extent).
    """
    if isinstance(dst, Sink):
        h, head = stream_preamble(src.size, options, name)
        dst.write(head)
        _stream_grains(src, StreamWriter(dst, h, len(head), threads=threads, level=level),
                       progress)
        return
    opts = dict(options or {})
    opts["subformat"] = "streamOptimized"
    create_vmdk(dst, src.size, options=opts)
    host = open_host_file(dst, True)
    try:
        h = S.SparseHeader.parse(host.pread(0, S.SECTOR))
        _stream_grains(src, StreamWriter(host, h, h.overhead * S.SECTOR, threads=threads,
                                         level=level), progress)
    finally:
        host.close()


def _stream_grains(src: BlockDevice, w: StreamWriter,
                   progress: Callable[[int, int], None] | None) -> None:
    """Every non-zero grain of ``src`` into ``w``, in order, then its tables and footer."""
    try:
        gb = w.gb
        zero = bytes(gb)
        buf = bytearray(gb)
        last = -1
        for e in src.map():
            if not e.data:          # holes and zero runs are not stored
                continue
            g = max(e.start // gb, last + 1)
            while g * gb < e.start + e.length:
                off = g * gb
                n = min(gb, src.size - off)
                mv = memoryview(buf)
                src.readinto(off, mv[:n])   # reads stay on this thread
                if n < gb:
                    mv[n:] = zero[:gb - n]
                if buf != zero:
                    w.add_grain(g, bytes(buf))
                if progress is not None:
                    progress(off + n, src.size)
                last = g
                g += 1
        w.finish()
    finally:
        w.close()
