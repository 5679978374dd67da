"""libvirt storage XML: ``<pool type='dir'>`` and ``<volume type='file'>`` read and write.

Parsing uses :mod:`xml.etree.ElementTree` behind a guard against hostile input: any
``<!DOCTYPE`` or ``<!ENTITY`` declaration is refused before expat sees the text (so no entity
is ever expanded, whatever the expat version), and parse errors become :class:`PoolError`.

Writing mirrors what libvirt 9 prints (``virsh pool-dumpxml`` / ``vol-dumpxml``): two-space
indentation, single-quoted attributes, sizes as ``unit='bytes'`` (``clusterSize`` as
``unit='B'`` like libvirt), an empty ``<source>`` printed open/close.  Elements this module
does not know are kept and written back (after the known ones of the same parent), so a
definition libvirt wrote survives a round trip through diskimg.

Sizes are libvirt's scaled integers (:mod:`diskimg.pool.scale`, re-exported here).
"""

from __future__ import annotations

import copy
import os
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from diskimg.errors import PoolError
from diskimg.pool.paths import validate_pool_name, validate_volume_name
from diskimg.pool.scale import parse_scaled, scale_integer, unit_scale

_HOSTILE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_NUM = re.compile(r"^\s*\+?([0-9]+)$")

#: The XML that libvirt puts at the top of the definitions it saves.
CONFIG_WARNING = (
    "<!--\n"
    "WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n"
    "OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n"
    "  virsh pool-edit {name}\n"
    "or other application using the libvirt API.\n"
    "-->\n\n"
)


def _sized(elem: ET.Element | None, what: str) -> int | None:
    """Value of ``<capacity unit='..'>N</capacity>``-like elements; None when absent."""
    if elem is None:
        return None
    text = (elem.text or "").strip()
    m = _NUM.match(text)
    if not m:
        raise PoolError(f"XML error: malformed {what} element")
    try:
        return scale_integer(int(m.group(1)), elem.get("unit"))
    except PoolError as e:  # name the element: "unknown suffix 'X' in <capacity>"
        raise PoolError(f"{e} in <{elem.tag}>") from None


# --- safe parsing and libvirt-style formatting ----------------------------------------------

#: byte order marks → codec (UTF-32 first: its little-endian BOM starts like UTF-16's)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (b"\xef\xbb\xbf", "utf-8-sig"))


def parse_xml(text: str | bytes, what: str = "XML") -> tuple[ET.Element, dict[str, str]]:
    """Parse untrusted XML text; returns the root element and its namespace prefixes.

    Refuses DTDs and entity declarations (billion laughs, external entities) before
    parsing; every failure is a :class:`PoolError`.
    """
    if isinstance(text, bytes):
        # decode first, so the DOCTYPE check below also sees UTF-16/32 documents
        codec = next((c for bom, c in _BOMS if text.startswith(bom)), "utf-8")
        try:
            text = text.decode(codec)
        except UnicodeDecodeError as err:
            raise PoolError(f"XML error: {what} is not valid {codec.upper()} (byte "
                            f"{err.start}: {err.reason})") from None
    else:  # a Python caller's text: one holding a lone surrogate is no document's
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PoolError(f"XML error: {what} holds a lone surrogate at character "
                            f"{err.start} (text that no decoding of bytes gives)") from None
    if "\x00" in text:  # never valid XML; also what UTF-16/32 without a BOM look like
        raise PoolError(f"XML error: {what} contains NUL characters (UTF-16 or UTF-32 "
                        "without a byte order mark?)")
    probe = text
    if _HOSTILE.search(probe):
        raise PoolError(f"XML error: {what} contains a DOCTYPE or ENTITY declaration; "
                        "refusing to parse it")
    nsmap: dict[str, str] = {}
    parser: Any = ET.XMLPullParser(events=("start-ns",))
    try:
        parser.feed(text)
        parser.close()
        for _event, ns in parser.read_events():
            prefix, uri = ns
            nsmap.setdefault(uri, prefix)
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise PoolError(f"XML error: {what} is not well-formed: {err}") from None
    except (ValueError, UnicodeError) as err:
        raise PoolError(f"XML error: {what} cannot be parsed: {err}") from None
    return root, nsmap


