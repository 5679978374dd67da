"""``convert`` into a destination that cannot seek (stdout, a pipe, a FIFO, a socket, a
writable file object): the target is written front to back, once (issue 18 item 2).

What streams: raw (the guest bytes in order, holes as zeros), streamOptimized vmdk (grains,
then tables, directory and footer: the format is made for this) and uncompressed qcow2
(metadata laid out first from the sources' map, then the data clusters in guest order).
Everything else is refused before the first byte is written, with the reason.  Memory
stays bounded at any image size: the sources are read chunk by chunk and the sink holds at
most :data:`diskimg.hostio.sink.BUFFER` bytes.
"""

from __future__ import annotations

import io
import os
import stat

from diskimg.device import BlockDevice
from diskimg.errors import UsageError
from diskimg.hostio.sink import Sink, Writable, open_sink
from diskimg.hostio.urls import is_url, scheme
from diskimg.ops import _ZEROS, CHUNK, ProgressFn, is_stream_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

#: what may be handed to ``convert`` as a streamed target
StreamTarget = int | Sink | Writable


def is_stream(dst: object) -> bool:
    """True when ``dst`` is written as a stream: a sink, a file descriptor, a file object,
    a URL (``s3://bucket/key`` ...: a new object, see
    :func:`diskimg.hostio.remote.open_fsspec_sink`), or the path of a FIFO or a socket."""
    if isinstance(dst, Sink | int):
        return not isinstance(dst, bool)
    if isinstance(dst, BlockDevice):
        return False
    if isinstance(dst, str | os.PathLike):
        return is_stream_path(dst)
    return True


def _open_target(dst: object, storage_options: Mapping[str, Any] | None = None,
                 size_hint: int | None = None) -> tuple[Sink, bool]:
    """``(sink, made)``: ``made`` sinks were opened here and are closed by the caller."""
    if isinstance(dst, Sink):
        return dst, False
    if isinstance(dst, str) and is_url(dst):
        from diskimg.hostio.url_sink import open_url_sink

        return open_url_sink(dst, storage_options, size_hint=size_hint), True
    if isinstance(dst, int):
        return Sink(dst, f"fd {dst}"), True
    if isinstance(dst, str | os.PathLike):
        if stat.S_ISSOCK(os.stat(dst).st_mode):
            import socket

            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.fspath(dst))
            except OSError:
                s.close()
                raise
            return Sink(s.detach(), str(os.fspath(dst)), owned=True), True
        return open_sink(dst), True
    return Sink(dst), True  # type: ignore[arg-type]  # a file object (is_stream said so)


def refusal(out_format: str, n_sources: int, options: Mapping[str, Any], *,
            compress: bool, backing_file: str | None, target_exists: bool,
            bitmaps: bool, salvage: bool, rate_limit: int | None = None,
            dst: object = None) -> str | None:
    """Why this convert cannot be written to a stream (None: it can)."""
    opts = {k: str(v) for k, v in options.items()}
    if isinstance(dst, io.TextIOBase):
        return "the target is a text file object: pass a binary one (e.g. sys.stdout.buffer)"
    if isinstance(dst, str) and is_url(dst):
        from diskimg.hostio.remote import is_fsspec_url

        if not is_fsspec_url(dst):
            return (f"'{dst}' cannot be written: diskimg writes new objects through "
                    "fsspec URLs (s3://, gs://, az://, memory:// ...; the diskimg[remote] "
                    f"extra), not {scheme(dst)}:// URLs")
    if rate_limit:
        return "-r (rate limit) is not supported when writing to a stream"
    if target_exists:
        return "-n writes into an existing image; a stream has no image to write into"
    if bitmaps:
        return "--bitmaps adds bitmaps after the data, which a stream cannot go back to"
    if salvage:
        return "--salvage is not supported when writing to a stream"
    if out_format not in ("raw", "vmdk", "qcow2"):
        return (f"format '{out_format}' cannot be written to a stream; raw, "
                "streamOptimized vmdk and qcow2 can")
    if backing_file is not None:
        return "a streamed image cannot have a backing file"
    if opts.get("preallocation", "off") != "off":
        return "preallocation is not supported when writing to a stream"
    if out_format == "vmdk":
        sub = opts.get("subformat", "monolithicSparse")
        if sub != "streamOptimized":
            return (f"vmdk subformat '{sub}' cannot be written to a stream (its tables come "
                    "before the data and are filled in afterwards); use "
                    "-o subformat=streamOptimized")
        if n_sources != 1:
            return "a streamed vmdk is written from one source"
    if out_format == "qcow2":
        if compress:
            return ("compressed qcow2 cannot be written to a stream: its L2 tables come "
                    "before the data and hold the compressed sizes, known only once every "
                    "cluster is compressed")
        if any(k == "encryption" or k.startswith("encrypt") for k in opts):
            return ("encrypted qcow2 is not written to a stream: write it to a file, or "
                    "stream it unencrypted")
        if opts.get("data_file"):
            return "a qcow2 with an external data file cannot be written to a stream"
        if n_sources != 1:
            return "a streamed qcow2 is written from one source"
    return None


