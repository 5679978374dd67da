"""luks: QEMU's standalone ``luks`` format, a LUKS1 volume in a plain file.

The LUKS header and key material sit at offset 0 of the file (:mod:`diskimg.crypto.luks`
parses and builds them, as for a LUKS-encrypted qcow2); the guest bytes follow from the
header's payload offset, encrypted sector by sector with the IV sector counted from the
start of the payload (guest sector), by the loops of :mod:`diskimg.crypto.sectors`.

As in qemu-img 7.2: the virtual size is the file size minus the payload offset, rounded
up to 512; the image opens without its secret for ``info`` (the header needs no key) and
is unlocked with the secret named by the ``key-secret`` image option; a never-written
sector does not read as zeros (it is decrypted zeros), so the format has no zero-init and
``map`` reports the whole disk as data at no host offset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from diskimg.crypto.luks import LUKS_HEADER_SIZE, LuksHeader, luks_info
from diskimg.crypto.luks.header import OFF_PAYLOAD_OFFSET
from diskimg.crypto.sectors import CRYPT_PIECE, encrypt_sectors, read_decrypt
from diskimg.device import BlockDevice, ImageInfo, Status, requires_open
from diskimg.errors import CorruptImageError, MissingSecretError, UsageError
from diskimg.info_text import image_name
from diskimg.plan import Run, RunKind

if TYPE_CHECKING:
    from diskimg.crypto.luks import KeySlotAmend, LuksCipher
    from diskimg.hostio.host import Host

SECTOR = 512
#: the image option naming the secret (qemu's luks driver: no ``encrypt.`` prefix)
KEY_OPTION = "key-secret"
#: the options ``amend -f luks`` takes (qemu-img 7.2)
AMEND_HELP = """Amend options for 'luks':
  iter-time=<num>        - Time to spend in PBKDF in milliseconds
  keyslot=<num>          - Select a single keyslot to modify explicitly
  new-secret=<str>       - New secret to set in the matching keyslots. Empty string to erase
  old-secret=<str>       - Select all keyslots that match this password
  state=<str>            - Select new state of affected keyslots (active/inactive)