def _qname(tag: str, nsmap: dict[str, str]) -> str:
    if tag.startswith("{"):
        uri, local = tag[1:].split("}", 1)
        prefix = nsmap.get(uri)
        if prefix is None:
            prefix = f"ns{len(nsmap)}"
            nsmap[uri] = prefix
        return f"{prefix}:{local}" if prefix else local
    return tag


def _attr_escape(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace("\n", "&#10;"))


def _text_escape(value: str) -> str:
    """libvirt's virBufferEscapeString: quotes are escaped in text too."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


#: Elements libvirt prints as an open/close pair even when empty.
_NEVER_SELF_CLOSED = {"source", "encryption"}


def format_element(elem: ET.Element, nsmap: dict[str, str] | None = None, indent: int = 0,
                   root_ns: bool = True) -> str:
    """Serialize ``elem`` like libvirt's virBuffer XML writers (2-space indent, ' quotes)."""
    ns = dict(nsmap or {})
    lines: list[str] = []
    _format_into(elem, ns, indent, lines, declare_ns=root_ns)
    return "".join(lines)


def _format_into(elem: ET.Element, ns: dict[str, str], indent: int, out: list[str],
                 declare_ns: bool = False) -> None:
    pad = "  " * indent
    name = _qname(elem.tag, ns)
    attrs = "".join(f" {_qname(k, ns)}='{_attr_escape(v)}'" for k, v in elem.attrib.items())
    if declare_ns:
        decl = "".join(f" xmlns:{p}='{_attr_escape(u)}'" if p else f" xmlns='{_attr_escape(u)}'"
                       for u, p in ns.items())
        attrs += decl
    text = elem.text if elem.text is not None and elem.text.strip() else None
    children = list(elem)
    if not children:
        if text is not None:
            out.append(f"{pad}<{name}{attrs}>{_text_escape(text)}</{name}>\n")
        elif name in _NEVER_SELF_CLOSED:
            out.append(f"{pad}<{name}{attrs}>\n{pad}</{name}>\n")
        else:
            out.append(f"{pad}<{name}{attrs}/>\n")
        return
    out.append(f"{pad}<{name}{attrs}>")
    if text is not None:
        out.append(_text_escape(text))
    out.append("\n")
    for child in children:
        _format_into(child, ns, indent + 1, out)
    out.append(f"{pad}</{name}>\n")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


# --- shared pieces --------------------------------------------------------------------------

@dataclass
class Permissions:
    """``<permissions>``: octal mode, numeric owner/group, optional MAC label."""

    mode: int | None = None
    owner: int | None = None
    group: int | None = None
    label: str | None = None
    extra: list[ET.Element] = field(default_factory=list)

    @classmethod
    def from_element(cls, elem: ET.Element | None) -> Permissions | None:
        """Parse a ``<permissions>`` element (None gives None).  Unknown children are kept
        in ``extra``.  Raises :class:`PoolError` for a mode outside 0..0o7777 or not octal,
        or an owner/group that is not an integer >= -1."""
        if elem is None:
            return None
        p = cls()
        for child in elem:
            t = (child.text or "").strip()
            if child.tag == "mode":
                try:
                    p.mode = int(t, 8)
                except ValueError:
                    raise PoolError(f"XML error: malformed octal mode '{t}'") from None
                if not 0 <= p.mode <= 0o7777:
                    raise PoolError(f"XML error: malformed octal mode '{t}'")
            elif child.tag in ("owner", "group"):
                try:
                    v = int(t)
                except ValueError:
                    raise PoolError(f"XML error: malformed {child.tag} element") from None
                if v < -1:
                    raise PoolError(f"XML error: malformed {child.tag} element")
                setattr(p, child.tag, v)
            elif child.tag == "label":
                p.label = t
            else:
                p.extra.append(child)
        return p

    def to_element(self, parent: ET.Element) -> ET.Element:
        """Append ``<permissions>`` to ``parent`` (mode as 4 octal digits; unset fields
        omitted; ``extra`` copied) and return it."""
        e = _sub(parent, "permissions")
        if self.mode is not None:
            _sub(e, "mode", f"{self.mode:04o}")
        if self.owner is not None:
            _sub(e, "owner", str(self.owner))
        if self.group is not None:
            _sub(e, "group", str(self.group))
        if self.label is not None:
            _sub(e, "label", self.label)
        e.extend(copy.deepcopy(self.extra))
        return e


def format_timestamp(sec: int, nsec: int) -> str:
    """libvirt's timestamp text: seconds, then ``.%09d`` nanoseconds unless they are 0."""
    return f"{sec}.{nsec:09d}" if nsec else str(sec)