def convert_to_stream(devs: Sequence[BlockDevice], dst: object, out_format: str,
                      options: Mapping[str, Any], *, progress: ProgressFn | None = None,
                      on_created: Callable[[], None] | None = None,
                      workers: int | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the guest bytes of ``devs`` (concatenated) as ``out_format`` into the stream
    ``dst``; the caller has checked :func:`refusal`.  A sink made here (from a file
    descriptor, a path, a URL or a file object) is flushed and closed (a new object is
    committed), and aborted when the convert fails (an object upload is discarded: no
    partial object); a :class:`Sink` given is flushed, not closed.  ``storage_options``
    open a URL target."""
    qplan = None
    total = sum(d.size for d in devs)
    hint = total
    if out_format == "qcow2":   # the layout (and its refusals) before the target opens
        from diskimg.qcow2 import stream_write

        qplan = stream_write.plan(devs[0], dict(options))
        hint = qplan.size
    elif out_format == "vmdk":  # at most the guest bytes, deflated, plus markers and tables
        hint = total + total // 32 + (4 << 20)
    sink, made = _open_target(dst, storage_options, hint)
    try:
        if on_created is not None:
            on_created()
        if progress is not None:
            progress(0.0)
        if out_format == "raw":
            _raw(devs, sink, progress)
        elif out_format == "vmdk":
            from diskimg.vmdk.create import write_stream_optimized

            opts = {k: v for k, v in options.items() if k != "preallocation"}
            write_stream_optimized(
                devs[0], sink, options=opts, threads=workers,
                progress=None if progress is None or not total else
                (lambda done, size: progress(100.0 * done / size)))
        elif qplan is not None:
            plan = qplan
            stream_write.write(
                devs[0], plan, sink,
                progress=None if progress is None or not plan.data_clusters else
                (lambda done, n: progress(100.0 * done / n)))
        else:  # pragma: no cover - refusal() keeps other formats out
            raise UsageError(f"format '{out_format}' cannot be written to a stream")
        sink.flush()
        if progress is not None:
            progress(100.0)
    except BaseException:
        if made:
            sink.abort()
        raise
    if made:
        sink.close()


def _raw(devs: Sequence[BlockDevice], sink: Sink, progress: ProgressFn | None) -> None:
    """The guest bytes in order: data read chunk by chunk, holes and zeros as zeros."""
    total = sum(d.size for d in devs) or 1
    base = 0
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    zeros = memoryview(_ZEROS)
    for d in devs:
        off = 0
        while off < d.size:
            st, _ = d.block_status(off, d.size - off, coarse=True)
            end = off + st.length
            while off < end:
                n = min(CHUNK, end - off)
                if st.data:
                    d.readinto(off, mv[:n])
                    sink.write(mv[:n])
                else:
                    sink.write(zeros[:n])
                off += n
                if progress is not None:
                    progress(100.0 * (base + off) / total)
        base += d.size
