"""virsh's ``vol-*`` commands (create-as, create, create-from, clone, delete, wipe, resize,
upload, download, info, dumpxml, list, path, key, name, pool): each a function of
(:class:`Ctx`, parsed options) registered in :data:`VOL_COMMANDS`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diskimg.errors import DiskImgError
from diskimg.hostio import open_host_file
from diskimg.ops.common import ProgressFn
from diskimg.pool.cmdline import (
    BOOL,
    NUM,
    POOL_OPTS,
    CmdError,
    Command,
    Ctx,
    Fail,
    Opt,
    esc,
    kv,
    pretty,
    read_file,
    size_arg,
    table,
)
from diskimg.pool.wipe import WIPE_ALGORITHMS

# --- volume commands -------------------------------------------------------------------------

_FORMATS_HELP = "raw,bochs,qcow,qcow2,qed,vmdk"


@contextmanager
def _progress(ctx: Ctx, a: dict[str, Any]) -> Iterator[ProgressFn | None]:
    """With ``--progress`` (and not ``-q``): ``convert -p``'s ``    (NN.NN/100%)\r`` lines
    on stdout as the job runs, 100 last, then a newline (also when it fails)."""
    if not a.get("progress") or ctx.quiet or ctx.progress_line is None:
        yield None
        return
    line = ctx.progress_line(ctx.out)
    last: list[float] = []

    def report(percent: float) -> None:
        last[:] = [percent]
        line(percent)

    try:
        yield report
        if last != [100.0]:
            line(100.0)
    finally:
        line.end()


def cmd_vol_create_as(ctx: Ctx, a: dict[str, Any]) -> None:
    cap = size_arg(a["capacity"])
    alloc = size_arg(a["allocation"]) if "allocation" in a else None
    fmt = a.get("format")
    if a.get("print-xml"):
        lines = ["<volume>", f"  <name>{esc(a['name'])}</name>",
                 f"  <capacity>{cap}</capacity>"]
        if alloc is not None:
            lines.append(f"  <allocation>{alloc}</allocation>")
        if fmt:
            lines += ["  <target>", f"    <format type='{esc(fmt)}'/>", "  </target>"]
        if "backing-vol" in a:
            bv = ctx.vol(a["backing-vol"], a["pool"])
            lines += ["  <backingStore>", f"    <path>{esc(bv.path)}</path>"]
            if a.get("backing-vol-format"):
                lines.append(f"    <format type='{esc(a['backing-vol-format'])}'/>")
            lines.append("  </backingStore>")
        lines.append("</volume>")
        ctx.print("\n".join(lines) + "\n")
        return
    pool = ctx.pool(a["pool"])
    backing = None
    if "backing-vol" in a:
        backing = ctx.vol(a["backing-vol"], a["pool"])
    with Fail(f"Failed to create vol {a['name']}"):
        pool.create_volume(a["name"], cap, fmt or "raw", allocation=alloc, backing=backing,
                           backing_format=a.get("backing-vol-format"),
                           prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {a['name']} created\n")


def cmd_vol_create(ctx: Ctx, a: dict[str, Any]) -> None:
    pool = ctx.pool(a["pool"])
    text = read_file(a["file"])
    with Fail(f"Failed to create vol from {a['file']}"):
        v = pool.create_volume_xml(text, secrets=ctx.secrets,
                                   prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {v.name} created from {a['file']}\n")


def cmd_vol_create_from(ctx: Ctx, a: dict[str, Any]) -> None:
    pool = ctx.pool(a["pool"])
    text = read_file(a["file"])
    src = ctx.vol(a["vol"], a.get("inputpool"),
                  "" if a.get("inputpool") else ", specifying --inputpool might help")
    with Fail(f"Failed to create vol from {a['file']}"), _progress(ctx, a) as progress:
        v = pool.create_volume_from(text, src, secrets=ctx.secrets,
                                    prealloc_metadata=bool(a.get("prealloc-metadata")),
                                    progress=progress)
    ctx.extra(f"Vol {v.name} created from input vol {src.name}\n")


def cmd_vol_clone(ctx: Ctx, a: dict[str, Any]) -> None:
    src = ctx.vol(a["vol"], a.get("pool"))
    if a.get("print-xml"):
        raise CmdError("Operation not supported: --print-xml is not implemented by diskimg")
    with Fail(f"Failed to clone vol from {src.name}"), _progress(ctx, a) as progress:
        src.clone(a["newname"], prealloc_metadata=bool(a.get("prealloc-metadata")),
                  progress=progress)
    ctx.extra(f"Vol {a['newname']} cloned from {src.name}\n")


def cmd_vol_delete(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    with Fail(f"Failed to delete vol {v.name}"):
        v.delete(force=bool(a.get("force")))
    ctx.extra(f"Vol {v.name} deleted\n")


def cmd_vol_wipe(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    alg = a.get("algorithm", "zero")
    if alg not in WIPE_ALGORITHMS:
        raise CmdError(f"Unsupported algorithm '{alg}'")
    with Fail(f"Failed to wipe vol {v.name}"), _progress(ctx, a) as progress:
        v.wipe(alg, secrets=ctx.secrets, force=bool(a.get("force")), progress=progress)
    ctx.extra(f"Vol {v.name} wiped\n")


def cmd_vol_resize(ctx: Ctx, a: dict[str, Any]) -> None:
    text: str = a["capacity"]
    delta = bool(a.get("delta"))
    shrink = bool(a.get("shrink"))
    if text.startswith("-"):
        text = text[1:]
        delta = True
        if not shrink:
            raise CmdError("negative size requires --shrink")
    elif text.startswith("+"):
        text = text[1:]
    cap = size_arg(text)
    v = ctx.vol(a["vol"], a.get("pool"))
    how = "by" if delta else "to"
    with Fail(f"Failed to change size of volume '{v.name}' {how} {a['capacity'].lstrip('-')}"):
        v.resize(cap, delta=delta, shrink=shrink, allocate=bool(a.get("allocate")),
                 force=bool(a.get("force")))
    ctx.extra(f"Size of volume '{v.name}' successfully changed {how} "
              f"{a['capacity'].lstrip('-')}\n")


def cmd_vol_upload(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    try:
        f = open(a["file"], "rb")  # noqa: SIM115
    except OSError as e:
        raise CmdError(f"cannot read {a['file']}", e.strerror or "") from None
    with f, Fail(f"cannot upload to volume {v.name}"), _progress(ctx, a) as progress:
        v.upload(f, a.get("offset", 0), a.get("length", 0), sparse=bool(a.get("sparse")),
                 force=bool(a.get("force")), progress=progress)


def cmd_vol_download(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    created = not os.path.exists(a["file"])
    # an existing regular file is emptied only under QEMU's write lock, held to the end: a
    # disk image a running QEMU holds is refused as it is (a pipe or /dev/stdout is not)
    guard = None
    if os.path.isfile(a["file"]):
        try:
            guard = open_host_file(a["file"], True)
        except DiskImgError as e:
            msg = str(e)
            if not msg.startswith("Could not open '"):
                msg = f"Could not open '{a['file']}': {msg}"
            raise CmdError(f"cannot create {a['file']}", *msg.splitlines()) from None
    try:
        try:
            f = open(a["file"], "wb")  # noqa: SIM115
        except OSError as e:
            raise CmdError(f"cannot create {a['file']}", e.strerror or "") from None
        try:
            with f, Fail(f"cannot download from volume {v.name}"), \
                    _progress(ctx, a) as progress:
                v.download(f, a.get("offset", 0), a.get("length", 0),
                           sparse=bool(a.get("sparse")), progress=progress)
        except CmdError:
            if created:
                os.unlink(a["file"])
            raise
    finally:
        if guard is not None:
            guard.close()


def cmd_vol_info(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    with Fail("failed to get vol info"):
        i = v.info()

    def fmt(n: int) -> str:
        return f"{n} bytes" if a.get("bytes") else pretty(n)

    text = kv("Name", v.name) + kv("Type", i.type) + kv("Capacity", fmt(i.capacity))
    if a.get("physical"):
        text += kv("Physical", fmt(i.physical))
    else:
        text += kv("Allocation", fmt(i.allocation))
    ctx.print(text)


def cmd_vol_dumpxml(ctx: Ctx, a: dict[str, Any]) -> None:
    if a.get("xpath") or a.get("wrap"):
        raise CmdError("Operation not supported: --xpath is not implemented by diskimg")
    v = ctx.vol(a["vol"], a.get("pool"))
    with Fail(f"failed to get XML of vol {v.name}"):
        ctx.print(v.to_xml())


def cmd_vol_list(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    with Fail("Failed to list volumes"):
        vols = p.volumes()
        infos = [v.info() for v in vols] if a.get("details") else []
    if not a.get("details"):
        ctx.print(table(["Name", "Path"], [[v.name, v.path] for v in vols], ctx.quiet))
        return
    rows = [[v.name, v.path, i.type, pretty(i.capacity), pretty(i.allocation)]
            for v, i in zip(vols, infos, strict=True)]
    ctx.print(table(["Name", "Path", "Type", "Capacity", "Allocation"], rows, ctx.quiet))


def cmd_vol_path(ctx: Ctx, a: dict[str, Any]) -> None:
    ctx.print(ctx.vol(a["vol"], a.get("pool")).path + "\n")


def cmd_vol_key(ctx: Ctx, a: dict[str, Any]) -> None:
    ctx.print(ctx.vol(a["vol"], a.get("pool")).key + "\n")


def cmd_vol_name(ctx: Ctx, a: dict[str, Any]) -> None:
    ctx.print(ctx.vol(a["vol"], None).name + "\n")


def cmd_vol_pool(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], None)
    ctx.print(f"{v.pool.uuid if a.get('uuid') else v.pool.name}\n")


_VOL_POOL = [Opt("vol", required=True), Opt("pool")]
#: diskimg's own option (virsh has none): act on a volume even while another process (a
#: running QEMU) holds its image lock.
_FORCE = Opt("force", BOOL, help="even if a running QEMU holds the image lock (diskimg only)")
#: diskimg's own option (virsh prints nothing while these jobs run): convert -p's lines
_PROGRESS = Opt("progress", BOOL, help="print progress as convert -p does (diskimg only)")

VOL_COMMANDS: dict[str, Command] = {
    "vol-create-as": (cmd_vol_create_as,
                      [Opt("pool", required=True), Opt("name", required=True),
                       Opt("capacity", required=True), Opt("allocation", positional=False),
                       Opt("format", positional=False), Opt("backing-vol", positional=False),
                       Opt("backing-vol-format", positional=False),
                       Opt("prealloc-metadata", BOOL), Opt("print-xml", BOOL)],
                      "create a volume from a set of args"),
    "vol-create": (cmd_vol_create, [Opt("pool", required=True), Opt("file", required=True),
                                    Opt("prealloc-metadata", BOOL), Opt("validate", BOOL)],
                   "create a vol from an XML file"),
    "vol-create-from": (cmd_vol_create_from,
                        [Opt("pool", required=True), Opt("file", required=True),
                         Opt("vol", required=True), Opt("inputpool", positional=False),
                         Opt("prealloc-metadata", BOOL), Opt("reflink", BOOL),
                         Opt("validate", BOOL), _PROGRESS],
                        "create a vol, using another volume as input"),
    "vol-clone": (cmd_vol_clone, [Opt("vol", required=True), Opt("newname", required=True),
                                  Opt("pool", positional=False),
                                  Opt("prealloc-metadata", BOOL), Opt("reflink", BOOL),
                                  Opt("print-xml", BOOL), _PROGRESS], "clone a volume"),
    "vol-delete": (cmd_vol_delete, [*_VOL_POOL, Opt("delete-snapshots", BOOL), _FORCE],
                   "delete a vol"),
    "vol-wipe": (cmd_vol_wipe, [*_VOL_POOL, Opt("algorithm", positional=False), _FORCE,
                                _PROGRESS],
                 "wipe a vol"),
    "vol-resize": (cmd_vol_resize, [Opt("vol", required=True), Opt("capacity", required=True),
                                    Opt("pool"), Opt("allocate", BOOL), Opt("delta", BOOL),
                                    Opt("shrink", BOOL), _FORCE], "resize a vol"),
    "vol-upload": (cmd_vol_upload, [Opt("vol", required=True), Opt("file", required=True),
                                    Opt("pool"), Opt("offset", NUM, positional=False),
                                    Opt("length", NUM, positional=False),
                                    Opt("sparse", BOOL), _FORCE, _PROGRESS],
                   "upload file contents to a volume"),
    "vol-download": (cmd_vol_download, [Opt("vol", required=True), Opt("file", required=True),
                                        Opt("pool"), Opt("offset", NUM, positional=False),
                                        Opt("length", NUM, positional=False),
                                        Opt("sparse", BOOL), _PROGRESS],
                     "download volume contents to a file"),
    "vol-info": (cmd_vol_info, [*_VOL_POOL, Opt("bytes", BOOL), Opt("physical", BOOL)],
                 "storage vol information"),
    "vol-dumpxml": (cmd_vol_dumpxml, [*_VOL_POOL, Opt("xpath", positional=False),
                                      Opt("wrap", BOOL)], "vol information in XML"),
    "vol-list": (cmd_vol_list, [*POOL_OPTS, Opt("details", BOOL)], "list vols"),
    "vol-path": (cmd_vol_path, _VOL_POOL, "returns the volume path for a given volume "
                 "name or key"),
    "vol-key": (cmd_vol_key, _VOL_POOL, "returns the volume key for a given volume name or "
                "path"),
    "vol-name": (cmd_vol_name, [Opt("vol", required=True)], "returns the volume name for a "
                 "given volume key or path"),
    "vol-pool": (cmd_vol_pool, [Opt("vol", required=True), Opt("uuid", BOOL)],
                 "returns the storage pool for a given volume key or path"),
}

__all__ = ["VOL_COMMANDS"]
