"""``diskimg virsh ...`` / ``diskimg pool ...``: virsh's storage commands without libvirtd.

Command names, arguments, output layout (tables, ``Name:  value`` blocks, the blank line
after each command, ``-q``) and messages (``Pool p1 defined``, ``error: ...`` on stderr, exit
status 0/1) follow virsh 9.0.  Options may be given as ``--opt value``, ``--opt=value`` or
positionally in virsh's order.  Global options (before the command):

``-c/--connect URI``  ``qemu:///system`` → libvirt's ``/etc/libvirt/storage``,
                      ``qemu:///session`` → ``$XDG_CONFIG_HOME/libvirt/storage``
``--config-dir DIR``  where pool definitions live (default: see :func:`default_config_dir`)
``--state-dir DIR``   where started-pool markers live
``--object secret,id=UUID,data=PW|file=PATH``  passphrases for ``<encryption>`` secrets
``-q/--quiet``        no informational messages, no table headers
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from diskimg.errors import DiskImgError, PoolError
from diskimg.hostio import open_host_file
from diskimg.pool.pool import (
    LIBVIRT_SYSTEM_DIR,
    WIPE_ALGORITHMS,
    Pool,
    PoolRegistry,
    Volume,
    libvirt_session_dir,
)
from diskimg.pool.xml import PoolDef, parse_scaled

# --- option grammar -------------------------------------------------------------------------

BOOL, STR, NUM = "bool", "string", "number"


@dataclass(frozen=True)
class Opt:
    name: str
    kind: str = STR
    required: bool = False
    positional: bool = True  # string/number options may also be given without their name
    help: str = ""


class CmdError(Exception):
    """A virsh error: each line is printed as ``error: LINE``."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = [ln for ln in lines if ln]


def _parse_args(cmd: str, spec: list[Opt], args: Sequence[str]) -> dict[str, Any]:
    byname = {o.name: o for o in spec}
    got: dict[str, Any] = {}
    data_only = False
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if not data_only and a == "--":
            data_only = True
            continue
        if not data_only and a.startswith("--") and len(a) > 2:
            name, eq, val = a[2:].partition("=")
            o = byname.get(name)
            if o is None:
                raise CmdError(f"command '{cmd}' doesn't support option --{name}")
            if name in got:
                raise CmdError(f"option --{name} already seen")
            if o.kind == BOOL:
                if eq:
                    raise CmdError(f"invalid '=' after option --{name}")
                got[name] = True
                continue
            if not eq:
                if i >= len(args):
                    raise CmdError(f"expected syntax: --{name} <{o.kind}>")
                val = args[i]
                i += 1
            got[name] = val
            continue
        for o in spec:
            if o.kind != BOOL and o.positional and o.name not in got:
                got[o.name] = a
                break
        else:
            raise CmdError(f"unexpected data '{a}'")
    for o in spec:
        if o.required and o.name not in got:
            raise CmdError(f"command '{cmd}' requires <{o.name}> option")
    for o in spec:
        if o.kind == NUM and o.name in got:
            v = got[o.name]
            if not v.isdigit():
                raise CmdError(f"Numeric value '{v}' for <{o.name}> option is malformed or "
                               "out of range")
            got[o.name] = int(v)
    return got


# --- output helpers -------------------------------------------------------------------------

