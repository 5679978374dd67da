"""The one block cache and read path of every remote-object host
(hostio/blockcache.py, ObjectHost.preadinto): what a read fetches, what it caches, the
read-ahead, and one wording for an object that changed, from HttpHost and FsspecHost
alike."""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest

from diskimg.errors import RemoteError
from diskimg.hostio.blockcache import BlockCache, Fetch
from diskimg.hostio.http import open_http

Faulty = Any               # the fixture's type: tests/anywhere/conftest.py
KB = 1024
DATA = bytes(range(256)) * 4096 + b"tail"        # 1 MiB + 4


def _plan(cache: BlockCache, offset: int, length: int, size: int, **kw: int
          ) -> tuple[list[tuple[int, int, bool]], bytes]:
    buf = bytearray(length)
    fetches = cache.plan(offset, offset + length, size, memoryview(buf), **kw)
    return [(f.lo, f.hi, f.direct) for f in fetches], bytes(buf)


def test_plan_direct_parts_cached_edges_and_hits() -> None:
    c = BlockCache(64 * KB, 256 * KB)
    size = 10 << 20
    # an unaligned 1 MiB read: the partial edge blocks are cached fetches, the 15 whole
    # blocks inside go straight to the buffer in 2 parts of at least 512 KiB
    got, _ = _plan(c, 1000, 1 << 20, size, parts=4, min_part=512 * KB)
    assert got == [(64 * KB, 576 * KB, True), (576 * KB, 1024 * KB, True),
                   (0, 64 * KB, False), (1024 * KB, 1088 * KB, False)]
    # cached blocks are copied, not fetched
    block = memoryview(bytes(range(256)) * 256)
    c.store(0, block, 0, memoryview(bytearray(0)))
    got, buf = _plan(c, 100, 200, size)
    assert got == [] and buf == bytes(block[100:300])
    # the LRU keeps at most cache_bytes
    for b in range(1, 10):
        c.store(b * 64 * KB, block, 0, memoryview(bytearray(0)))
    assert len(c) == 4 and _plan(c, 0, 10, size)[0] == [(0, 64 * KB, False)]


def test_plan_one_fetch_per_run_for_a_serial_host() -> None:
    """A host that fetches one range at a time (FsspecHost: a round trip each) gets one
    fetch per run of missing blocks, edges and all; a run larger than the cache is the
    read's own bytes, uncached."""
    c = BlockCache(64 * KB, 512 * KB)
    size = 10 << 20
    assert _plan(c, 1000, 300 * KB, size)[0] == [(0, 320 * KB, False)]
    assert _plan(c, 1000, 1 << 20, size)[0] == [(1000, 1000 + (1 << 20), True)]


def test_plan_read_ahead_grows_while_small_reads_are_sequential() -> None:
    c = BlockCache(4 * KB, 1 << 20)
    size = 1 << 20
    assert _plan(c, 0, 512, size)[0] == [(0, 4 * KB, False)]          # cold: no ahead
    c.store(0, memoryview(bytes(4 * KB)), 0, memoryview(bytearray(0)))
    # sequential: the missing block and 2 ahead, in one fetch
    assert _plan(c, 512, 4 * KB, size)[0] == [(4 * KB, 16 * KB, False)]
    # a jump ends the read-ahead; the end of the object bounds it
    assert _plan(c, size - 100, 100, size)[0] == [(size - 4 * KB, size, False)]
    assert repr(Fetch(0, 1, True)) == "Fetch(0, 1, direct=True)"


def test_changed_object_one_wording_for_both_hosts(faulty: Faulty) -> None:
    """HttpHost (a new ETag) and FsspecHost (the store's ETag mismatch) say the same:
    the URL, the offset of this read, one phrase; a later read (cached blocks too) is
    refused naming its own offset and the same reason."""
    fsspec = pytest.importorskip("fsspec")
    from diskimg.hostio.remote import open_fsspec

    messages: dict[str, list[str]] = {}
    http_url = faulty.serve(DATA, "etag")
    mem_url = "memory://diskimg-test-changed/disk.raw"
    fsspec.filesystem("memory").pipe(mem_url, DATA)

    class Replaced:
        """s3fs's answer to a ranged GET whose If-Match no longer holds."""

        def seek(self, offset: int) -> None:
            pass

        def read(self, n: int) -> bytes:
            raise OSError(errno.EBUSY, "Etag mismatch: the object was replaced")

    with open_http(http_url, timeout=5) as hh, open_fsspec(mem_url) as fh:
        assert fh.pread(0, 10) == DATA[:10]              # cached before the change
        fh._f = Replaced()
        for name, host, url in (("http", hh, http_url), ("fsspec", fh, mem_url)):
            out = []
            for offset in (300_000, 0):
                with pytest.raises(RemoteError) as ei:
                    host.pread(offset, 10)
                assert ei.value.url == url
                out.append(str(ei.value).replace(url, "URL"))
            messages[name] = out
    for name, (first, again) in messages.items():
        m = re.fullmatch(r"Could not read 'URL' at offset 0x40000: the object changed "
                         r"since it was opened \((.+)\)", first)
        assert m, (name, first)
        assert again == f"Could not read 'URL' at offset 0x0: the object changed since it "\
                        f"was opened ({m[1]})", (name, again)
    fsspec.filesystem("memory").rm(mem_url)
