"""NbdHost: an NBD export as a :class:`~diskimg.hostio.host.Host`, so that every format
(raw by default; qcow2, vmdk ... over an export that serves an image file's bytes) and
every diskimg command can read, write, zero and map it.

:func:`open_nbd` is the opener :mod:`diskimg.hostio.urls` uses for ``nbd://``,
``nbd+unix://``, ``nbds://`` and ``nbds+unix://`` URLs.

- the host's bytes are the export's; its size is the export's and never changes
  (``truncate`` to another size is refused: NBD cannot resize);
- reads and writes that are not aligned to the export's minimum block size are widened
  (a write then reads the blocks at its ends first);
- ``data_extents`` comes from the ``base:allocation`` metadata context: an extent the
  server marks ``NBD_STATE_ZERO`` is not data (it reads as zeros); a hole without the
  zero flag is data (its contents are undefined, so they are read and copied);
- ``punch_hole`` and ``zero_range`` are ``NBD_CMD_WRITE_ZEROES`` (without and with
  ``NBD_CMD_FLAG_NO_HOLE``), or zeros written when the server takes no WRITE_ZEROES;
- ``flush`` is ``NBD_CMD_FLUSH``; QEMU's lock bytes are the server's to hold.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from diskimg.errors import BackingChainError, UnsupportedFeatureError, UsageError
from diskimg.hostio.objects import ObjectHost
from diskimg.nbd import protocol as P
from diskimg.nbd.client import NbdClient

if TYPE_CHECKING:
    import ssl

    from diskimg.hostio.host import Host
    from diskimg.policy import OpenPolicy

#: the most bytes zeroed by writing zeros when the server takes no WRITE_ZEROES, per write
_ZERO_CHUNK = 1 << 20


class NbdHost(ObjectHost):
    """A host over one NBD export.  Offsets and lengths are in bytes.  As every host
    over one remote object (:class:`~diskimg.hostio.objects.ObjectHost`): its size is
    fixed, it is never a zeroed new file, its identity is its URL."""

    sync = True
    locked = False

    def __init__(self, url: str, *, writable: bool = False,
                 timeout: float | None = None,  # None: the URL's x-timeout, else 30 s
                 contexts: Sequence[str] = (P.BASE_ALLOCATION,),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        from diskimg.nbd.url import display_name, parse

        #: the URL as given (``path``: what reopens it, what backing names join to)
        self.url = url
        address = parse(url)
        #: what messages and ``info``/``map`` name: the URL as qemu spells it
        self.name = display_name(address)
        self.client = NbdClient(address, timeout=timeout, contexts=contexts,
                                ssl_context=ssl_context)
        if writable and self.client.read_only:
            self.client.close()
            raise UsageError(f"Could not open '{url}': the NBD export is read-only",
                             path=url, operation="open", reason="read-only export")
        self.writable = writable
        self._size = self.client.size
        self._closed = False
        #: the preferred block size (what estimates count in)
        self._block = self.client.preferred_block
        self._min = self.client.min_block
        #: the last block status reply (start, extents); forgotten on every write
        self._extents: tuple[int, list[tuple[int, int]]] = (0, [])
        self._cache_lock = threading.Lock()
        self._write_lock = threading.RLock()

    @property
    def path(self) -> str:
        """The URL as given."""
        return self.url

    def allocated_size(self) -> None:
        """None: NBD has no request for the bytes an export stores (``info`` says
        ``disk size: unavailable``, as qemu-img)."""
        self._check_open()
        return None

    # --- reads ------------------------------------------------------------------------
    def _span(self, offset: int, n: int) -> tuple[int, int]:
        """The range [offset, offset+n) widened to the minimum block size (within the
        export: its last block may be short)."""
        m = self._min
        lo = offset - offset % m
        hi = min(-(-(offset + n) // m) * m, self._size)
        return lo, hi

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of the export are zeroed."""
        self._check_open()
        n = len(buf)
        end = self._clip(offset, buf)
        if end <= offset:
            return n
        lo, hi = self._span(offset, end - offset)
        if lo == offset and hi == end:
            self.client.read_into(offset, buf[:end - offset])
        else:
            tmp = bytearray(hi - lo)
            self.client.read_into(lo, memoryview(tmp))
            buf[:end - offset] = tmp[offset - lo:end - lo]
        return n

    # --- writes -----------------------------------------------------------------------
    def _check_write(self, offset: int, n: int) -> None:
        self._check_open()
        if not self.writable:
            raise UsageError(f"'{self.url}' is opened read-only")
        with self._cache_lock:
            self._extents = (0, [])
        if offset < 0 or offset + n > self._size:
            raise UsageError(f"a write of {n} bytes at offset {offset:#x} lies past the end "
                             f"of the NBD export '{self.url}' ({self._size} bytes; an "
                             "export cannot grow)", path=self.url)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (inside the export)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_write(offset, n)
        if not n:
            return
        lo, hi = self._span(offset, n)
        with self._write_lock:  # no write between a read-modify-write's read and write
            if lo == offset and hi == offset + n:
                self.client.write(offset, view)
                return
            # read-modify-write of the blocks at the ends of an unaligned write
            tmp = bytearray(hi - lo)
            m = self._min
            self.client.read_into(lo, memoryview(tmp)[:min(m, hi - lo)])
            if hi - lo > m:
                last = hi - ((hi - lo) % m or m)
                self.client.read_into(last, memoryview(tmp)[last - lo:])
            tmp[offset - lo:offset - lo + n] = view
            self.client.write(lo, tmp)

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write ``parts`` back to back at ``offset``."""
        for p in parts:
            k = len(memoryview(p).cast("B"))
            self.pwrite(offset, p)
            offset += k

    def _zero(self, offset: int, length: int, no_hole: bool) -> None:
        length = min(length, self._size - offset)
        if length <= 0:
            return
        self._check_write(offset, length)
        lo, hi = self._span(offset, length)
        # edges that are not whole blocks are written as zeros (read-modify-write)
        a = offset if offset == lo else min(lo + self._min, offset + length)
        b = offset + length if offset + length == hi else \
            max(a, (offset + length) - (offset + length) % self._min)
        with self._write_lock:
            if a > offset:
                self.pwrite(offset, bytes(a - offset))
            if b > a:
                if self.client.can(P.NBD_FLAG_SEND_WRITE_ZEROES):
                    self.client.write_zeroes(a, b - a, no_hole=no_hole)
                else:
                    for pos in range(a, b, _ZERO_CHUNK):
                        self.client.write(pos, bytes(min(_ZERO_CHUNK, b - pos)))
            if offset + length > b:
                self.pwrite(b, bytes(offset + length - b))

    def punch_hole(self, offset: int, length: int) -> bool:
        """Make the range read as zeros, letting the server deallocate it."""
        self._zero(offset, length, no_hole=False)
        return True

    def zero_range(self, offset: int, length: int, keep_size: bool = True) -> None:
        """Make the range read as zeros, allocated (``NBD_CMD_FLAG_NO_HOLE``)."""
        self._zero(offset, length, no_hole=True)

    def write_zeros(self, offset: int, length: int) -> None:
        """Zeros, allocated (``NBD_CMD_FLAG_NO_HOLE``)."""
        self._zero(offset, length, no_hole=True)

    def preallocate(self, offset: int, length: int) -> None:
        """Nothing to do: the export's space is the server's."""
        if not self.writable:
            raise UsageError(f"'{self.url}' is opened read-only")

    # --- size and allocation ------------------------------------------------------------
    def truncate(self, size: int) -> None:
        """Only to the export's own size: an NBD export cannot be resized."""
        if not self.writable:
            raise UsageError(f"'{self.url}' is opened read-only")
        if size != self._size:
            raise UnsupportedFeatureError(f"Cannot resize the NBD export '{self.url}' "
                                          f"({self._size} bytes) to {size} bytes",
                                          path=self.url)

    def empty(self) -> None:
        """Refused: an export cannot be emptied."""
        raise UnsupportedFeatureError(f"Cannot empty the NBD export '{self.url}'",
                                      path=self.url)

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, is_data) runs: is_data False only where the server says the
        bytes read as zeros (a hole that does not is read)."""
        cur: list[int] | None = None  # start, length, is_data of the run being built
        for start, n, _, zero in self.allocation_extents(offset, length):
            d = int(not zero)
            if cur is not None and cur[2] == d:
                cur[1] += n
                continue
            if cur is not None:
                yield cur[0], cur[1], bool(cur[2])
            cur = [start, n, d]
        if cur is not None:
            yield cur[0], cur[1], bool(cur[2])

    def allocation_extents(self, offset: int, length: int
                           ) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, data, zero) runs from ``base:allocation`` (data: not
        ``NBD_STATE_HOLE``; zero: ``NBD_STATE_ZERO``), adjacent equal runs merged; all
        data when the server has no such context."""
        end = min(offset + length, self._size)
        pos = offset
        cur: list[int] | None = None  # start, length, flags of the run being built
        while pos < end:
            lo = pos - pos % self._min
            before = pos
            for n, flags in self._status(lo, end - lo):
                s, e = max(lo, pos), min(lo + n, end)
                lo += n
                if e <= s:
                    continue
                f = flags & (P.NBD_STATE_HOLE | P.NBD_STATE_ZERO)
                if cur is not None and cur[2] == f:
                    cur[1] += e - s
                else:
                    if cur is not None:
                        yield _allocation(cur)
                    cur = [s, e - s, f]
                pos = e
            if pos == before:
                raise self.client._fail(f"block status made no progress at {pos:#x}",
                                        pos, "extent length")
        if cur is not None:
            yield _allocation(cur)

    def _status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents from ``offset``: from the last reply when it
        covers ``offset`` (a map walks an export extent by extent), else asked for."""
        with self._cache_lock:
            start, extents = self._extents
        pos = start
        if offset > start:  # continuing a walk; a new query asks the server again
            for i, (n, flags) in enumerate(extents):
                if pos <= offset < pos + n:
                    return [(pos + n - offset, flags), *extents[i + 1:]]
                pos += n
        got = self.client.block_status(offset, length)
        with self._cache_lock:
            self._extents = (offset, got)
        return got

    def flush(self) -> None:
        """``NBD_CMD_FLUSH``: every write replied to is durable on the server."""
        if self.writable:
            self.client.flush()

    def lock(self, writable: bool) -> None:
        """Nothing here: the server holds the image's lock while it serves it."""

    def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``; idempotent)."""
        self._closed = True
        self.client.close()

    def __enter__(self) -> NbdHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

def _allocation(run: list[int]) -> tuple[int, int, bool, bool]:
    start, n, flags = run
    return start, n, not flags & P.NBD_STATE_HOLE, bool(flags & P.NBD_STATE_ZERO)


def create_raw_on_export(url: str, size: int, preallocation: str = "off") -> None:
    """``create -f raw`` (and the target of ``convert``/``dd`` without ``-n``) on an NBD
    export, as qemu-img 7.2: the export keeps its size and bytes; ``size`` may not exceed
    it ("Cannot grow NBD nodes"); only ``preallocation=off``; then the first 512 bytes are
    zeroed (an old image there is not probed again).  A refusal writes nothing."""
    if preallocation != "off":
        raise UsageError(f"Unsupported preallocation mode '{preallocation}'",
                         field="preallocation")
    host = NbdHost(url, writable=True)
    try:
        if size > host.size():
            raise UsageError("Cannot grow NBD nodes", path=url, field="size")
        host.write_zeros(0, min(512, host.size()))
        host.flush()
    finally:
        host.close()


def open_nbd(url: str, policy: OpenPolicy | None = None, writable: bool = False, *,
             timeout: float | None = None,
             contexts: Sequence[str] = (P.BASE_ALLOCATION,),
             ssl_context: ssl.SSLContext | None = None) -> NbdHost:
    """Connect to the export at ``url`` (``writable``: for ``"r+"``; refused when the
    server exports it read-only).  An untrusted ``policy`` opens an NBD URL only when it
    has ``allow_nbd`` (a name from an untrusted source must not make diskimg connect to
    arbitrary sockets).  ``timeout`` (seconds per socket operation): None takes the URL's
    ``x-timeout``, else 30 s.  Faults raise :class:`~diskimg.errors.RemoteError` naming the URL
    and the offset."""
    if policy is not None and policy.untrusted and not policy.allow_nbd:
        raise BackingChainError(f"Refusing to open '{url}': an untrusted open policy opens "
                                "no NBD URL (OpenPolicy(untrusted=True, allow_nbd=True) "
                                "allows it)", path=url, operation="open",
                                reason="not allowed by the policy")
    return NbdHost(url, writable=writable, timeout=timeout, contexts=contexts,
                   ssl_context=ssl_context)


if TYPE_CHECKING:  # the type checker proves NbdHost is a Host (the formats' byte source)
    def _is_a_host(h: NbdHost) -> Host:
        return h
