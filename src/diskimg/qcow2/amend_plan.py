"""``qemu-img amend`` for qcow2, before any byte is written: the option names and value
syntax qemu accepts (:func:`validate_amend_options`), and :func:`plan_amend`, which
checks every option against the image's header and returns an :class:`AmendPlan` of
what will change.  Every refusal amend makes on its own options happens here, so a
refused amend leaves the image byte-identical.

Pure logic: nothing here reads or writes a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diskimg import progname
from diskimg.crypto.luks import KeySlotAmend
from diskimg.errors import FormatError, UnsupportedFeatureError, UsageError
from diskimg.hostio.names import raw_c_name
from diskimg.options import compat_version, parse_bool, parse_param_size
from diskimg.qcow2.amend_compat import LAZY_NEEDS_V3, check_downgradable
from diskimg.qcow2.layout import (
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW_CRYPT_LUKS,
    Header,
)
from diskimg.qcow2.refcount import refcount_order_of

__all__ = [
    "AMENDABLE",
    "AMEND_HELP",
    "AmendPlan",
    "check_encryption_amendable",
    "check_resize",
    "data_file_header",
    "keyslot_request",
    "plan_amend",
    "qemu_number",
    "validate_amend_options",
]

#: qcow2 options ``amend`` accepts (qemu-img 7.2's amend option list)
AMENDABLE = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
             "encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret",
             "encrypt.old-secret", "encrypt.state", "lazy_refcounts", "refcount_bits", "size")

AMEND_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""

_ENCRYPT = "encrypt."
_INT_OPTIONS = ("encrypt.keyslot", "encrypt.iter-time")


def qemu_number(name: str, text: str) -> int:
    """A ``num`` option value as qemu's ``qemu_strtou64`` reads it (decimal, ``0x`` hex,
    leading-``0`` octal; a ``-`` wraps modulo 2^64), with qemu's messages."""
    t = text.strip()
    neg = t.startswith("-")
    body = t[1:] if neg or t.startswith("+") else t
    try:
        if body[:2].lower() == "0x":
            v = int(body[2:], 16)
        elif len(body) > 1 and body[0] == "0":
            v = int(body[1:], 8)
        else:
            if not body.isdigit():
                raise ValueError(body)
            v = int(body, 10)
    except ValueError:
        raise UsageError(f"Parameter '{name}' expects a number") from None
    if v > 0xFFFFFFFFFFFFFFFF:
        raise UsageError(f"Value '{text}' is too large for parameter '{name}'")
    return (-v) & 0xFFFFFFFFFFFFFFFF if neg else v


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def validate_amend_options(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Names and value syntax as qemu-img amend checks them (create-only options get the
    "only supported for image creation" hint)."""
    from diskimg.options import schema, validate

    create_names = {d.name for d in schema("qcow2")}
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in AMENDABLE:
            if k in create_names:
                raise UsageError(f"Invalid parameter '{k}'\n"
                                 "This option is only supported for image creation")
            raise UsageError(f"Invalid parameter '{k}'")
        if k in _INT_OPTIONS:
            out[k] = str(_int64(qemu_number(k, v)))
            continue
        if k.startswith(_ENCRYPT):
            out[k] = v
            continue
        out.update(validate("qcow2", [(k, v)]))
    return out


def check_encryption_amendable(h: Header) -> None:
    """qemu's refusals for ``encrypt.*`` amend options on this image."""
    if not h.crypt_method:
        raise UsageError("Can't amend encryption options - encryption not present")
    if h.crypt_method != QCOW_CRYPT_LUKS:
        raise UnsupportedFeatureError("Only LUKS encryption options can be amended")


def _option_int(options: Mapping[str, str], name: str, base: int = 10) -> int | None:
    v = options.get(name)
    if v is None:
        return None
    try:
        return int(v, base)
    except ValueError:
        raise UsageError(f"Parameter '{name}' expects a number") from None


def keyslot_request(options: Mapping[str, str]) -> KeySlotAmend:
    """The ``encrypt.*`` entries of validated amend options as a :class:`KeySlotAmend`."""
    return KeySlotAmend(state=options.get("encrypt.state"),
                        new_secret=options.get("encrypt.new-secret"),
                        old_secret=options.get("encrypt.old-secret"),
                        keyslot=_option_int(options, "encrypt.keyslot"),
                        iter_time=_option_int(options, "encrypt.iter-time"))


@dataclass(frozen=True)
class AmendPlan:
    """What one ``amend`` will change, validated against the header before any write.

    Steps run in qemu's order: key slots, upgrade, refcount width, lazy refcounts, size,
    downgrade."""

    #: the header version now and after the amend (2 or 3)
    cur_version: int
    new_version: int
    #: the refcount width after the amend (bits; the current one when unchanged)
    refcount_bits: int
    #: set (True) or clear (False) the lazy-refcounts bit; None leaves it
    lazy_refcounts: bool | None = None
    #: the new virtual size; None leaves it
    size: int | None = None
    #: the key slot change of the ``encrypt.*`` options; None without them
    keyslots: KeySlotAmend | None = None
    #: the new external data file name ("" removes the name, as qemu does); None leaves it
    data_file: str | None = None
    #: set (True) or clear (False) the autoclear ``data_file_raw`` bit; None leaves it
    data_file_raw: bool | None = None

    @property
    def upgrade(self) -> bool:
        return self.new_version > self.cur_version

    @property
    def downgrade(self) -> bool:
        return self.new_version < self.cur_version

    @property
    def refcount_order(self) -> int:
        return self.refcount_bits.bit_length() - 1


def plan_amend(h: Header, options: Mapping[str, str]) -> AmendPlan:
    """Every refusal qemu-img amend makes for ``options`` (validated by
    :func:`validate_amend_options`) on an image with header ``h``, made before any write;
    returns what the amend will change.  The key slot request itself is checked against
    the LUKS header later, by :func:`~diskimg.crypto.luks.plan_keyslot_amend`, also
    before anything is written."""
    cur_version = new_version = h.version
    compat = options.get("compat")
    if compat is not None:
        version = compat_version(compat)
        if version is None:
            raise UsageError(f"Unknown compatibility level {compat}")
        new_version = version
    data_file = options.get("data_file")
    if data_file is not None and not h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
        raise UsageError("data-file can only be set for images that use an external "
                         "data file")
    raw = options.get("data_file_raw")
    data_file_raw = None if raw is None else parse_bool("data_file_raw", raw)
    if data_file_raw and not h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        raise UsageError("data-file-raw cannot be set on existing images")  # only kept
    encrypt = any(k.startswith(_ENCRYPT) for k in options)
    if encrypt:
        check_encryption_amendable(h)
    bf = options.get("backing_file")
    bfmt = options.get("backing_fmt")
    if ("backing_file" in options or "backing_fmt" in options) and (
            bf != h.backing_file or bfmt != h.backing_format):
        raise UsageError("Cannot amend the backing file\n"
                         f"You can use '{progname.name()} rebase' instead.")
    new_bits = h.refcount_bits
    bits = _option_int(options, "refcount_bits", 0)
    if bits is not None:
        refcount_order_of(bits)
        new_bits = bits
    if new_version < 3 and new_bits != 16:
        if bits is None:  # qemu's message when only the downgrade asks for it
            raise UsageError("compat=0.10 requires refcount_bits=16")
        raise UsageError("Refcount widths other than 16 bits require compatibility level "
                         "1.1 or above (use compat=1.1 or greater)")
    lazy = options.get("lazy_refcounts")
    lazy_on = None if lazy is None else parse_bool("lazy_refcounts", lazy)
    if lazy_on and new_version < 3:
        raise UsageError(LAZY_NEEDS_V3)
    size = options.get("size")
    plan = AmendPlan(cur_version, new_version, new_bits, lazy_on,
                     None if size is None else parse_param_size("size", size),
                     keyslot_request(options) if encrypt else None, data_file, data_file_raw)
    if data_file is not None or data_file_raw is not None:
        # the new name must fit in the header cluster; one that is not text is refused
        # by name (raw_name's UsageError passes through)
        try:
            data_file_header(h, plan).pack()
        except FormatError:
            raise UsageError("Failed to update the image header: No space left on device") \
                from None
    if plan.downgrade:
        after = h.copy()
        after.refcount_order = plan.refcount_order  # the width it will have
        check_downgradable(after)
    return plan


def data_file_header(h: Header, plan: AmendPlan) -> Header:
    """``h`` with the data file name and ``data_file_raw`` bit of ``plan`` (qemu rewrites
    the header with its new ``image_data_file``: an empty name drops the extension, the
    incompatible ``data_file`` bit stays)."""
    new = h.copy()
    if plan.data_file is not None:
        new.set_ext(QCOW2_EXT_MAGIC_DATA_FILE,
                    raw_c_name(plan.data_file, "Data file name") or None)
    if plan.data_file_raw is not None:
        if plan.data_file_raw:
            new.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
        else:
            new.autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
    return new


def check_resize(h: Header, plan: AmendPlan, nb_bitmaps: int) -> None:
    """The refusals of the image's ``resize`` that the header already decides, made before
    the steps that precede the resize write anything: a size not a multiple of 512, a
    version 2 image with snapshots (at the version the image has when the resize runs:
    after an upgrade, before a downgrade).  Same wording as :meth:`Qcow2Image.resize`,
    which resizes persistent bitmaps too (``nb_bitmaps``: the caller then asks the open
    image's ``bitmaps.check_resize()`` whether they can be resized)."""
    if plan.size is None or plan.size == h.size:
        return
    from diskimg.qcow2.resize import check_header

    check_header(plan.size, max(plan.cur_version, plan.new_version), h.nb_snapshots)

