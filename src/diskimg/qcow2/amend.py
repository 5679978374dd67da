"""qcow2 metadata rewrites done outside :class:`Qcow2Image`: ``amend``, emptying an image
after ``commit``, and replacing the backing file name for ``rebase``.

One module per job; this one holds the entry points (``amend``, ``luks_add_key``,
``luks_remove_keys``) and re-exports the names of the others:

==========================  =============================================================
:mod:`.amend_plan`          option names and syntax, and :func:`plan_amend`: every
                            refusal, checked before any write, as an :class:`AmendPlan`
:mod:`.amend_header`        read/write the header cluster, feature bits, backing name
:mod:`.amend_compat`        compat=0.10/1.1 (zero-cluster expansion), lazy_refcounts
:mod:`.amend_refcount`      refcount_bits: the refcount structures at a new width
:mod:`.amend_keyslots`      encrypt.*: LUKS key slots inside the image
:mod:`.amend_empty`         emptying the image after ``commit``
==========================  =============================================================

Every function works on a :class:`HostFile` plus a parsed :class:`Header` of an image
nobody else has open (the caller closed or flushed its Qcow2Image first).  Write
ordering follows QEMU: new structures are written and synced before the header points at
them; clusters are freed only after nothing on disk refers to them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diskimg.crypto.luks import KeySlotAmend
from diskimg.errors import UsageError
from diskimg.qcow2.amend_compat import (
    check_downgradable,
    downgrade_to_v2,
    expand_zero_clusters,
    set_lazy_refcounts,
    upgrade_to_v3,
)
from diskimg.qcow2.amend_empty import make_empty
from diskimg.qcow2.amend_header import (
    data_file_raw_flag,
    nb_bitmaps,
    read_header,
    set_backing,
    set_feature_bits,
    write_header,
)
from diskimg.qcow2.header_io import refresh_feature_table
from diskimg.qcow2.amend_keyslots import amend_keyslots, keyslot_change, luks_area
from diskimg.qcow2.amend_plan import (
    AMEND_HELP,
    AMENDABLE,
    AmendPlan,
    check_encryption_amendable,
    check_resize,
    data_file_header,
    keyslot_request,
    plan_amend,
    qemu_number,
    validate_amend_options,
)
from diskimg.qcow2.amend_progress import (
    UPGRADE_CALLS,
    AmendStatus,
    StatusFn,
    downgrade_calls,
    refcount_walk_calls,
)
from diskimg.qcow2.amend_refcount import (
    check_refcount_width,
    counts_after_rebuild,
    rebuild_refcounts,
)
from diskimg.qcow2.cluster import clear_unknown_autoclear
from diskimg.qcow2.layout import (
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_EXTL2,
    Header,
)

ProgressFn = Callable[[float], None]

__all__ = [
    "AMENDABLE",
    "AMEND_HELP",
    "AmendPlan",
    "QCOW2_INCOMPAT_COMPRESSION",
    "QCOW2_INCOMPAT_EXTL2",
    "amend",
    "amend_keyslots",
    "check_downgradable",
    "check_encryption_amendable",
    "check_refcount_width",
    "check_resize",
    "counts_after_rebuild",
    "data_file_raw_flag",
    "downgrade_to_v2",
    "expand_zero_clusters",
    "keyslot_change",
    "keyslot_request",
    "luks_add_key",
    "luks_area",
    "luks_remove_keys",
    "make_empty",
    "nb_bitmaps",
    "plan_amend",
    "qemu_number",
    "read_header",
    "rebuild_refcounts",
    "set_backing",
    "set_feature_bits",
    "set_lazy_refcounts",
    "upgrade_to_v3",
    "validate_amend_options",
    "write_header",
]


def luks_add_key(path: Any, secret: bytes, new_secret: bytes, *,
                 keyslot: int | None = None, iter_time_ms: int | None = None,
                 force: bool = False, untrusted: bool = False) -> int:
    """Add ``new_secret`` as a key of the LUKS qcow2 at ``path`` unlocked with ``secret``
    (qemu-img amend ``encrypt.state=active``); returns the key slot used.

    ``keyslot`` None takes the first free slot; an active slot is replaced only with
    ``force``.  ``iter_time_ms`` (default 2000) is the PBKDF2 time of the new slot.
    Raises :class:`InvalidPassphraseError` when ``secret`` opens no slot."""
    before, after = keyslot_change(
        path, secret, KeySlotAmend("active", new_secret="new", keyslot=keyslot,
                                   iter_time=iter_time_ms),
        {"new": new_secret}, force, untrusted)
    changed = [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
               if b.active and (not a.active or a.salt != b.salt)]
    assert len(changed) == 1
    return changed[0]


def luks_remove_keys(path: Any, secret: bytes, *, keyslot: int | None = None,
                     old_secret: bytes | None = None, force: bool = False,
                     untrusted: bool = False) -> list[int]:
    """Erase key slots of the LUKS qcow2 at ``path`` unlocked with ``secret`` (qemu-img
    amend ``encrypt.state=inactive``): slot ``keyslot``, and/or every slot ``old_secret``
    opens.  Erasing the last active slot is refused unless ``force`` (the data would be
    lost for ever).  Returns the erased slots."""
    before, after = keyslot_change(
        path, secret, KeySlotAmend("inactive", keyslot=keyslot,
                                   old_secret=None if old_secret is None else "old"),
        {} if old_secret is None else {"old": old_secret}, force, untrusted)
    return [i for i, (a, b) in enumerate(zip(before.slots, after.slots, strict=True))
            if a.active and not b.active]


def amend(path: Any, options: dict[str, str], *, format: str | None = None,  # noqa: A002
          fmt: str | None = None, force: bool = False, secrets: Mapping[str, bytes] | None = None,
          untrusted: bool = False, image_options: Mapping[str, str] | None = None,
          device: Any = None, progress: StatusFn | None = None) -> None:
    """``qemu-img amend`` for qcow2: ``compat``, ``lazy_refcounts``, ``refcount_bits``,
    ``size`` (grow or shrink), ``backing_file``/``backing_fmt`` (only their current
    values; use rebase to change them), ``data_file`` (renames the external data file in
    the header; the file itself is not touched), ``data_file_raw`` (may be cleared, or
    kept set) and LUKS key slots (``encrypt.state``,
    ``encrypt.new-secret``, ``encrypt.old-secret``, ``encrypt.keyslot``,
    ``encrypt.iter-time``; secrets are ids into ``secrets``, the image is unlocked with
    ``image_options['encrypt.key-secret']``).

    Every option is checked before anything is written (:func:`plan_amend`, then whether
    every refcount fits a narrower ``refcount_bits`` and whether the resize would be
    refused), so a refused amend changes no byte; qemu writes key slots before it checks
    ``lazy_refcounts`` against ``compat``, and upgrades before it finds a refcount too
    large for the new width.  Steps in qemu's order: key slots,
    upgrade, refcount width, lazy refcounts, size, downgrade.  ``device``: the image
    already open read-write (the CLI's), which amend closes.  ``progress`` gets qemu's
    driver progress calls ``(offset, total)`` (see :mod:`.amend_progress`), also those
    qemu makes before it refuses a refcount too large for a narrower width."""
    from diskimg import api
    from diskimg.params import renamed  # fmt= is format='s deprecated spelling

    secrets = dict(secrets or {})
    iopts = dict(image_options or {})
    dev: Any = device if device is not None else api.open(
        path, "r+", renamed("format", format, "fmt", fmt), backing=False,
        untrusted=untrusted, secrets=secrets,
        options=iopts)  # opening r+ also repairs a dirty image
    try:
        if dev.format != "qcow2":
            raise UsageError(f"Format driver '{dev.format}' does not support option "
                             "amendment")
        h = read_header(dev.host)
        plan = plan_amend(h, options)  # every refusal of the options: nothing written yet
        status = AmendStatus((plan.new_version != plan.cur_version)
                             + (plan.refcount_bits != h.refcount_bits)
                             + (plan.keyslots is not None), progress)
        if plan.refcount_bits < h.refcount_bits:  # would a refcount still fit?
            try:
                check_refcount_width(counts_after_rebuild(dev.host, h), plan.refcount_order,
                                     h.cluster_size)
            except UsageError:
                if status.enabled:  # qemu upgrades, then stops in its first walk
                    walks, _write, refused = refcount_walk_calls(dev.host, h,
                                                                 plan.refcount_order)
                    if plan.upgrade:
                        status.replay("upgrade", UPGRADE_CALLS[0] + UPGRADE_CALLS[1])
                    if refused:
                        status.replay("refcount", walks)
                raise
        check_resize(h, plan, nb_bitmaps(h))
        if nb_bitmaps(h) and plan.size is not None and plan.size != h.size:
            dev.bitmaps.check_resize()  # qemu: an inconsistent bitmap refuses a resize
        if plan.keyslots is not None:
            amend_keyslots(dev, plan.keyslots, secrets, force=force)
        clear_unknown_autoclear(dev.host, h)  # after every refusal
        if plan.upgrade and dev.snapshots.upgrade_for_v3():
            h = read_header(dev.host)  # the table moved: the steps below use ``h``
    finally:
        dev.close()
    _apply(path, h, plan, secrets, iopts, untrusted, status)


def _apply(path: Any, h: Header, plan: AmendPlan, secrets: dict[str, bytes],
           iopts: dict[str, str], untrusted: bool, status: AmendStatus) -> None:
    """The header steps of ``plan`` after the key slots, in qemu's order, on the closed
    image (``h`` its header now)."""
    from diskimg import api
    from diskimg.hostio import open_host_file

    host = open_host_file(path, True)
    try:
        if plan.upgrade:
            status.replay("upgrade", UPGRADE_CALLS[0])
            upgrade_to_v3(host, h)
            status.replay("upgrade", UPGRADE_CALLS[1])
        if plan.refcount_bits != h.refcount_bits:
            walks, write = refcount_walk_calls(host, h, plan.refcount_order)[:2] \
                if status.enabled else ([], [])
            status.replay("refcount", walks)
            rebuild_refcounts(host, h, plan.refcount_order)
            status.replay("refcount", write)
        if plan.lazy_refcounts is not None and plan.lazy_refcounts != bool(
                h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS):
            set_lazy_refcounts(host, h, plan.lazy_refcounts)
    finally:
        host.close()
    if plan.size is not None:
        with api.open(path, "r+", "qcow2", backing=False, untrusted=untrusted,
                      secrets=secrets, options=iopts) as dev:
            if plan.size != dev.size:
                dev.resize(plan.size, shrink=True)
    if plan.data_file is not None or plan.data_file_raw is not None:
        # after the resize, which opens the image by the data file name it has now
        host = open_host_file(path, True)
        try:
            now = read_header(host)
            new = data_file_header(now, plan)
            if new.pack() != now.pack():
                write_header(host, new)
        finally:
            host.close()
    if plan.downgrade:
        host = open_host_file(path, True)
        try:
            now = read_header(host)
            calls = downgrade_calls(host, now) if status.enabled else []
            downgrade_to_v2(host, now)
            status.replay("downgrade", calls)
        finally:
            host.close()
    host = open_host_file(path, True)
    try:  # qemu's amend ends with a whole-header rewrite: its own feature-name table
        refresh_feature_table(host, read_header(host))
    finally:
        host.close()