def pretty(value: int) -> str:
    """virsh's vshPrettyCapacity: ``1.00 GiB``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v = float(value)
    i = 0
    while i < len(units) - 1 and value >= 1024 ** (i + 1):
        i += 1
    return f"{v / 1024 ** i:.2f} {units[i]}"


def table(header: list[str], rows: list[list[str]], quiet: bool) -> str:
    """virsh's vshTable layout: a leading space, columns padded and 3 spaces apart, a dash
    line 2 longer than the header; the header is omitted with ``-q``."""
    shown = rows if quiet else [header, *rows]
    widths = [max((len(r[c]) for r in shown), default=0) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[c].ljust(widths[c]) if c < len(cells) - 1 else cells[c]
                 for c in range(len(cells))]
        return " " + "   ".join(parts)

    out = []
    if not quiet:
        h = line(header)
        out.append(h)
        out.append("-" * (1 + sum(widths) + 3 * (len(widths) - 1) + 2))
    out.extend(line(r) for r in rows)
    return "".join(s + "\n" for s in out)


def _kv(label: str, value: str) -> str:
    return f"{label + ':':<15} {value}\n"


# --- context ---------------------------------------------------------------------------------

class Ctx:
    def __init__(self, registry: PoolRegistry, quiet: bool, out: TextIO,
                 secrets: dict[str, bytes]) -> None:
        self.reg = registry
        self.quiet = quiet
        self.out = out
        self.secrets = secrets

    def print(self, text: str) -> None:
        self.out.write(text)

    def extra(self, text: str) -> None:
        """vshPrintExtra: informational, suppressed by -q."""
        if not self.quiet:
            self.out.write(text)

    def pool(self, name: str) -> Pool:
        try:
            return self.reg.lookup(name)
        except PoolError as e:
            raise CmdError(f"failed to get pool '{name}'", str(e)) from None

    def vol(self, name: str, pool: str | None, hint: str = "") -> Volume:
        """virsh's lookup: by name in ``pool`` if given, then by key, then by path."""
        err = None
        if pool is not None:
            p = self.pool(pool)
            try:
                return p.volume(name)
            except PoolError as e:
                err = e
                if "not active" in str(e):
                    raise CmdError(f"failed to get vol '{name}'", str(e)) from None
        try:
            return self.reg.find_volume(name)
        except PoolError as e:
            err = e
        raise CmdError(f"failed to get vol '{name}'{hint}",
                       f"Storage volume not found: no storage vol with matching path "
                       f"'{name}'" if err else "")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(10 << 20)
    except OSError as e:
        raise CmdError(f"Failed to open file '{path}': {e.strerror}") from None


def _size(text: str) -> int:
    try:
        return parse_scaled(text)
    except PoolError as e:
        raise CmdError(f"Malformed size {text}",
                       str(e) if "suffix" in str(e) else "") from None


@dataclass
class _Fail:
    """Context for errors of one command: ``error: <message>`` then the cause."""

    message: str

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: object) -> None:
        if e is None or isinstance(e, CmdError):
            return
        if isinstance(e, DiskImgError | OSError):
            detail = str(e)
            if isinstance(e, OSError) and e.strerror:
                detail = f"{e.strerror}" + (f": '{e.filename}'" if e.filename else "")
            raise CmdError(self.message, *detail.splitlines()) from e


# --- pool commands ---------------------------------------------------------------------------

_POOL_AS = [Opt("name", required=True), Opt("type", required=True),
            Opt("print-xml", BOOL), Opt("source-host"), Opt("source-path"), Opt("source-dev"),
            Opt("source-name"), Opt("target"), Opt("source-format"), Opt("auth-type"),
            Opt("auth-username"), Opt("secret-usage"), Opt("secret-uuid"),
            Opt("adapter-name"), Opt("adapter-wwnn"), Opt("adapter-wwpn"),
            Opt("adapter-parent"), Opt("adapter-parent-wwnn"), Opt("adapter-parent-wwpn"),
            Opt("adapter-parent-fabric-wwn"), Opt("source-protocol-ver"),
            Opt("source-initiator")]
_BUILD_FLAGS = [Opt("build", BOOL), Opt("no-overwrite", BOOL), Opt("overwrite", BOOL)]


