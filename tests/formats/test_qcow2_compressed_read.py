"""Reading compressed qcow2 clusters (issue 20 item 2): every byte of zlib and zstd images
through each read path (whole clusters on the decode pool, the one-cluster path convert's
decoders take, partial clusters), a descriptor past or across the file end refused with
its offset and nothing changed, and no fstat per cluster (the pread stops at the end of
the file by itself)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import CorruptImageError
from diskimg.plan import RunKind

MiB = 1 << 20
CS = 64 << 10


def _source(path: Path) -> bytes:
    """2 MiB: text (compresses), random (stored as data), zeros, text again."""
    rng = random.Random(7)
    line = b"qcow2 compressed cluster descriptor sector count host offset\n"
    text = (line * (MiB // len(line) + 1))[:MiB // 2]
    data = text + rng.randbytes(MiB // 2) + bytes(MiB // 2) + text[::-1]
    path.write_bytes(data)
    return data


def _compressed(tmp_path: Path, codec: str) -> tuple[Path, bytes]:
    raw, out = tmp_path / "src.raw", tmp_path / f"c-{codec}.qcow2"
    data = _source(raw)
    diskimg.convert(raw, out, "qcow2", format="raw", compress=True,
                    options={"compression_type": codec})
    return out, data


def _first_compressed_l2(path: Path) -> tuple[int, int]:
    """(file offset of the L2 entry of guest cluster 0, that entry)."""
    raw = path.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    ent = struct.unpack_from(">Q", raw, l2)[0]
    assert ent >> 62 & 1, "guest cluster 0 is not compressed"
    return l2, ent


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_every_read_path_gives_the_source_bytes(tmp_path: Path, codec: str) -> None:
    path, want = _compressed(tmp_path, codec)
    with diskimg.open(path) as img:
        kinds = {img.plan(off, CS).kind for off in range(0, img.size, CS)}
        assert RunKind.COMPRESSED in kinds
        whole = bytearray(img.size)
        img.readinto(0, memoryview(whole))           # several clusters: the decode pool
        assert hashlib.sha256(whole).digest() == hashlib.sha256(want).digest()
        one = bytearray(CS)
        for off in range(0, img.size, CS):           # convert's decoders: one run each
            run = img.plan(off, CS)
            if run.kind is RunKind.COMPRESSED:
                img.read_compressed(run, memoryview(one))
                assert one == want[off:off + CS], off
        for off, n in ((100, 5), (CS - 7, 20), (3 * CS + 511, CS), (MiB - 9, 3 * CS)):
            assert img.read(off, n) == want[off:off + n], (off, n)


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_no_fstat_per_compressed_cluster(tmp_path: Path, codec: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, want = _compressed(tmp_path, codec)
    with diskimg.open(path) as img:
        fd = img.data_host.fd
        calls: list[int] = []
        real = os.fstat

        def spy(f: int) -> os.stat_result:
            calls.append(f)
            return real(f)

        monkeypatch.setattr(os, "fstat", spy)
        got = bytearray(CS)
        n = 0
        for off in range(0, img.size, CS):
            run = img.plan(off, CS)
            if run.kind is RunKind.COMPRESSED:
                img.read_compressed(run, memoryview(got))
                assert got == want[off:off + CS]
                n += 1
        assert img.read(0, img.size) == want
    assert n >= 16
    assert calls.count(fd) <= 1, f"{calls.count(fd)} fstat calls for {n} clusters"


@pytest.mark.parametrize("where", ["past", "across"])
def test_a_descriptor_past_or_across_the_file_end_is_refused_with_its_offset(
        tmp_path: Path, where: str) -> None:
    path, _ = _compressed(tmp_path, "zlib")
    l2, ent = _first_compressed_l2(path)
    size = path.stat().st_size
    x = 62 - (16 - 8)                                # offset bits for 64 KiB clusters
    nsec = (ent >> x) & ((1 << (16 - 8)) - 1)
    host = size + 4096 if where == "past" else size - 100
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 62) | (nsec << x) | host))
    before = path.read_bytes()
    with diskimg.open(path) as img, pytest.raises(CorruptImageError) as ei:
        img.read(0, CS)
    assert f"Compressed cluster at host offset {host:#x}" in str(ei.value)
    assert ei.value.offset == host
    if where == "past":
        assert "lies past the end of the file" in str(ei.value)
    assert path.read_bytes() == before


def _zstd_reference(data: bytes, cs: int) -> bytes | str:
    """The streaming decode alone (what every zstd cluster went through before the
    one-call path): its bytes, or its error text."""
    import io

    import zstandard

    try:
        out: bytes = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=False).read(cs)
    except zstandard.ZstdError as e:
        return str(e)
    return out


def test_zstd_one_call_path_decodes_exactly_what_the_streaming_path_does() -> None:
    """Frames with and without a content size, with a checksum, followed by padding or
    another frame, then truncated or with a byte flipped: the result (bytes, or the error
    text) is the streaming decoder's every time."""
    import zstandard

    from diskimg.qcow2.compress import _zstd_decompress

    rng = random.Random(3)
    line = b"zstd frame content size checksum\n"
    cluster = (line * (CS // len(line) + 1))[:CS - 4096] + rng.randbytes(4096)
    frames = {
        "sized": zstandard.ZstdCompressor(level=3).compress(cluster),
        "unsized": zstandard.ZstdCompressor(write_content_size=False).compress(cluster),
        "checksum": zstandard.ZstdCompressor(write_checksum=True).compress(cluster),
        "short": zstandard.ZstdCompressor().compress(cluster[:CS // 2]),
        "long": zstandard.ZstdCompressor().compress(cluster + b"x"),
    }
    cases: list[bytes] = []
    for f in frames.values():
        cases += [f, f + bytes(300), f + frames["sized"], f[:len(f) // 2], f[:-1], f[:5]]
        for at in (4, 7, len(f) // 3, len(f) - 2):
            flipped = bytearray(f)
            flipped[at] ^= 0x5A
            cases.append(bytes(flipped))
    decoded = 0
    for data in cases:
        want = _zstd_reference(data, CS)
        try:
            got: bytes | str = _zstd_decompress(data, CS)
        except ValueError as e:
            got = str(e)
        assert got == want, data[:16]
        decoded += got == cluster
    assert decoded >= 9         # the intact frames of a cluster, padded or not