@dataclass
class Timestamps:
    """``<timestamps>`` as (seconds, nanoseconds) pairs; btime is 0 as libvirt 9 prints."""

    atime: tuple[int, int]
    mtime: tuple[int, int]
    ctime: tuple[int, int]
    btime: tuple[int, int] | None = (0, 0)

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Timestamps:
        """Atime, mtime and ctime of an ``os.stat_result`` as (seconds, nanoseconds);
        btime stays (0, 0)."""
        def pair(ns: int) -> tuple[int, int]:
            return divmod(ns, 1_000_000_000)

        return cls(pair(st.st_atime_ns), pair(st.st_mtime_ns), pair(st.st_ctime_ns))

    def to_element(self, parent: ET.Element) -> ET.Element:
        """Append ``<timestamps>`` to ``parent`` in libvirt's order (atime, mtime, ctime,
        btime unless None), each as :func:`format_timestamp` text, and return it."""
        e = _sub(parent, "timestamps")
        for name, v in (("atime", self.atime), ("mtime", self.mtime), ("ctime", self.ctime),
                        ("btime", self.btime)):
            if v is not None:
                _sub(e, name, format_timestamp(*v))
        return e


def _check_uuid(text: str) -> str:
    t = text.strip()
    try:
        return str(uuidlib.UUID(t))
    except ValueError:
        raise PoolError(f"XML error: malformed uuid element '{t}'") from None


def _text(parent: ET.Element, tag: str) -> str | None:
    """Stripped text of ``parent``'s child ``tag``; None when the child is absent."""
    e = parent.find(tag)
    return None if e is None else (e.text or "").strip()


def _parse_root(text: str | bytes, tag: str) -> tuple[ET.Element, dict[str, str], str]:
    """Parse a ``<pool>``/``<volume>`` document: (root, namespace prefixes, its name).
    Raises :class:`PoolError` for another root element or a missing name."""
    root, nsmap = parse_xml(text, f"{tag} XML")
    if root.tag != tag:
        raise PoolError(f"XML error: unexpected root element <{root.tag}>, expecting <{tag}>")
    name = _text(root, "name")
    if not name:
        # libvirt's own wording for each document
        raise PoolError("XML error: missing pool source name element" if tag == "pool"
                        else "XML error: missing volume name element")
    return root, nsmap, name


# --- pools ----------------------------------------------------------------------------------

_POOL_KNOWN = {"name", "uuid", "capacity", "allocation", "available", "source", "target"}
_POOL_TARGET_KNOWN = {"path", "permissions"}