def _esc(text: str) -> str:
    """Escape text for XML the way virsh's virBufferEscapeString does."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def _pool_def_as(a: dict[str, Any], verb: str) -> tuple[PoolDef, str]:
    """The ``<pool>`` XML virsh builds from pool-define-as/pool-create-as arguments."""
    fail = f"Failed to {verb} pool {a['name']}"
    if a["type"] != "dir":
        raise CmdError(fail, f"Operation not supported: diskimg supports pool type 'dir', "
                             f"not '{a['type']}'")
    unsupported = [k for k in a if k.startswith(("source-", "auth-", "secret-", "adapter-"))]
    if unsupported:
        raise CmdError(fail, f"Operation not supported: --{unsupported[0]} is not used by "
                             "dir pools")
    target = a.get("target")
    lines = [f"<pool type='{_esc(a['type'])}'>", f"  <name>{_esc(a['name'])}</name>"]
    if target:
        lines += ["  <target>", f"    <path>{_esc(target)}</path>", "  </target>"]
    lines.append("</pool>")
    xml = "\n".join(lines) + "\n"
    with _Fail(fail):
        d = PoolDef.from_xml(xml)
        if d.target_path is not None:
            d.target_path = os.path.abspath(d.target_path)
    return d, xml


def _store_pool(ctx: Ctx, a: dict[str, Any], xml: str | bytes | PoolDef,
                transient: bool) -> Pool:
    if transient:
        return ctx.reg.create_xml(xml, build=bool(a.get("build")))
    return ctx.reg.define_xml(xml)


def _pool_from_args(transient: bool) -> Callable[[Ctx, dict[str, Any]], None]:
    """pool-define-as (persistent) / pool-create-as (transient, started)."""
    verb = "create" if transient else "define"

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        d, xml = _pool_def_as(a, verb)
        if a.get("print-xml"):
            ctx.print(xml)
            return
        with _Fail(f"Failed to {verb} pool {a['name']}"):
            _store_pool(ctx, a, d, transient)
        ctx.extra(f"Pool {a['name']} {verb}d\n")

    return run


def _pool_from_file(transient: bool) -> Callable[[Ctx, dict[str, Any]], None]:
    """pool-define FILE (persistent) / pool-create FILE (transient, started)."""
    verb = "create" if transient else "define"

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        text = _read_file(a["file"])
        with _Fail(f"Failed to {verb} pool from {a['file']}"):
            p = _store_pool(ctx, a, text, transient)
        ctx.extra(f"Pool {p.name} {verb}d from {a['file']}\n")

    return run


#: pool-VERB commands that call one :class:`Pool` method: command → (method, {virsh flag:
#: keyword argument}, what the success message says).  The failure context is
#: "Failed to METHOD pool NAME", as virsh prints it.
_POOL_ACTIONS: dict[str, tuple[str, dict[str, str], str]] = {
    "pool-build": ("build", {"overwrite": "overwrite", "no-overwrite": "no_overwrite"}, "built"),
    "pool-start": ("start", {"build": "build"}, "started"),
    "pool-destroy": ("destroy", {}, "destroyed"),
    "pool-delete": ("delete", {}, "deleted"),
    "pool-undefine": ("undefine", {}, "has been undefined"),
    "pool-refresh": ("refresh", {}, "refreshed"),
}


def _pool_action(cmd: str) -> Callable[[Ctx, dict[str, Any]], None]:
    method, flags, done = _POOL_ACTIONS[cmd]

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        p = ctx.pool(a["pool"])
        with _Fail(f"Failed to {method} pool {p.name}"):
            getattr(p, method)(**{kw: bool(a.get(flag)) for flag, kw in flags.items()})
        ctx.extra(f"Pool {p.name} {done}\n")

    run.__name__ = "cmd_" + cmd.replace("-", "_")
    return run


def cmd_pool_autostart(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    off = bool(a.get("disable"))
    with _Fail(f"failed to {'unmark' if off else 'mark'} pool {p.name} as autostarted"):
        p.set_autostart(not off)
    ctx.extra(f"Pool {p.name} {'unmarked' if off else 'marked'} as autostarted\n")


def cmd_pool_name(ctx: Ctx, a: dict[str, Any]) -> None:
    ctx.print(f"{ctx.pool(a['pool']).name}\n")


def cmd_pool_uuid(ctx: Ctx, a: dict[str, Any]) -> None:
    ctx.print(f"{ctx.pool(a['pool']).uuid}\n")


def cmd_pool_dumpxml(ctx: Ctx, a: dict[str, Any]) -> None:
    if a.get("xpath") or a.get("wrap"):
        raise CmdError("Operation not supported: --xpath is not implemented by diskimg")
    p = ctx.pool(a["pool"])
    with _Fail(f"Failed to get XML of pool {p.name}"):
        ctx.print(p.to_xml(inactive=bool(a.get("inactive"))))


def cmd_pool_info(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    with _Fail("Could not get information about the pool"):
        i = p.info()
    text = _kv("Name", p.name) + _kv("UUID", p.uuid or "")
    text += _kv("State", i.state)
    text += _kv("Persistent", "yes" if p.is_persistent() else "no")
    text += _kv("Autostart", "yes" if p.autostart else "no")
    if i.state == "running":
        for label, v in (("Capacity", i.capacity), ("Allocation", i.allocation),
                         ("Available", i.available)):
            text += _kv(label, str(v) if a.get("bytes") else pretty(v))
    ctx.print(text)


def cmd_pool_list(ctx: Ctx, a: dict[str, Any]) -> None:
    pools = ctx.reg.pools()
    want_active = not a.get("inactive") or a.get("all")
    want_inactive = a.get("inactive") or a.get("all")
    sel = []
    for p in pools:
        act = p.is_active()
        if (act and not want_active) or (not act and not want_inactive):
            continue
        if a.get("persistent") and not a.get("transient") and not p.is_persistent():
            continue
        if a.get("transient") and not a.get("persistent") and p.is_persistent():
            continue
        if a.get("autostart") and not a.get("no-autostart") and not p.autostart:
            continue
        if a.get("no-autostart") and not a.get("autostart") and p.autostart:
            continue
        if a.get("type") and p.type not in a["type"].split(","):
            continue
        sel.append(p)
    if a.get("name") or a.get("uuid"):
        for p in sel:
            if a.get("uuid") and a.get("name"):
                ctx.print(f"{p.uuid}  {p.name}\n")
            elif a.get("uuid"):
                ctx.print(f"{p.uuid}\n")
            else:
                ctx.print(f"{p.name:<20}\n")
        return
    if not a.get("details"):
        rows = [[p.name, "active" if p.is_active() else "inactive",
                 "yes" if p.autostart else "no"] for p in sel]
        ctx.print(table(["Name", "State", "Autostart"], rows, ctx.quiet))
        return
    rows = []
    for p in sel:
        try:
            i = p.info()
        except PoolError:
            i = None
        active = i is not None and i.state == "running"
        sizes = ([pretty(i.capacity), pretty(i.allocation), pretty(i.available)]
                 if active and i is not None else ["-", "-", "-"])
        rows.append([p.name, "running" if active else "inactive",
                     "yes" if p.autostart else "no",
                     "yes" if p.is_persistent() else "no", *sizes])
    ctx.print(table(["Name", "State", "Autostart", "Persistent", "Capacity", "Allocation",
                     "Available"], rows, ctx.quiet))


# --- volume commands -------------------------------------------------------------------------

_FORMATS_HELP = "raw,bochs,qcow,qcow2,qed,vmdk"


def cmd_vol_create_as(ctx: Ctx, a: dict[str, Any]) -> None:
    cap = _size(a["capacity"])
    alloc = _size(a["allocation"]) if "allocation" in a else None
    fmt = a.get("format")
    if a.get("print-xml"):
        lines = ["<volume>", f"  <name>{_esc(a['name'])}</name>",
                 f"  <capacity>{cap}</capacity>"]
        if alloc is not None:
            lines.append(f"  <allocation>{alloc}</allocation>")
        if fmt:
            lines += ["  <target>", f"    <format type='{_esc(fmt)}'/>", "  </target>"]
        if "backing-vol" in a:
            bv = ctx.vol(a["backing-vol"], a["pool"])
            lines += ["  <backingStore>", f"    <path>{_esc(bv.path)}</path>"]
            if a.get("backing-vol-format"):
                lines.append(f"    <format type='{_esc(a['backing-vol-format'])}'/>")
            lines.append("  </backingStore>")
        lines.append("</volume>")
        ctx.print("\n".join(lines) + "\n")
        return
    pool = ctx.pool(a["pool"])
    backing = None
    if "backing-vol" in a:
        backing = ctx.vol(a["backing-vol"], a["pool"])
    with _Fail(f"Failed to create vol {a['name']}"):
        pool.create_volume(a["name"], cap, fmt or "raw", allocation=alloc, backing=backing,
                           backing_format=a.get("backing-vol-format"),
                           prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {a['name']} created\n")


def cmd_vol_create(ctx: Ctx, a: dict[str, Any]) -> None:
    pool = ctx.pool(a["pool"])
    text = _read_file(a["file"])
    with _Fail(f"Failed to create vol from {a['file']}"):
        v = pool.create_volume_xml(text, secrets=ctx.secrets,
                                   prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {v.name} created from {a['file']}\n")


def cmd_vol_create_from(ctx: Ctx, a: dict[str, Any]) -> None:
    pool = ctx.pool(a["pool"])
    text = _read_file(a["file"])
    src = ctx.vol(a["vol"], a.get("inputpool"),
                  "" if a.get("inputpool") else ", specifying --inputpool might help")
    with _Fail(f"Failed to create vol from {a['file']}"):
        v = pool.create_volume_from(text, src, secrets=ctx.secrets,
                                    prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {v.name} created from input vol {src.name}\n")


def cmd_vol_clone(ctx: Ctx, a: dict[str, Any]) -> None:
    src = ctx.vol(a["vol"], a.get("pool"))
    if a.get("print-xml"):
        raise CmdError("Operation not supported: --print-xml is not implemented by diskimg")
    with _Fail(f"Failed to clone vol from {src.name}"):
        src.clone(a["newname"], prealloc_metadata=bool(a.get("prealloc-metadata")))
    ctx.extra(f"Vol {a['newname']} cloned from {src.name}\n")


def cmd_vol_delete(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    with _Fail(f"Failed to delete vol {v.name}"):
        v.delete(force=bool(a.get("force")))
    ctx.extra(f"Vol {v.name} deleted\n")


def cmd_vol_wipe(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    alg = a.get("algorithm", "zero")
    if alg not in WIPE_ALGORITHMS:
        raise CmdError(f"Unsupported algorithm '{alg}'")
    with _Fail(f"Failed to wipe vol {v.name}"):
        v.wipe(alg, secrets=ctx.secrets, force=bool(a.get("force")))
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
    cap = _size(text)
    v = ctx.vol(a["vol"], a.get("pool"))
    how = "by" if delta else "to"
    with _Fail(f"Failed to change size of volume '{v.name}' {how} {a['capacity'].lstrip('-')}"):
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
    with f, _Fail(f"cannot upload to volume {v.name}"):
        v.upload(f, a.get("offset", 0), a.get("length", 0), sparse=bool(a.get("sparse")),
                 force=bool(a.get("force")))


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
            with f, _Fail(f"cannot download from volume {v.name}"):
                v.download(f, a.get("offset", 0), a.get("length", 0),
                           sparse=bool(a.get("sparse")))
        except CmdError:
            if created:
                os.unlink(a["file"])
            raise
    finally:
        if guard is not None:
            guard.close()


def cmd_vol_info(ctx: Ctx, a: dict[str, Any]) -> None:
    v = ctx.vol(a["vol"], a.get("pool"))
    with _Fail("failed to get vol info"):
        i = v.info()

    def fmt(n: int) -> str:
        return f"{n} bytes" if a.get("bytes") else pretty(n)

    text = _kv("Name", v.name) + _kv("Type", i.type) + _kv("Capacity", fmt(i.capacity))
    if a.get("physical"):
        text += _kv("Physical", fmt(i.physical))
    else:
        text += _kv("Allocation", fmt(i.allocation))
    ctx.print(text)


def cmd_vol_dumpxml(ctx: Ctx, a: dict[str, Any]) -> None:
    if a.get("xpath") or a.get("wrap"):
        raise CmdError("Operation not supported: --xpath is not implemented by diskimg")
    v = ctx.vol(a["vol"], a.get("pool"))
    with _Fail(f"failed to get XML of vol {v.name}"):
        ctx.print(v.to_xml())


def cmd_vol_list(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    with _Fail("Failed to list volumes"):
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


_POOL = [Opt("pool", required=True)]
_VOL_POOL = [Opt("vol", required=True), Opt("pool")]
#: diskimg's own option (virsh has none): act on a volume even while another process (a
#: running QEMU) holds its image lock.
_FORCE = Opt("force", BOOL, help="even if a running QEMU holds the image lock (diskimg only)")

COMMANDS: dict[str, tuple[Callable[[Ctx, dict[str, Any]], None], list[Opt], str]] = {
    "pool-define-as": (_pool_from_args(False), _POOL_AS, "define a pool from a set of args"),
    "pool-create-as": (_pool_from_args(True), _POOL_AS + _BUILD_FLAGS,
                       "create a pool from a set of args"),
    "pool-define": (_pool_from_file(False), [Opt("file", required=True), Opt("validate", BOOL)],
                    "define an inactive persistent storage pool from an XML file"),
    "pool-create": (_pool_from_file(True), [Opt("file", required=True), *_BUILD_FLAGS],
                    "create a pool from an XML file"),
    "pool-build": (_pool_action("pool-build"),
                   [*_POOL, Opt("no-overwrite", BOOL), Opt("overwrite", BOOL)], "build a pool"),
    "pool-start": (_pool_action("pool-start"), [*_POOL, *_BUILD_FLAGS],
                   "start a (previously defined) inactive pool"),
    "pool-destroy": (_pool_action("pool-destroy"), _POOL, "destroy (stop) a pool"),
    "pool-delete": (_pool_action("pool-delete"), _POOL, "delete a pool"),
    "pool-undefine": (_pool_action("pool-undefine"), _POOL, "undefine an inactive pool"),
    "pool-refresh": (_pool_action("pool-refresh"), _POOL, "refresh a pool"),
    "pool-autostart": (cmd_pool_autostart, [*_POOL, Opt("disable", BOOL)], "autostart a pool"),
    "pool-name": (cmd_pool_name, _POOL, "convert a pool UUID to pool name"),
    "pool-uuid": (cmd_pool_uuid, _POOL, "convert a pool name to pool UUID"),
    "pool-dumpxml": (cmd_pool_dumpxml, [*_POOL, Opt("inactive", BOOL),
                                        Opt("xpath", positional=False), Opt("wrap", BOOL)],
                     "pool information in XML"),
    "pool-info": (cmd_pool_info, [*_POOL, Opt("bytes", BOOL)], "storage pool information"),
    "pool-list": (cmd_pool_list, [Opt("inactive", BOOL), Opt("all", BOOL),
                                  Opt("transient", BOOL), Opt("persistent", BOOL),
                                  Opt("autostart", BOOL), Opt("no-autostart", BOOL),
                                  Opt("type", positional=False), Opt("details", BOOL),
                                  Opt("uuid", BOOL), Opt("name", BOOL)], "list pools"),
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
                         Opt("validate", BOOL)],
                        "create a vol, using another volume as input"),
    "vol-clone": (cmd_vol_clone, [Opt("vol", required=True), Opt("newname", required=True),
                                  Opt("pool", positional=False),
                                  Opt("prealloc-metadata", BOOL), Opt("reflink", BOOL),
                                  Opt("print-xml", BOOL)], "clone a volume"),
    "vol-delete": (cmd_vol_delete, [*_VOL_POOL, Opt("delete-snapshots", BOOL), _FORCE],
                   "delete a vol"),
    "vol-wipe": (cmd_vol_wipe, [*_VOL_POOL, Opt("algorithm", positional=False), _FORCE],
                 "wipe a vol"),
    "vol-resize": (cmd_vol_resize, [Opt("vol", required=True), Opt("capacity", required=True),
                                    Opt("pool"), Opt("allocate", BOOL), Opt("delta", BOOL),
                                    Opt("shrink", BOOL), _FORCE], "resize a vol"),
    "vol-upload": (cmd_vol_upload, [Opt("vol", required=True), Opt("file", required=True),
                                    Opt("pool"), Opt("offset", NUM, positional=False),
                                    Opt("length", NUM, positional=False),
                                    Opt("sparse", BOOL), _FORCE],
                   "upload file contents to a volume"),
    "vol-download": (cmd_vol_download, [Opt("vol", required=True), Opt("file", required=True),
                                        Opt("pool"), Opt("offset", NUM, positional=False),
                                        Opt("length", NUM, positional=False),
                                        Opt("sparse", BOOL)],
                     "download volume contents to a file"),
    "vol-info": (cmd_vol_info, [*_VOL_POOL, Opt("bytes", BOOL), Opt("physical", BOOL)],
                 "storage vol information"),
    "vol-dumpxml": (cmd_vol_dumpxml, [*_VOL_POOL, Opt("xpath", positional=False),
                                      Opt("wrap", BOOL)], "vol information in XML"),
    "vol-list": (cmd_vol_list, [*_POOL, Opt("details", BOOL)], "list vols"),
    "vol-path": (cmd_vol_path, _VOL_POOL, "returns the volume path for a given volume "
                 "name or key"),
    "vol-key": (cmd_vol_key, _VOL_POOL, "returns the volume key for a given volume name or "
                "path"),
    "vol-name": (cmd_vol_name, [Opt("vol", required=True)], "returns the volume name for a "
                 "given volume key or path"),
    "vol-pool": (cmd_vol_pool, [Opt("vol", required=True), Opt("uuid", BOOL)],
                 "returns the storage pool for a given volume key or path"),
}


def _usage() -> str:
    lines = ["Usage: diskimg virsh [-c URI] [--config-dir DIR] [--state-dir DIR] [-q] "
             "[--object secret,id=UUID,data=PW] COMMAND [ARGS...]", "",
             " Storage Pool and Volume commands (virsh's names and arguments):"]
    lines += [f"    {name:<20} {desc}" for name, (_f, _s, desc) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def _help(cmd: str) -> str:
    _f, spec, desc = COMMANDS[cmd]
    syn = []
    for o in spec:
        if o.kind == BOOL:
            syn.append(f"[--{o.name}]")
        elif o.required:
            syn.append(f"<{o.name}>")
        else:
            syn.append(f"[--{o.name} <{o.kind}>]")
    return f"  NAME\n    {cmd} - {desc}\n\n  SYNOPSIS\n    {cmd} {' '.join(syn)}\n\n"


def _connect(uri: str) -> Path:
    if uri in ("qemu:///system", "libvirt:///system"):
        return LIBVIRT_SYSTEM_DIR
    if uri in ("qemu:///session", "libvirt:///session"):
        return libvirt_session_dir()
    raise CmdError("failed to connect to the hypervisor",
                   f"diskimg only knows qemu:///system and qemu:///session, not '{uri}'")


def main(argv: list[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one virsh storage command; returns the exit status (0 ok, 1 error).

    ``argv`` is what follows ``diskimg virsh`` (a leading ``virsh``/``pool`` word is
    tolerated), e.g. ``["pool-list", "--all"]``.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = list(argv)
    if args and args[0] in ("virsh", "pool"):
        args = args[1:]
    config_dir: str | os.PathLike[str] | None = None
    state_dir: str | None = None
    quiet = False
    objects: list[str] = []
    try:
        while args and args[0].startswith("-"):
            a = args.pop(0)
            opt, eq, val = a.partition("=")
            if opt in ("-h", "--help"):
                out.write(_usage())
                return 0
            if opt in ("-q", "--quiet"):
                quiet = True
                continue
            if opt in ("-c", "--connect", "--config-dir", "--state-dir", "--object"):
                if not eq:
                    if not args:
                        raise CmdError(f"option {opt} needs an argument")
                    val = args.pop(0)
                if opt in ("-c", "--connect"):
                    config_dir = _connect(val)
                elif opt == "--config-dir":
                    config_dir = val
                elif opt == "--state-dir":
                    state_dir = val
                else:
                    objects.append(val)
                continue
            raise CmdError(f"unsupported option '{a}'. See --help.")
        if not args:
            out.write(_usage())
            return 0
        cmd = args.pop(0)
        if cmd == "help":
            if args and args[0] in COMMANDS:
                out.write(_help(args[0]))
            else:
                out.write(_usage())
            return 0
        if cmd not in COMMANDS:
            raise CmdError(f"unknown command: '{cmd}'")
        func, spec, _desc = COMMANDS[cmd]
        parsed = _parse_args(cmd, spec, args)
    except CmdError as e:
        for line in e.lines:
            err.write(f"error: {line}\n")
        return 1
    secrets: dict[str, bytes] = {}
    rc = 0
    try:
        if objects:
            from diskimg.secrets import parse_objects

            try:
                secrets = parse_objects(objects)
            except DiskImgError as e:
                raise CmdError(str(e)) from None
        ctx = Ctx(PoolRegistry(config_dir, state_dir), quiet, out, secrets)
        func(ctx, parsed)
    except CmdError as e:
        for line in e.lines:
            err.write(f"error: {line}\n")
        rc = 1
    except (DiskImgError, OSError) as e:  # an error no command wrapped: still no traceback
        err.write(f"error: {e}\n")
        rc = 1
    if not quiet:
        out.write("\n")
    out.flush()
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))


__all__ = ["COMMANDS", "main", "pretty", "table"]
