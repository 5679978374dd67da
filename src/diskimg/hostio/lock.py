"""QEMU-compatible image locking with OFD byte-range locks: QEMU's lock bytes, taken and
released by :mod:`diskimg.hostio.file` (with the fd they lock: one module fewer on every
open, start-up), whose names this module re-exports where they have always been."""

from diskimg.hostio.file import (
    _GETLK,
    _SETLK,
    LOCK_BASE_PERM,
    LOCK_BASE_SHARED,
    PERM_CONSISTENT_READ,
    PERM_NAMES,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    READ_ONLY_PERMS,
    READ_WRITE_PERMS,
    _fcntl,
    _flock,
    _held_by_other,
    _unsupported,
    acquire,
    release,
)

__all__ = ["LOCK_BASE_PERM", "LOCK_BASE_SHARED", "PERM_CONSISTENT_READ", "PERM_NAMES",
           "PERM_RESIZE", "PERM_WRITE", "PERM_WRITE_UNCHANGED", "READ_ONLY_PERMS",
           "READ_WRITE_PERMS", "_GETLK", "_SETLK", "_fcntl", "_flock", "_held_by_other",
           "_unsupported", "acquire", "release"]