@dataclass
class PoolDef:
    """A ``<pool>`` definition.  ``type`` is kept as read; diskimg operates on ``dir`` pools."""

    name: str
    target_path: str | None
    type: str = "dir"
    uuid: str | None = None
    permissions: Permissions | None = None
    source: ET.Element | None = None
    capacity: int = 0
    allocation: int = 0
    available: int = 0
    attrib: dict[str, str] = field(default_factory=dict)
    extra: list[ET.Element] = field(default_factory=list)
    target_extra: list[ET.Element] = field(default_factory=list)
    nsmap: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_xml(cls, text: str | bytes) -> PoolDef:
        """Parse libvirt pool XML (what ``virsh pool-dumpxml`` or /etc/libvirt/storage holds)."""
        root, nsmap, name = _parse_root(text, "pool")
        ptype = root.get("type")
        if not ptype:
            raise PoolError("XML error: storage pool missing type attribute")
        validate_pool_name(name)
        uu = _text(root, "uuid")
        uu = _check_uuid(uu) if uu is not None else None
        target = root.find("target")
        path = None
        perms = None
        target_extra: list[ET.Element] = []
        if target is not None:
            path = _text(target, "path") or None
            perms = Permissions.from_element(target.find("permissions"))
            target_extra = [c for c in target if c.tag not in _POOL_TARGET_KNOWN]
        if ptype in ("dir", "fs", "netfs") and not path:
            raise PoolError("XML error: missing storage pool target path")
        attrib = {k: v for k, v in root.attrib.items() if k != "type"}
        return cls(
            name=name, target_path=path, type=ptype, uuid=uu, permissions=perms,
            source=root.find("source"),
            **{tag: _sized(root.find(tag), tag) or 0
               for tag in ("capacity", "allocation", "available")},
            attrib=attrib,
            extra=[c for c in root if c.tag not in _POOL_KNOWN],
            target_extra=target_extra, nsmap=nsmap,
        )

    def to_element(self, *, capacity: int | None = None, allocation: int | None = None,
                   available: int | None = None,
                   permissions: Permissions | None = None) -> ET.Element:
        """The ``<pool>`` element in libvirt's order; sizes in bytes (0 when None),
        ``permissions`` overrides the stored ones; unknown elements read are kept."""
        root = ET.Element("pool", {"type": self.type, **self.attrib})
        _sub(root, "name", self.name)
        if self.uuid is not None:
            _sub(root, "uuid", self.uuid)
        for tag, v in (("capacity", capacity), ("allocation", allocation),
                       ("available", available)):
            _sub(root, tag, str(v if v is not None else 0), unit="bytes")
        if self.source is not None:
            root.append(copy.deepcopy(self.source))
        else:
            _sub(root, "source")
        if self.target_path is not None or self.target_extra or self.permissions:
            target = _sub(root, "target")
            if self.target_path is not None:
                _sub(target, "path", self.target_path)
            perms = permissions if permissions is not None else self.permissions
            if perms is not None:
                perms.to_element(target)
            target.extend(copy.deepcopy(self.target_extra))
        root.extend(copy.deepcopy(self.extra))
        return root

    def to_xml(self, *, capacity: int | None = None, allocation: int | None = None,
               available: int | None = None, permissions: Permissions | None = None) -> str:
        """libvirt-style XML; sizes default to 0 (what libvirt stores for a definition)."""
        return format_element(self.to_element(capacity=capacity, allocation=allocation,
                                              available=available, permissions=permissions),
                              self.nsmap)


# --- volumes --------------------------------------------------------------------------------

_VOL_KNOWN = {"name", "key", "capacity", "allocation", "physical", "target", "backingStore",
              "source"}
_VOL_TARGET_KNOWN = {"path", "format", "permissions", "timestamps", "encryption", "compat",
                     "clusterSize", "features", "nocow"}


@dataclass
class Encryption:
    """``<encryption format='luks'>`` with its ``<secret type='passphrase' uuid=.../>``."""

    format: str = "luks"
    secret_uuid: str | None = None
    secret_usage: str | None = None
    element: ET.Element | None = None  # as read, for a faithful round trip

    @classmethod
    def from_element(cls, elem: ET.Element | None) -> Encryption | None:
        """Parse ``<encryption>`` (None gives None; no format attribute means
        ``default``), keeping the element for a faithful round trip.  Raises
        :class:`PoolError` for a malformed secret UUID."""
        if elem is None:
            return None
        fmt = elem.get("format") or "default"
        sec = elem.find("secret")
        uu = sec.get("uuid") if sec is not None else None
        usage = sec.get("usage") if sec is not None else None
        return cls(fmt, _check_uuid(uu) if uu else None, usage, elem)

    def to_element(self, parent: ET.Element) -> ET.Element:
        """Append ``<encryption>`` to ``parent`` (the element as read, if any, else one
        built from the fields) and return it."""
        if self.element is not None:
            e = copy.deepcopy(self.element)
            parent.append(e)
            return e
        e = _sub(parent, "encryption", format=self.format)
        if self.secret_uuid:
            _sub(e, "secret", type="passphrase", uuid=self.secret_uuid)
        elif self.secret_usage:
            _sub(e, "secret", type="passphrase", usage=self.secret_usage)
        return e


def _append_parts(parent: ET.Element,
                  *parts: Permissions | Timestamps | Encryption | None) -> None:
    """Append each part that is set, in the order given (libvirt's element order)."""
    for part in parts:
        if part is not None:
            part.to_element(parent)


@dataclass
class BackingStore:
    """``<backingStore>`` of a volume: the backing file's path, format and, when it
    exists, its permissions and timestamps."""

    path: str
    format: str | None = None
    permissions: Permissions | None = None
    timestamps: Timestamps | None = None


