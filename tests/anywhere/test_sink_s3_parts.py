"""Multipart part sizes of an upload into object storage (issue 18 item 2): S3 takes at
most 10,000 parts of 5 MiB to 5 GiB (all but the last at least 5 MiB), so a fixed 5 MiB
part fails above ~48 GiB.  The part size comes from the expected size when it is known
(``convert`` knows the most its output can be) and grows as parts are sent when it is
not.  The plans for 100 GiB and 5 TiB are checked by arithmetic; the uploads run against
moto with the limits lowered (a few parts, not 10,000) and read back byte for byte."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from anywhere.s3_server import S3, s3_server  # noqa: E402

import diskimg  # noqa: E402
from diskimg.hostio import remote_sink  # noqa: E402
from diskimg.hostio.remote import open_fsspec_sink  # noqa: E402
from diskimg.hostio.remote_sink import (  # noqa: E402
    GROW_EVERY,
    MAX_PARTS,
    PART_MAX,
    PART_SIZE,
    next_part_size,
    part_size,
)
from diskimg.hostio.sink import BUFFER  # noqa: E402

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
#: a part may exceed its size by what one write adds (the sink gathers whole parts)
SLACK = 2 * MiB


@pytest.mark.parametrize("size", [48 * GiB, 100 * GiB, TiB, 5 * TiB])
def test_known_size_plan_fits_the_limits(size: int) -> None:
    """A 100 GiB and a 5 TiB output: at most 10,000 parts, each within 5 MiB..5 GiB."""
    p = part_size(size)
    assert PART_SIZE <= p and p + SLACK <= PART_MAX
    assert -(-size // p) <= MAX_PARTS
    assert part_size(10 * GiB) == PART_SIZE            # small uploads: the least memory


def test_unknown_size_plan_reaches_five_tib() -> None:
    """Without a size, 10,000 growing parts hold S3's largest object (5 TiB), every one
    within the limits, and the first GROW_EVERY parts are 5 MiB (memory as before)."""
    sizes = [next_part_size(k, PART_SIZE) for k in range(MAX_PARTS)]
    assert sizes[:GROW_EVERY] == [PART_SIZE] * GROW_EVERY
    assert all(PART_SIZE <= s <= PART_MAX - BUFFER for s in sizes)
    assert sum(sizes[:-1]) >= 5 * TiB
    assert sizes == sorted(sizes)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def parts_seen(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The part sizes each upload sent (as s3fs recorded them), one list per upload."""
    seen: list[list[int]] = []
    close = remote_sink.ObjectSink.close
    send = remote_sink._Parts.send

    def spy_send(self: Any, box: list[bytes]) -> None:
        self.__dict__.setdefault("sizes", []).append(len(box[0]))
        send(self, box)

    def spy_close(self: Any) -> None:
        close(self)
        seen.append(list(self._parts.__dict__.get("sizes", [])))
        seen[-1].append(len(self._f.parts))

    monkeypatch.setattr(remote_sink._Parts, "send", spy_send)
    monkeypatch.setattr(remote_sink.ObjectSink, "close", spy_close)
    return seen


def test_unknown_size_upload_grows_its_parts(s3: S3, monkeypatch: pytest.MonkeyPatch,
                                             parts_seen: list[list[int]]) -> None:
    """GROW_EVERY lowered to 1: an upload without a size sends 5, 10, 20 MiB parts (and
    a last one): 4 parts where fixed 5 MiB parts would take 8; the object reads back
    byte-equal."""
    monkeypatch.setattr(remote_sink, "GROW_EVERY", 1)
    data = os.urandom(36 * MiB)
    url = s3.url("parts/grown.bin")
    with open_fsspec_sink(url, s3.storage_options) as sink:
        for off in range(0, len(data), 2 * MiB):
            sink.write(data[off:off + 2 * MiB])
    handed, n_parts = parts_seen[-1][:-1], parts_seen[-1][-1]
    assert handed[:3] == [5 * MiB, 10 * MiB, 20 * MiB], handed
    assert n_parts == 4
    assert hashlib.sha256(s3.fs().cat_file(url)).digest() == hashlib.sha256(data).digest()


def test_known_size_upload_with_the_part_limit_lowered(
        s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        parts_seen: list[list[int]]) -> None:
    """MAX_PARTS lowered to 3: ``convert`` of a 24 MiB raw image picks parts large enough
    for 3 (not the 5 parts of 5 MiB), and the object is the image, byte for byte."""
    monkeypatch.setattr(remote_sink, "MAX_PARTS", 3)
    src = tmp_path / "src.raw"
    data = os.urandom(24 * MiB)
    src.write_bytes(data)
    url = s3.url("parts/known.raw")
    diskimg.convert(src, url, "raw", storage_options=s3.storage_options)
    n_parts = parts_seen[-1][-1]
    assert n_parts <= 3, parts_seen
    assert all(s >= PART_SIZE for s in parts_seen[-1][:-1])
    assert hashlib.sha256(s3.fs().cat_file(url)).digest() == hashlib.sha256(data).digest()


def test_unknown_size_upload_to_a_store_without_parts() -> None:
    """memory:// files are not fsspec buffered files (no parts, no part size): an
    upload of unknown size writes through them and reads back equal."""
    import fsspec

    data = os.urandom(7 * MiB + 3)
    url = "memory://parts-test/unknown.bin"
    with open_fsspec_sink(url) as sink:
        for off in range(0, len(data), MiB):
            sink.write(data[off:off + MiB])
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/parts-test/unknown.bin") == data
    fs.rm("/parts-test/unknown.bin")
