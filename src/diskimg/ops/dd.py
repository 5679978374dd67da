"""``dd``: copy ``count`` blocks of ``bs`` bytes from ``skip`` into a new target
(qemu-img dd)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from diskimg import api

from diskimg.ops.chain import _progress_steps
from diskimg.ops import CHUNK, ProgressFn, Source, _open
from diskimg.params import check_int, renamed

# --- dd -----------------------------------------------------------------------------


def dd(
    src: Source,
    dst: str | os.PathLike[str],
    out_format: str = "raw",
    *,
    format: str | None = None,  # noqa: A002 - the one keyword for an image's format
    src_format: str | None = None,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    force_share: bool = False,
    untrusted: bool = False,
    secrets: Mapping[str, bytes] | None = None,
    warn: Callable[[str], None] | None = None,
    progress: ProgressFn | None = None,
    on_created: Callable[[], None] | None = None,
) -> None:
    """``qemu-img dd``: copy ``count`` blocks of ``bs`` bytes after skipping ``skip`` blocks
    into a new image ``dst``.  The output size is ``min(count*bs, size) - skip*bs`` (qemu's
    rule; the new image rounds it up to whole sectors); a skip past that end creates an
    empty output and calls ``warn``.  Every block is written, zero blocks too, so the
    output is allocated as qemu-img dd's is (``map`` shows one data run).  ``format`` is
    the source's format (None probes; ``src_format`` is its deprecated name).
    ``progress`` gets the percentage of the output written after each chunk, 0 first and
    100 last.  ``on_created`` is called once ``dst`` has been created (an error before
    that left it as it was: the CLI words those as qemu-img dd does)."""
    src_format = renamed("format", format, "src_format", src_format)
    bs = check_int("bs", bs, minimum=1)
    skip = check_int("skip", skip)
    if count is not None:
        count = check_int("count", count)
    kw: dict[str, Any] = {"force_share": force_share, "untrusted": untrusted,
                          "secrets": dict(secrets or {})}
    dev, owned = _open(src, src_format, kw)
    try:
        size = dev.size
        if count is not None and count * bs < size:
            size = count * bs
        in_pos = skip * bs
        if in_pos > size:
            if warn is not None:
                warn(f"{dev.filename}: cannot skip to specified offset")
            in_pos = size
        api.create(dst, out_format, size - in_pos)  # a refusal leaves ``dst`` as it was
        if on_created is not None:
            on_created()
        with api.open(dst, "r+", out_format) as out:
            step = max(bs, CHUNK // bs * bs)
            buf = bytearray(step)
            out_pos = 0
            done = _progress_steps(progress, size - in_pos)
            if progress is not None:
                progress(0.0)
            while in_pos < size:
                n = min(step, size - in_pos)
                mv = memoryview(buf)[:n]
                dev.readinto(in_pos, mv)
                out.write(out_pos, mv)  # zeros too: qemu-img dd allocates every block
                in_pos += n
                out_pos += n
                done(out_pos)
            out.flush()
            if progress is not None and not out_pos:
                progress(100.0)
    finally:
        if owned:
            dev.close()


# --- commit -------------------------------------------------------------------------