@dataclass
class VolumeDef:
    """A ``<volume>`` document: what ``vol-create`` reads and ``vol-dumpxml`` prints."""

    name: str
    capacity: int | None = None
    allocation: int | None = None
    physical: int | None = None
    type: str | None = None
    key: str | None = None
    path: str | None = None
    format: str | None = None
    permissions: Permissions | None = None
    timestamps: Timestamps | None = None
    encryption: Encryption | None = None
    compat: str | None = None
    cluster_size: int | None = None
    features: list[str] | None = None
    backing: BackingStore | None = None
    extra: list[ET.Element] = field(default_factory=list)
    target_extra: list[ET.Element] = field(default_factory=list)
    nsmap: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_xml(cls, text: str | bytes) -> VolumeDef:
        """Parse libvirt volume XML, e.g. the input of ``virsh vol-create``."""
        root, nsmap, name = _parse_root(text, "volume")
        validate_volume_name(name)
        v = cls(name=name, type=root.get("type"), nsmap=nsmap, key=_text(root, "key"))
        v.capacity = _sized(root.find("capacity"), "capacity")
        v.allocation = _sized(root.find("allocation"), "allocation")
        v.physical = _sized(root.find("physical"), "physical")
        target = root.find("target")
        if target is not None:
            v.path = _text(target, "path")
            f = target.find("format")
            if f is not None:
                v.format = f.get("type")
            v.permissions = Permissions.from_element(target.find("permissions"))
            v.encryption = Encryption.from_element(target.find("encryption"))
            v.compat = _text(target, "compat")
            if v.compat is not None and not re.fullmatch(r"[0-9]+\.[0-9]+", v.compat):
                raise PoolError(f"XML error: forbidden characters in 'compat' attribute: "
                                f"'{v.compat}'")
            v.cluster_size = _sized(target.find("clusterSize"), "clusterSize")
            feats = target.find("features")
            if feats is not None:
                v.features = []
                for child in feats:
                    if child.tag != "lazy_refcounts":
                        raise PoolError(f"XML error: unsupported feature {child.tag}")
                    v.features.append(child.tag)
            v.target_extra = [c for c in target if c.tag not in _VOL_TARGET_KNOWN]
        bs = root.find("backingStore")
        if bs is not None:
            bpath = _text(bs, "path")
            if not bpath:
                raise PoolError("XML error: missing backing store path element")
            bf = bs.find("format")
            v.backing = BackingStore(bpath,
                                     bf.get("type") if bf is not None else None,
                                     Permissions.from_element(bs.find("permissions")))
        v.extra = [c for c in root if c.tag not in _VOL_KNOWN]
        return v

    def to_element(self) -> ET.Element:
        """The ``<volume>`` element in libvirt's order; sizes in bytes, unset fields
        omitted, unknown elements read are kept."""
        attrs = {"type": self.type} if self.type else {}
        root = ET.Element("volume", attrs)
        _sub(root, "name", self.name)
        if self.key is not None:
            _sub(root, "key", self.key)
        for tag, v in (("capacity", self.capacity), ("allocation", self.allocation),
                       ("physical", self.physical)):
            if v is not None:
                _sub(root, tag, str(v), unit="bytes")
        target = _sub(root, "target")
        if self.path is not None:
            _sub(target, "path", self.path)
        if self.format is not None:
            _sub(target, "format", type=self.format)
        _append_parts(target, self.permissions, self.timestamps, self.encryption)
        if self.compat is not None:
            _sub(target, "compat", self.compat)
        if self.cluster_size is not None:
            _sub(target, "clusterSize", str(self.cluster_size), unit="B")
        if self.features is not None:
            fe = _sub(target, "features")
            for name in self.features:
                _sub(fe, name)
        target.extend(copy.deepcopy(self.target_extra))
        if self.backing is not None:
            b = _sub(root, "backingStore")
            _sub(b, "path", self.backing.path)
            if self.backing.format:
                _sub(b, "format", type=self.backing.format)
            _append_parts(b, self.backing.permissions, self.backing.timestamps)
        root.extend(copy.deepcopy(self.extra))
        return root

    def to_xml(self) -> str:
        """The volume XML as ``virsh vol-dumpxml`` formats it (two-space indent)."""
        return format_element(self.to_element(), self.nsmap)


__all__ = [
    "CONFIG_WARNING",
    "BackingStore",
    "Encryption",
    "Permissions",
    "PoolDef",
    "Timestamps",
    "VolumeDef",
    "format_element",
    "format_timestamp",
    "parse_scaled",
    "parse_xml",
    "scale_integer",
    "unit_scale",
    "validate_pool_name",
    "validate_volume_name",
]