"""
_AMENDABLE = ("iter-time", "keyslot", "new-secret", "old-secret", "state")

__all__ = ["AMEND_HELP", "KEY_OPTION", "LuksImage", "create_luks_image", "keyslot_request"]


def read_luks_header(host: Host) -> tuple[LuksHeader, int]:
    """The validated header of the volume in ``host`` and its payload offset in bytes
    (which must lie inside the file)."""
    head = host.pread(0, LUKS_HEADER_SIZE)
    payload = LuksHeader.parse(head).payload_offset * SECTOR
    fsize = host.size()
    if payload > fsize:
        raise CorruptImageError(
            f"LUKS payload offset {payload} (field 'payload-offset' at "
            f"0x{OFF_PAYLOAD_OFFSET:x}) lies past the end of the {fsize}-byte file",
            offset=OFF_PAYLOAD_OFFSET, field="payload-offset")
    header = LuksHeader.parse(head, payload)  # every slot inside the header area
    return header, payload


class LuksImage(BlockDevice):
    """A LUKS1 volume over one :class:`HostFile` (qemu's ``luks`` block driver)."""

    format = "luks"
    encrypted = True

    def __init__(self, host: Host, *, secrets: Mapping[str, bytes] | None = None,
                 options: Mapping[str, str] | None = None, unlock: bool = True) -> None:
        """``unlock``: try the key secret the options name now (qemu's open), not on the
        first data access."""
        self.host = host
        self.filename = str(host.path)
        self.read_only = not host.writable
        self.options = MappingProxyType(dict(options or {}))
        self.secrets = dict(secrets or {})
        self.header, self.payload = read_luks_header(host)
        self._size_from_file()
        self._cipher: LuksCipher | None = None
        if unlock and KEY_OPTION in self.options:
            _ = self.cipher  # like qemu: a wrong passphrase fails the open
        self._mark_open()

    def _size_from_file(self) -> None:
        self.size = -(-(self.host.size() - self.payload) // SECTOR) * SECTOR

    def host_files(self) -> list[Host]:
        """The one file."""
        return [self.host]

    @property
    def cipher(self) -> LuksCipher:
        """The payload cipher, unlocked on first data access with the secret named by the
        ``key-secret`` option."""
        if self._cipher is not None:
            return self._cipher
        key_id = self.options.get(KEY_OPTION)
        if key_id is None:
            raise MissingSecretError("Parameter 'key-secret' is required for cipher")
        secret = self.secrets.get(key_id)
        if secret is None:
            raise MissingSecretError(f"No secret with id '{key_id}'")
        from diskimg.crypto.luks import open_luks

        area = self.host.pread_exact(0, self.payload, "LUKS header and key material")
        self._cipher, _ = open_luks(area, secret)
        return self._cipher

    # --- data ------------------------------------------------------------------------
    def _readinto(self, offset: int, buf: memoryview) -> None:
        read_decrypt(self.host, self.cipher, self.payload + offset, -self.payload, buf)

    def _write(self, offset: int, data: memoryview) -> None:
        g0 = offset & ~(SECTOR - 1)

        def fill(buf: memoryview) -> None:
            self._readinto(g0, buf[: min(len(buf), self.size - g0)])

        pieces = encrypt_sectors(self.cipher, self.payload + offset, data, -self.payload,
                                 fill)
        if len(pieces) == 1:
            self.host.pwrite(*pieces[0])
        else:
            self.host.pwritev(pieces[0][0], [p for _, p in pieces])

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Encrypted zeros (qemu's luks driver has no cheaper way: a hole of the file
        decrypts to noise)."""
        zeros = memoryview(bytes(min(length, 4 * CRYPT_PIECE)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self._write(pos, zeros[:n])
            pos += n

    def _plan(self, offset: int, length: int) -> Run:
        """One DATA run: guest byte ``o`` is stored (encrypted) at ``payload + o``."""
        return Run(offset, length, RunKind.DATA, self.payload + offset,
                   filename=self.filename)

    def _status(self, offset: int, length: int) -> Status:
        """Data, not zero, at no host offset (the bytes are not there verbatim), as qemu's
        luks driver reports every range."""
        return Status(length, allocated=True, data=True, zero=False)

    def _flush(self) -> None:
        self.host.flush()

    def _close(self) -> None:
        if self._cipher is not None:
            self._cipher.wipe()
            self._cipher = None
        self.host.close()

    def has_zero_init(self) -> bool:
        """False: never-written sectors read as decrypted zeros, not zeros (qemu)."""
        return False

    @requires_open
    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Grow or shrink the payload to ``new_size`` bytes (the file is truncated to the
        payload offset plus ``new_size``, as qemu's luks driver does)."""
        self._check_writable()
        _ = self.cipher  # qemu opens it with its key first
        if preallocation not in ("off", "falloc", "full"):
            raise UsageError(f"Unsupported preallocation mode: {preallocation}")
        old = self.host.size()
        new = self.payload + new_size
        self.host.truncate(new)
        if new > old and preallocation == "falloc":
            self.host.preallocate(old, new - old)
        elif new > old and preallocation == "full":
            self.host.write_zeros(old, new - old)
        self._size_from_file()

    @requires_open
    def info(self) -> ImageInfo:
        data = {k: v for k, v in luks_info(self.header).items() if k != "format"}
        return ImageInfo(
            filename=image_name("luks", self.filename, self.options, (KEY_OPTION,)),
            format="luks",
            virtual_size=self.size,
            actual_size=self.host.allocated_size(),
            encrypted=self.encrypted,
            format_specific={"type": "luks", "data": data},
        )

    @requires_open
    def amend_keyslots(self, req: KeySlotAmend, *, force: bool = False) -> LuksHeader:
        """Add or erase key slots (``amend -o state=...``) with the open image's master
        key; returns the new header."""
        from diskimg.crypto.luks.keyslots import amend_area

        self._check_writable()
        self.header = amend_area(self.host, 0, self.payload, self.cipher, req,
                                 self.secrets, force=force)
        return self.header


def keyslot_request(options: Mapping[str, str]) -> KeySlotAmend:
    """``amend -f luks -o ...`` options as a :class:`KeySlotAmend` (qemu's names, without
    qcow2's ``encrypt.`` prefix)."""
    from diskimg.crypto.luks import KeySlotAmend
    from diskimg.qcow2.amend_plan import qemu_number

    for k in options:
        if k not in _AMENDABLE:
            raise UsageError(f"Invalid parameter '{k}'")
    ints = {k: qemu_number(k, options[k]) for k in ("keyslot", "iter-time") if k in options}
    return KeySlotAmend(state=options.get("state"), new_secret=options.get("new-secret"),
                        old_secret=options.get("old-secret"), keyslot=ints.get("keyslot"),
                        iter_time=ints.get("iter-time"))


def create_luks_image(path: str | os.PathLike[str], size: int, options: Mapping[str, Any],
                      secrets: Mapping[str, bytes], *, lock: bool = True) -> None:
    """Create a luks image of ``size`` guest bytes at ``path``, as ``qemu-img create -f
    luks`` does: the header and slot 0's key material written, the rest of the header
    area and the payload left as holes (``preallocation=falloc|full`` allocate the whole
    file).  Every option is checked and the header built before the file is touched.
    ``lock``: as :func:`diskimg.image_create.make_image`'s."""
    from diskimg.crypto.luks import build_luks
    from diskimg.hostio import open_host_file

    opts = dict(options)
    prealloc = str(opts.pop("preallocation", "off"))
    if prealloc not in ("off", "falloc", "full"):
        raise UsageError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    key_id = opts.pop(KEY_OPTION, None)
    for k in opts:
        if k.startswith("encrypt.") or k in ("format", "size"):
            raise UsageError(f"Invalid parameter '{k}'")
    if key_id is None:
        raise UsageError("Parameter 'key-secret' is required for cipher")
    if str(key_id) not in secrets:
        raise UsageError(f"No secret with id '{key_id}'")
    area, cipher, _header = build_luks(secrets[str(key_id)], opts)
    cipher.wipe()
    total = len(area) + size
    host = open_host_file(path, True, create=True, truncate=False, lock_mode=lock)
    try:
        host.empty(reserve=total)  # a size the file system refuses leaves the file as it was
        host.truncate(total)
        if prealloc == "falloc":
            host.preallocate(0, total)
        elif prealloc == "full":
            host.write_zeros(0, total)
        mv = memoryview(area)
        for off in range(0, len(area), 4096):
            piece = mv[off : off + 4096]
            if piece != bytes(len(piece)):
                host.pwrite(off, piece)
        host.flush()
    finally:
        host.close()
