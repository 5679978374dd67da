"""The one refcount-block codec (qcow2.refcount): every width 1..64 bits, round trips,
the spec's bit layout, and refcount blocks qemu wrote."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from diskimg.qcow2.layout import Header
from diskimg.qcow2.refcount import (
    REFT_OFFSET_MASK,
    RefBlock,
    decode_refblock,
    encode_refblock,
    refcount_typecode,
)

ORDERS = range(7)


def _spec_entry(raw: bytes, order: int, i: int) -> int:
    """docs/interop/qcow2.txt: entries of >= 8 bits are big-endian; narrower ones are
    packed from the least significant bit of each byte."""
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        return int.from_bytes(raw[i * n:(i + 1) * n], "big")
    per = 8 // bits
    return (raw[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


@pytest.mark.parametrize("order", ORDERS)
def test_decode_follows_the_spec_and_round_trips(order: int) -> None:
    rnd = random.Random(order)
    raw = bytes(rnd.randrange(256) for _ in range(512))
    entries = 512 * 8 >> order
    vals = decode_refblock(raw, order)
    assert (vals.format, vals.readonly) == (refcount_typecode(order), False)
    assert len(vals) == entries
    assert list(vals) == [_spec_entry(raw, order, i) for i in range(entries)]
    assert encode_refblock(vals, order) == raw
    blk = RefBlock(order, raw)
    assert [blk[i] for i in range(entries)] == list(vals)
    assert blk.pack() == raw


@pytest.mark.parametrize("order", ORDERS)
def test_set_changes_exactly_one_entry(order: int) -> None:
    rnd = random.Random(100 + order)
    raw = bytes(rnd.randrange(256) for _ in range(512))
    entries = 512 * 8 >> order
    top = (1 << (1 << order)) - 1
    blk = RefBlock(order, raw)
    expect = list(decode_refblock(raw, order))
    for _ in range(200):
        i, v = rnd.randrange(entries), rnd.randint(0, top)
        blk[i] = v
        expect[i] = v
        assert blk[i] == v
    assert list(decode_refblock(blk.pack(), order)) == expect
    arr = decode_refblock(raw, order)
    for i, v in enumerate(expect):
        arr[i] = v
    assert encode_refblock(arr, order) == blk.pack()
    # extremes of the width survive the round trip
    blk[0], blk[entries - 1] = top, 0
    again = RefBlock(order, blk.pack())
    assert (again[0], again[entries - 1]) == (top, 0)


@pytest.mark.parametrize("order", ORDERS)
def test_fill_and_count(order: int) -> None:
    blk = RefBlock(order, bytes(512))
    blk.fill(3, 40, 1)
    assert blk.count_used(512 * 8 >> order) == 37
    assert blk.first_used(0, 100) == 3
    assert list(decode_refblock(blk.pack(), order))[:41] == [0] * 3 + [1] * 37 + [0]


@pytest.mark.qemu
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_codec_reads_qemu_refblocks(bits: int, make_image: Callable[..., Path],
                                    qemu_img: str, qemu_io: str,
                                    run: Callable[..., object]) -> None:
    img = make_image("r.qcow2", "qcow2", "4M",
                     options={"refcount_bits": str(bits), "cluster_size": "4096"})
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(img)])
    if bits > 1:  # a snapshot shares the data clusters: refcount 2
        run([qemu_img, "snapshot", "-c", "s1", str(img)])
    raw = img.read_bytes()
    h = Header.parse(raw[:4096], len(raw))
    order = h.refcount_order
    assert 1 << order == bits
    rt = int.from_bytes(raw[h.refcount_table_offset:h.refcount_table_offset + 8], "big")
    block_off = rt & REFT_OFFSET_MASK
    block = raw[block_off:block_off + 4096]
    vals = decode_refblock(block, order)
    assert encode_refblock(vals, order) == block
    assert RefBlock(order, block).pack() == block
    nclusters = -(-len(raw) // 4096)  # the snapshot table ends mid-cluster
    used = list(vals[:nclusters])
    # every cluster of the file is in use, nothing past it
    assert all(v >= 1 for v in used) and not any(vals[nclusters:])
    # qemu-io wrote 16 data clusters; a snapshot shares them and their one L2 table
    # (refcount 2); everything else (header, tables, blocks) is used once
    assert used.count(2) == (17 if bits > 1 else 0)
    assert used.count(1) == nclusters - used.count(2)
