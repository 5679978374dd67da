"""NbdClient: one connection to one NBD export (the NBD protocol specification,
doc/proto.md of the NBD project; every record goes through :mod:`diskimg.nbd.protocol`).

- fixed-newstyle handshake; ``NBD_OPT_STARTTLS`` for ``nbds://`` (stdlib :mod:`ssl`);
  ``NBD_OPT_STRUCTURED_REPLY``; ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation`` by
  default, ``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME`` on request);
  ``NBD_OPT_GO`` asking for the block sizes, which are then obeyed (``NBD_OPT_EXPORT_NAME``
  when the server does not know GO);
- READ (structured replies: data, hole and error chunks reassembled into the caller's
  buffer, every byte accounted for exactly once), WRITE (FUA), FLUSH, TRIM,
  WRITE_ZEROES (NO_HOLE), BLOCK_STATUS; ``NBD_CMD_DISC`` on :meth:`close`;
- one request in flight at a time (a lock: threads share a connection safely);
- every socket operation has ``timeout``; every length the server sends is bounded by
  the request it answers before anything is allocated or read for it.

Faults end in :class:`~diskimg.errors.RemoteError` naming the URL and the offset of the
request (``field`` names the protocol field at fault).  After a reply that breaks the
protocol, a timeout or a dropped connection the connection is closed: the stream can no
longer be trusted, and every later call fails the same way.  An error the server reports
for one request (an error reply) leaves the connection usable.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator

from diskimg.errors import RemoteError, UsageError
from diskimg.nbd import protocol as P
from diskimg.nbd.client_conn import DEFAULT_TIMEOUT, MAX_REQUEST, Connection, client_context

#: an error chunk: error, message length, a message of at most 4096 bytes and an offset
#: (the slack admits unknown error types with a few trailing fields)
_MAX_ERROR_CHUNK = 6 + P.NBD_MAX_STRING + 64
#: error chunks accepted in one reply before the server is deemed hostile
_MAX_ERROR_CHUNKS = 1024
#: most extents in one BLOCK_STATUS chunk (the spec's SHOULD NOT exceed)
_MAX_EXTENTS = 1 << 20

__all__ = ["DEFAULT_TIMEOUT", "MAX_REQUEST", "NbdClient", "client_context"]


class NbdClient(Connection):
    """A connection to the export at ``address`` (an NBD URL or
    :class:`~diskimg.nbd.url.NbdAddress`) and the commands on it.

    ``contexts``: the metadata contexts to select (those the server has are in
    :attr:`contexts`); ``timeout``: seconds for the connect and every socket operation;
    ``ssl_context``: for ``nbds://`` (default: from the URL's ``tls-certificates``
    directory, else the system's CAs)."""

    # --- transmission -------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        """Whether the server exports it read-only (``NBD_FLAG_READ_ONLY``)."""
        return bool(self.flags & P.NBD_FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        """Whether the transmission flags have ``flag`` (``NBD_FLAG_SEND_FLUSH`` ...)."""
        return bool(self.flags & flag)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 payload: memoryview | None = None) -> int:
        # the whole exchange has ``timeout``, plus as much again per 16 MiB of data: a
        # server dripping bytes slower than that is taken as stalled
        self._deadline = time.monotonic() + self.timeout * (1 + (length >> 24))
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        head = P.pack_request(cmd, self._cookie, offset, length, flags)
        if payload is not None and len(payload) <= 65536:
            self._send(head + bytes(payload), offset)
        else:
            self._send(head, offset)
            if payload is not None:
                self._send(payload, offset)
        return self._cookie

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"{what} of {length} bytes at offset {offset:#x} lies outside "
                             f"the export '{self.url}' ({self.size} bytes)", path=self.url)
        m = self.min_block
        if offset % m or (length % m and offset + length != self.size):
            raise UsageError(f"{what} at offset {offset:#x} (+{length}) is not aligned to "
                             f"the export's minimum block size {m}", path=self.url)

    def _reply_magic(self, cookie: int, offset: int) -> tuple[int, bytearray]:
        base = self._pos
        head = bytearray(P.CHUNK_HEADER_SIZE)
        self._recv_into(memoryview(head)[:4], offset)
        try:
            magic = P.reply_magic(head, base)
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        return magic, head

    def _simple(self, head: bytearray, cookie: int, offset: int) -> int:
        """The rest of a simple reply whose magic is in ``head``: its error."""
        base = self._pos - 4
        self._recv_into(memoryview(head)[4:P.SIMPLE_REPLY_SIZE], offset)
        try:
            rep = P.parse_simple_reply(head[:P.SIMPLE_REPLY_SIZE], base)
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if rep.handle != cookie:
            raise self._fail(f"a reply for cookie {rep.handle:#x}, never sent (expected "
                             f"{cookie:#x})", offset, "cookie")
        return rep.error

    def _chunk(self, head: bytearray, cookie: int, offset: int,
               max_length: int) -> P.ChunkHeader:
        base = self._pos - 4
        self._recv_into(memoryview(head)[4:], offset)
        try:
            ch = P.parse_chunk_header(head, base, max(max_length, _MAX_ERROR_CHUNK))
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if ch.handle != cookie:
            raise self._fail(f"a reply chunk for cookie {ch.handle:#x}, never sent "
                             f"(expected {cookie:#x})", offset, "cookie")
        if not ch.is_error and ch.length > max_length:
            raise self._fail(f"a chunk of {ch.length} bytes answers a request of at most "
                             f"{max_length}", offset, "chunk length")
        return ch

    def _error_chunk(self, ch: P.ChunkHeader, offset: int, length: int) -> P.ChunkError:
        data = self._recv(ch.length, offset)
        try:
            err = P.parse_error_chunk(data, ch.type, self._pos - len(data))
        except P.NbdProtocolError as e:
            raise self._protocol(e, offset) from None
        if err.offset is not None and not offset <= err.offset < offset + length:
            raise self._fail(f"an error at offset {err.offset:#x}, outside the request",
                             offset, "error offset")
        return err

    def _raise_reply_error(self, what: str, error: int, message: str, offset: int) -> None:
        eno = P.from_nbd_error(error)
        text = message or os.strerror(eno)
        if error == P.NBD_ESHUTDOWN:  # the spec: the client must disconnect (softly)
            self._disconnect(f"the server is shutting down ({text})")
        raise self._error(f"{what} failed: {text}", offset, "error", os.strerror(eno))

    def _structured(self, head: bytearray, cookie: int, offset: int, length: int,
                    max_length: int, what: str) -> Iterator[P.ChunkHeader]:
        """The chunks of the structured reply whose first magic is in ``head``: yields
        each content chunk's header (the caller reads its payload before the next);
        error chunks are read here, and the first one is raised once the reply is over
        (the stream stays in step: an error fails this request only)."""
        first: P.ChunkError | None = None
        errors = 0
        while True:
            ch = self._chunk(head, cookie, offset, max_length)
            if ch.is_error:
                errors += 1
                if errors > _MAX_ERROR_CHUNKS:
                    raise self._fail(f"more than {_MAX_ERROR_CHUNKS} error chunks in one "
                                     "reply", offset, "chunks")
                err = self._error_chunk(ch, offset, length)
                first = first or err
            elif ch.type != P.NBD_REPLY_TYPE_NONE:
                yield ch
            if ch.done:
                break
            magic, head = self._reply_magic(cookie, offset)
            if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._fail("a simple reply inside a structured one", offset, "magic")
        if first is not None:
            self._raise_reply_error(what, first.error, first.message,
                                    offset if first.offset is None else first.offset)

    def _unexpected(self, ch: P.ChunkHeader, what: str, offset: int) -> RemoteError:
        return self._fail(f"a chunk of type {ch.type} in the reply to {what}", offset,
                          "chunk type")

    def _status_reply(self, cookie: int, what: str, offset: int, length: int) -> None:
        """The reply to a command without data in the reply (WRITE, FLUSH, TRIM,
        WRITE_ZEROES): a simple reply, or structured NONE/error chunks."""
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error(what, error, "", offset)
            return
        for ch in self._structured(head, cookie, offset, length, 0, what):
            raise self._unexpected(ch, what, offset)

    # --- commands -----------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the export's bytes at ``offset`` (inside the export, aligned
        to the minimum block size), in requests of at most :attr:`max_payload` bytes."""
        n = len(buf)
        self._check_range(offset, n, "a read")
        step = self.max_payload - self.max_payload % self.min_block
        with self._lock:
            done = 0
            while done < n:
                k = min(step, n - done)
                self._read_one(offset + done, buf[done:done + k])
                done += k

    def _read_one(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        cookie = self._request(P.NBD_CMD_READ, offset, length)
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            if self.structured:
                raise self._fail("a simple reply to a READ after structured replies were "
                                 "negotiated", offset, "magic")
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error("read", error, "", offset)
            self._recv_into(buf, offset)
            return
        starts: list[int] = []   # covered [start, end) pieces, sorted, relative
        ends: list[int] = []
        covered = 0
        for ch in self._structured(head, cookie, offset, length, length + 8, "read"):
            if ch.type == P.NBD_REPLY_TYPE_OFFSET_DATA:
                at_pos = self._pos
                head8 = self._recv(8, offset) if ch.length >= 9 else b""
                try:
                    at, k = P.parse_offset_data_header(ch.length, head8, at_pos)
                except P.NbdProtocolError as e:
                    raise self._protocol(e, offset) from None
                rel = at - offset
                self._claim(starts, ends, rel, k, length, offset)
                self._recv_into(buf[rel:rel + k], offset)
                covered += k
            elif ch.type == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                data = self._recv(ch.length, offset)
                try:
                    hole = P.parse_offset_hole(data, self._pos - len(data))
                except P.NbdProtocolError as e:
                    raise self._protocol(e, offset) from None
                rel = hole.offset - offset
                self._claim(starts, ends, rel, hole.length, length, offset)
                buf[rel:rel + hole.length] = bytes(hole.length)
                covered += hole.length
            else:
                raise self._unexpected(ch, "a READ", offset)
        if covered != length:
            missing = _first_gap(starts, ends, length)
            raise self._fail(f"the reply to a READ of {length} bytes left bytes from "
                             f"offset {offset + missing:#x} unsent", offset, "chunks")

    def _claim(self, starts: list[int], ends: list[int], rel: int, k: int, length: int,
               offset: int) -> None:
        """Record that the piece [rel, rel+k) of a read was sent; a piece outside the
        request or overlapping an earlier one breaks the protocol."""
        if rel < 0 or k <= 0 or rel + k > length:
            raise self._fail(f"a chunk for bytes {offset + rel:#x}+{k}, outside the "
                             f"request (+{length})", offset, "chunk offset")
        i = bisect.bisect_right(starts, rel)
        if (i and ends[i - 1] > rel) or (i < len(starts) and starts[i] < rel + k):
            raise self._fail(f"a chunk for bytes {offset + rel:#x}+{k} overlaps an "
                             "earlier one", offset, "chunk offset")
        starts.insert(i, rel)
        ends.insert(i, rel + k)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *,
              fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (aligned; FUA: durable before the reply)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_range(offset, n, "a write")
        self._writable()
        flags = P.NBD_CMD_FLAG_FUA if fua and self.can(P.NBD_FLAG_SEND_FUA) else 0
        step = self.max_payload - self.max_payload % self.min_block
        with self._lock:
            done = 0
            while done < n:
                k = min(step, n - done)
                cookie = self._request(P.NBD_CMD_WRITE, offset + done, k, flags,
                                       view[done:done + k])
                self._status_reply(cookie, "write", offset + done, k)
                done += k

    def _writable(self) -> None:
        if self.read_only:
            raise UsageError(f"the NBD export '{self.url}' is read-only", path=self.url)

    def _length_command(self, cmd: int, offset: int, length: int, flags: int,
                        what: str) -> None:
        """TRIM or WRITE_ZEROES of any length, in requests of at most 2^31 bytes."""
        self._check_range(offset, length, what)
        self._writable()
        step = (1 << 31) - (1 << 31) % max(self.min_block, 512)
        with self._lock:
            done = 0
            while done < length:
                k = min(step, length - done)
                cookie = self._request(cmd, offset + done, k, flags)
                self._status_reply(cookie, what, offset + done, k)
                done += k

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False,
                     fua: bool = False) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros (``no_hole``: allocated)."""
        if not self.can(P.NBD_FLAG_SEND_WRITE_ZEROES):
            raise UsageError(f"the NBD export '{self.url}' does not take WRITE_ZEROES",
                             path=self.url)
        flags = (P.NBD_CMD_FLAG_NO_HOLE if no_hole else 0) | \
            (P.NBD_CMD_FLAG_FUA if fua and self.can(P.NBD_FLAG_SEND_FUA) else 0)
        self._length_command(P.NBD_CMD_WRITE_ZEROES, offset, length, flags, "write zeroes")

    def trim(self, offset: int, length: int) -> None:
        """Tell the server ``length`` bytes at ``offset`` are no longer needed (their
        contents are undefined afterwards); a no-op when the server takes no TRIM."""
        if self.can(P.NBD_FLAG_SEND_TRIM):
            self._length_command(P.NBD_CMD_TRIM, offset, length, 0, "trim")

    def flush(self) -> None:
        """Make every write the server has replied to durable (a no-op when the server
        takes no FLUSH)."""
        if not self.can(P.NBD_FLAG_SEND_FLUSH) or self.read_only:
            return
        with self._lock:
            cookie = self._request(P.NBD_CMD_FLUSH, 0, 0)
            self._status_reply(cookie, "flush", 0, 0)

    def block_status(self, offset: int, length: int,
                     context: str = P.BASE_ALLOCATION) -> list[tuple[int, int]]:
        """(length, flags) extents of ``context`` from ``offset``: at least one, none past
        ``offset + length`` (the server may describe less than asked for).  A context the
        server did not select: one extent of flags 0 (data, for ``base:allocation``)."""
        length = min(length, self.size - offset, 0xFFFFFFFF - 0xFFFFFFFF % max(
            self.min_block, 512))
        if length <= 0:
            raise UsageError(f"block status at offset {offset:#x} lies outside the export "
                             f"'{self.url}'", path=self.url)
        cid = self.contexts.get(context)
        if cid is None:
            return [(length, 0)]
        self._check_range(offset, length, "block status")
        with self._lock:
            return self._block_status(offset, length, cid)

    def _block_status(self, offset: int, length: int, cid: int) -> list[tuple[int, int]]:
        cookie = self._request(P.NBD_CMD_BLOCK_STATUS, offset, length)
        magic, head = self._reply_magic(cookie, offset)
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error = self._simple(head, cookie, offset)
            if error:
                self._raise_reply_error("block status", error, "", offset)
            raise self._fail("a simple reply without error to BLOCK_STATUS", offset,
                             "magic")
        # each extent is at least one byte and all but the last lie inside the request
        max_len = 4 + 8 * min(_MAX_EXTENTS, length)
        seen: set[int] = set()
        mine: list[tuple[int, int]] | None = None
        for ch in self._structured(head, cookie, offset, length, max_len, "block status"):
            if ch.type != P.NBD_REPLY_TYPE_BLOCK_STATUS:
                raise self._unexpected(ch, "BLOCK_STATUS", offset)
            data = self._recv(ch.length, offset)
            try:
                bs = P.parse_block_status(data, self._pos - len(data))
            except P.NbdProtocolError as e:
                raise self._protocol(e, offset) from None
            if bs.context_id not in self.contexts.values() or bs.context_id in seen:
                raise self._fail(f"block status for context id {bs.context_id}, not "
                                 "selected or sent twice", offset, "context id")
            seen.add(bs.context_id)
            total = 0
            for i, (n, _) in enumerate(bs.extents):
                if total >= length:
                    raise self._fail(f"block status extent {i} starts past the request",
                                     offset, "extent length")
                total += n
            if bs.context_id == cid:
                mine = _clip(bs.extents, length)
        if mine is None:
            raise self._fail("no block status for the selected context", offset,
                             "context id")
        return mine

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clip(extents: tuple[tuple[int, int], ...], length: int) -> list[tuple[int, int]]:
    """The extents, the last cut at ``length``."""
    out: list[tuple[int, int]] = []
    total = 0
    for n, flags in extents:
        n = min(n, length - total)
        out.append((n, flags))
        total += n
        if total >= length:
            break
    return out


def _first_gap(starts: list[int], ends: list[int], length: int) -> int:
    pos = 0
    for s, e in zip(starts, ends, strict=True):
        if s > pos:
            return pos
        pos = e
    return pos if pos < length else length
