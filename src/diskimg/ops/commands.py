"""Module-level functions for the qemu-img commands that do not copy data: ``info``,
``check``, ``map``, ``measure``, ``amend``, ``snapshot`` and ``resize`` (the copying ones
are :mod:`.convert`, :mod:`.compare`, :mod:`.dd` and :mod:`.chain`).  Each opens the image
by path (``format`` None probes), does what the CLI command does and closes it; results
are the library's objects (``str()`` of :class:`~diskimg.ImageInfo` is qemu-img's text).
Arguments are checked first (:mod:`diskimg.params`): a refusal changes nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from diskimg import api
from diskimg.check_report import CheckReport
from diskimg.device import BlockDevice, ImageInfo, MapEntry
from diskimg.errors import DiskImgError, UnsupportedFeatureError, UsageError
from diskimg.params import check_int

PathLike = str | os.PathLike[str]


def _kw(force_share: bool = False, untrusted: bool = False,
        secrets: Mapping[str, bytes] | None = None,
        options: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"force_share": force_share, "untrusted": untrusted,
            "secrets": dict(secrets or {}), "options": dict(options or {})}


def info(path: PathLike, *, format: str | None = None,  # noqa: A002
         backing_chain: bool = False, force_share: bool = False, untrusted: bool = False,
         secrets: Mapping[str, bytes] | None = None,
         options: Mapping[str, str] | None = None) -> ImageInfo | list[ImageInfo]:
    """``qemu-img info``: the image's :class:`ImageInfo` (``str()`` is qemu-img's text),
    or with ``backing_chain`` one per image of the chain, top first."""
    with api.open(path, "r", format, backing=backing_chain,
                  **_kw(force_share, untrusted, secrets, options)) as dev:
        if backing_chain:
            return [d.info() for d in dev.chain()]
        return dev.info()


def check(path: PathLike, *, format: str | None = None,  # noqa: A002
          repair: str | None = None, force_share: bool = False, untrusted: bool = False,
          secrets: Mapping[str, bytes] | None = None,
          options: Mapping[str, str] | None = None) -> CheckReport:
    """``qemu-img check`` (``repair``: None, ``"leaks"`` or ``"all"``): the format's check
    result (``to_json()`` is ``check --output=json``'s object, ``summary_lines()`` its
    text).  A format without a checker (raw; vmdk with ``repair``) raises
    :class:`UnsupportedFeatureError`."""
    if repair not in (None, "leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    with api.open(path, "r+" if repair else "r", format, for_check=True,
                  **_kw(force_share, untrusted, secrets, options)) as dev:
        if repair is not None and not dev.supports_check_repair:
            raise UnsupportedFeatureError("This image format does not support checks")
        return dev.check(repair)


def map(path: PathLike, offset: int = 0, length: int | None = None, *,  # noqa: A001
        format: str | None = None, force_share: bool = False,  # noqa: A002
        untrusted: bool = False, secrets: Mapping[str, bytes] | None = None,
        options: Mapping[str, str] | None = None) -> list[MapEntry]:
    """``qemu-img map`` (``--start-offset``, ``--max-length``): the merged entries."""
    offset = check_int("offset", offset)
    if length is not None:
        length = check_int("length", length)
    with api.open(path, "r", format, **_kw(force_share, untrusted, secrets, options)) as dev:
        end = dev.size if length is None else min(dev.size, offset + length)
        return list(dev.map(offset, end - offset)) if offset < end else []


def measure(out_format: str = "raw", options: Mapping[str, Any] | None = None, *,
            source: PathLike | None = None, size: int | None = None,
            format: str | None = None, force_share: bool = False,  # noqa: A002
            secrets: Mapping[str, bytes] | None = None) -> Any:
    """``qemu-img measure``: the sizes a new ``out_format`` image needs for ``size`` bytes
    or for the contents of image ``source`` (exactly one of them); ``options`` are the
    target's ``-o`` options.  ``human()`` of the result is qemu-img's text."""
    from diskimg.qcow2.measure import measure as _measure

    if (source is None) == (size is None):
        raise UsageError("Either --size N or one filename must be specified.")
    if size is not None:
        size = check_int("size", size)
        return _measure(out_format, dict(options or {}), None, size=size,
                        has_secret=lambda sid: sid in (secrets or {}))
    assert source is not None
    with api.open(source, "r", format, force_share=force_share,
                  secrets=dict(secrets or {})) as dev:
        return _measure(out_format, dict(options or {}), dev,
                        has_secret=lambda sid: sid in (secrets or {}), bitmap_dev=dev)


def amend(path: PathLike, options: Mapping[str, str], *,
          format: str | None = None, force: bool = False,  # noqa: A002
          secrets: Mapping[str, bytes] | None = None, untrusted: bool = False,
          image_options: Mapping[str, str] | None = None) -> None:
    """``qemu-img amend -o``: change qcow2 ``options`` (``compat``, ``lazy_refcounts``,
    ``refcount_bits``, ``size``, LUKS key slots ...) in place, or the key slots of a luks
    image (``state``, ``new-secret``, ``old-secret``, ``keyslot``, ``iter-time``; unlocked
    with ``image_options['key-secret']``); every option is checked before anything is
    written."""
    from diskimg.luks import LuksImage, keyslot_request
    from diskimg.qcow2 import amend as am

    with api.open(path, "r+", format, untrusted=untrusted, secrets=dict(secrets or {}),
                  options=dict(image_options or {})) as dev:
        if isinstance(dev, LuksImage):  # key slots, options named as qemu's luks driver
            dev.amend_keyslots(keyslot_request(options), force=force)
            return
        if dev.format != "qcow2":
            raise UnsupportedFeatureError(
                f"Format driver '{dev.format}' does not support option amendment")
        values = am.validate_amend_options(list(options.items()))
        am.amend(path, values, format="qcow2", force=force, secrets=dict(secrets or {}),
                 untrusted=untrusted, image_options=dict(image_options or {}), device=dev)


def snapshot(path: PathLike, action: str = "list", name: str | None = None, *,
             format: str | None = None, force_share: bool = False,  # noqa: A002
             untrusted: bool = False) -> list[Any]:
    """``qemu-img snapshot``: ``action`` is ``list`` (the default; returns the internal
    snapshots), ``create``, ``apply`` (by id, then by name) or ``delete`` (by name) of
    snapshot ``name``; those return the list afterwards."""
    if action not in ("list", "create", "apply", "delete"):
        raise UsageError(f"action must be list, create, apply or delete, not {action!r}")
    if action != "list" and not isinstance(name, str):
        raise UsageError(f"snapshot {action} needs a snapshot name")
    writable = action != "list"
    with api.open(path, "r+" if writable else "r", format, force_share=force_share,
                  untrusted=untrusted) as dev:
        table = dev.snapshots  # declared: None for a format without internal snapshots
        if table is None:
            if action == "list":
                return []
            raise UnsupportedFeatureError(
                f"Block format '{dev.format}' does not support internal snapshots")
        if action == "create":
            table.create(str(name))  # a str: checked above
        elif action == "apply":
            table.check_revertible()
            found = [s for s in table.list() if s.id == name] or \
                [s for s in table.list() if s.name == name]
            if not found:
                raise DiskImgError(f"Failed to load snapshot '{name}': No such file or "
                                   "directory")
            table.apply(found[0].id)
        elif action == "delete":
            found = [s for s in table.list() if s.name == name]
            if not found:
                raise DiskImgError(f"snapshot '{name}' not found")
            table.delete(found[0].id)
        return list(table.list())


def resize(path: PathLike, size: int, *, format: str | None = None,  # noqa: A002
           shrink: bool = False, preallocation: str | None = None,
           secrets: Mapping[str, bytes] | None = None,
           options: Mapping[str, str] | None = None) -> None:
    """``qemu-img resize``: set the virtual size to ``size`` bytes (a shrink needs
    ``shrink``; qcow2 sizes are multiples of 512)."""
    size = check_int("size", size, minimum=1)
    if preallocation not in (None, "off", "metadata", "falloc", "full"):
        raise UsageError(f"Invalid preallocation mode '{preallocation}'")
    with api.open(path, "r+", format, secrets=dict(secrets or {}),
                  options=dict(options or {})) as dev:
        resize_open(dev, size, shrink=shrink, preallocation=preallocation)


def resize_open(dev: BlockDevice, size: int, *, shrink: bool, preallocation: str | None,
                shrink_error: Exception | None = None) -> None:
    """qemu-img resize's refusals on the open image, in qemu's order and before anything
    is written, then the resize (the library's :func:`resize` and the CLI share it).
    ``shrink_error``: what a shrink without ``shrink`` raises (the CLI words it with
    ``--shrink`` and a warning)."""
    cur = dev.size
    if preallocation == "metadata" and dev.format != "qcow2":
        raise UsageError("Unsupported preallocation mode: metadata")
    if dev.format == "qcow2":
        from diskimg.qcow2.resize import check_size

        check_size(size)
    if size < cur and not shrink:
        raise shrink_error or UsageError("Use the shrink option to perform a shrink "
                                         "operation.")
    if size < cur and preallocation not in (None, "off"):
        raise UsageError("Preallocation can only be used for growing images")
    # BlockDevice.resize is declared: a format without it raises UnsupportedFeatureError
    if dev.format == "raw":
        dev.resize(size, preallocation=preallocation or "off")
    else:
        kw: dict[str, Any] = {"shrink": shrink}
        if preallocation:
            kw["preallocation"] = preallocation
        dev.resize(size, **kw)
