"""The two C-level facts a large read needs about a Python buffer: its address (where it
lies in its page: :func:`diskimg.hostio.file.preadinto`'s page-skew rule) and libc's
``memset`` over it (:func:`diskimg.hostio.file.zero_fill`'s large fills).

Both are made from the ``_ctypes`` extension module alone, as the ctypes package makes
``c_char``, ``c_size_t`` and ``ctypes.memset``: importing the package costs about 3 ms of
CPU, and this module is imported only by the first read large enough to ask (a command
that reads no data, or reads only into whole :func:`~diskimg.hostio.aligned_buffer`
buffers, never loads ``_ctypes``).  Importing it raises ImportError where there is no
``_ctypes``; the callers then fall back (a copy from a zero buffer; no page shift).

Measured against the alternative of reading ``/dev/zero`` (``os.preadv``: the kernel's
clear_user) for the fills, in-process, median of 9 on this VM: 64 KiB 1.8 us both, 1 MiB
13.4 us against 21.7, 4 MiB 45.6 against 83.1 (and a copy from a zero buffer 23.7 and
105.2): memset stays.
"""

from __future__ import annotations

import _ctypes
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Char(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """``ctypes.c_char``: one byte, made over a buffer by ``from_buffer``."""

    _type_ = "c"


class _Size(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """``ctypes.c_size_t``: pointer-sized."""

    _type_ = "Q" if sys.maxsize > 1 << 32 else "I"


class _Memset(_ctypes.CFuncPtr):
    """A C function, called with the cdecl convention; its arguments are passed as the
    ctypes objects given (:func:`memset_zero`): a pointer, an ``int``, a ``size_t``."""

    _flags_ = _ctypes.FUNCFLAG_CDECL


#: libc's ``memset(void *, int, size_t)`` (its result is not used)
memset: Any = _Memset(_ctypes._memset_addr)  # type: ignore[attr-defined]


def address(buf: memoryview) -> int:
    """The address of ``buf``'s first byte (``buf`` writable)."""
    got: int = _ctypes.addressof(_Char.from_buffer(buf))
    return got


def memset_zero(buf: memoryview, n: int) -> None:
    """``memset(buf, 0, n)``: ``buf`` writable, at least ``n`` bytes; TypeError for a
    read-only buffer (the caller copies zeros instead)."""
    memset(_ctypes.byref(_Char.from_buffer(buf)), 0, _Size(n))
