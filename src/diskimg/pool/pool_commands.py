"""virsh's ``pool-*`` commands (define, create, build, start, destroy, delete, undefine,
refresh, autostart, name, uuid, dumpxml, info, list): each a function of (:class:`Ctx`,
parsed options) registered in :data:`POOL_COMMANDS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from diskimg.errors import PoolError
from diskimg.pool.cmdline import (
    BOOL,
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
    table,
)
from diskimg.pool.paths import validate_pool_name, validate_target_path
from diskimg.pool.pool import Pool
from diskimg.pool.xml import PoolDef

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


def _pool_def_as(a: dict[str, Any], verb: str) -> PoolDef:
    """The definition the ``<pool>`` XML of pool-define-as/pool-create-as arguments holds
    (:func:`_pool_xml`), refused as define refuses it."""
    fail = f"Failed to {verb} pool {a['name']}"
    xml = _pool_xml(a, verb)
    with Fail(fail):  # what define refuses in words of its own, before the XML is read
        validate_pool_name(a["name"])
    with Fail(fail):
        d = PoolDef.from_xml(xml)
        if d.target_path is not None:
            d.target_path = os.path.abspath(d.target_path)
    return d


def _pool_xml(a: dict[str, Any], verb: str) -> str:
    """The ``<pool>`` XML of pool-define-as/pool-create-as arguments, as ``--print-xml``
    prints it: refused only for a type or option diskimg does not build, or text no XML
    can hold (a name that is no file name is printed, as virsh prints it)."""
    fail = f"Failed to {verb} pool {a['name']}"
    if a["type"] != "dir":
        raise CmdError(fail, f"Operation not supported: diskimg supports pool type 'dir', "
                             f"not '{a['type']}'")
    unsupported = [k for k in a if k.startswith(("source-", "auth-", "secret-", "adapter-"))]
    if unsupported:
        raise CmdError(fail, f"Operation not supported: --{unsupported[0]} is not used by "
                             "dir pools")
    target = a.get("target")
    with Fail(fail):  # what no XML can hold is refused as define_xml words it
        validate_pool_name(a["name"], file_name=False)
        validate_target_path(target)
    lines = [f"<pool type='{esc(a['type'])}'>", f"  <name>{esc(a['name'])}</name>"]
    if target:
        lines += ["  <target>", f"    <path>{esc(target)}</path>", "  </target>"]
    lines.append("</pool>")
    return "\n".join(lines) + "\n"


def _store_pool(ctx: Ctx, a: dict[str, Any], xml: str | bytes | PoolDef,
                transient: bool) -> Pool:
    if transient:
        return ctx.reg.create_xml(xml, build=bool(a.get("build")))
    return ctx.reg.define_xml(xml)


def _pool_from_args(transient: bool) -> Callable[[Ctx, dict[str, Any]], None]:
    """pool-define-as (persistent) / pool-create-as (transient, started)."""
    verb = "create" if transient else "define"

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        if a.get("print-xml"):
            ctx.print(_pool_xml(a, verb))
            return
        d = _pool_def_as(a, verb)
        with Fail(f"Failed to {verb} pool {a['name']}"):
            _store_pool(ctx, a, d, transient)
        ctx.extra(f"Pool {a['name']} {verb}d\n")

    return run


def _pool_from_file(transient: bool) -> Callable[[Ctx, dict[str, Any]], None]:
    """pool-define FILE (persistent) / pool-create FILE (transient, started)."""
    verb = "create" if transient else "define"

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        text = read_file(a["file"])
        with Fail(f"Failed to {verb} pool from {a['file']}"):
            p = _store_pool(ctx, a, text, transient)
        ctx.extra(f"Pool {p.name} {verb}d from {a['file']}\n")

    return run


#: pool-VERB commands that call one :class:`Pool` method: command → (the verb of the failure
#: context "Failed to VERB pool NAME", as virsh prints it, the call, what the success message
#: says).
_POOL_ACTIONS: dict[str, tuple[str, Callable[[Pool, dict[str, Any]], None], str]] = {
    "pool-build": ("build", lambda p, a: p.build(overwrite=bool(a.get("overwrite")),
                                                 no_overwrite=bool(a.get("no-overwrite"))),
                   "built"),
    "pool-start": ("start", lambda p, a: p.start(build=bool(a.get("build"))), "started"),
    "pool-destroy": ("destroy", lambda p, a: p.destroy(), "destroyed"),
    "pool-delete": ("delete", lambda p, a: p.delete(), "deleted"),
    "pool-undefine": ("undefine", lambda p, a: p.undefine(), "has been undefined"),
    "pool-refresh": ("refresh", lambda p, a: p.refresh(), "refreshed"),
}


def _pool_action(cmd: str) -> Callable[[Ctx, dict[str, Any]], None]:
    verb, call, done = _POOL_ACTIONS[cmd]

    def run(ctx: Ctx, a: dict[str, Any]) -> None:
        p = ctx.pool(a["pool"])
        with Fail(f"Failed to {verb} pool {p.name}"):
            call(p, a)
        ctx.extra(f"Pool {p.name} {done}\n")

    run.__name__ = "cmd_" + cmd.replace("-", "_")
    return run


def cmd_pool_autostart(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    off = bool(a.get("disable"))
    with Fail(f"failed to {'unmark' if off else 'mark'} pool {p.name} as autostarted"):
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
    with Fail(f"Failed to get XML of pool {p.name}"):
        ctx.print(p.to_xml(inactive=bool(a.get("inactive"))))


def cmd_pool_info(ctx: Ctx, a: dict[str, Any]) -> None:
    p = ctx.pool(a["pool"])
    with Fail("Could not get information about the pool"):
        i = p.info()
    text = kv("Name", p.name) + kv("UUID", p.uuid or "")
    text += kv("State", i.state)
    text += kv("Persistent", "yes" if p.is_persistent() else "no")
    text += kv("Autostart", "yes" if p.autostart else "no")
    if i.state == "running":
        for label, v in (("Capacity", i.capacity), ("Allocation", i.allocation),
                         ("Available", i.available)):
            text += kv(label, str(v) if a.get("bytes") else pretty(v))
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



POOL_COMMANDS: dict[str, Command] = {
    "pool-define-as": (_pool_from_args(False), _POOL_AS, "define a pool from a set of args"),
    "pool-create-as": (_pool_from_args(True), _POOL_AS + _BUILD_FLAGS,
                       "create a pool from a set of args"),
    "pool-define": (_pool_from_file(False), [Opt("file", required=True), Opt("validate", BOOL)],
                    "define an inactive persistent storage pool from an XML file"),
    "pool-create": (_pool_from_file(True), [Opt("file", required=True), *_BUILD_FLAGS],
                    "create a pool from an XML file"),
    "pool-build": (_pool_action("pool-build"),
                   [*POOL_OPTS, Opt("no-overwrite", BOOL), Opt("overwrite", BOOL)], "build a pool"),
    "pool-start": (_pool_action("pool-start"), [*POOL_OPTS, *_BUILD_FLAGS],
                   "start a (previously defined) inactive pool"),
    "pool-destroy": (_pool_action("pool-destroy"), POOL_OPTS, "destroy (stop) a pool"),
    "pool-delete": (_pool_action("pool-delete"), POOL_OPTS, "delete a pool"),
    "pool-undefine": (_pool_action("pool-undefine"), POOL_OPTS, "undefine an inactive pool"),
    "pool-refresh": (_pool_action("pool-refresh"), POOL_OPTS, "refresh a pool"),
    "pool-autostart": (cmd_pool_autostart, [*POOL_OPTS, Opt("disable", BOOL)], "autostart a pool"),
    "pool-name": (cmd_pool_name, POOL_OPTS, "convert a pool UUID to pool name"),
    "pool-uuid": (cmd_pool_uuid, POOL_OPTS, "convert a pool name to pool UUID"),
    "pool-dumpxml": (cmd_pool_dumpxml, [*POOL_OPTS, Opt("inactive", BOOL),
                                        Opt("xpath", positional=False), Opt("wrap", BOOL)],
                     "pool information in XML"),
    "pool-info": (cmd_pool_info, [*POOL_OPTS, Opt("bytes", BOOL)], "storage pool information"),
    "pool-list": (cmd_pool_list, [Opt("inactive", BOOL), Opt("all", BOOL),
                                  Opt("transient", BOOL), Opt("persistent", BOOL),
                                  Opt("autostart", BOOL), Opt("no-autostart", BOOL),
                                  Opt("type", positional=False), Opt("details", BOOL),
                                  Opt("uuid", BOOL), Opt("name", BOOL)], "list pools"),
}

__all__ = ["POOL_COMMANDS"]
