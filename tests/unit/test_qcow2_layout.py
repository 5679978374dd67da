"""qcow2/layout.py: ``Header.parse(Header.pack(h)) == h`` for any valid header (v2 and v3,
every cluster size, refcount width, compression type, feature bits, extensions and backing
file name), and ``pack`` of what was parsed gives the same bytes.  The byte-for-byte check
on headers qemu-img wrote is tests/formats/test_qcow2_records.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from diskimg.qcow2.layout import (
    BACKING_FILE_NAME_MAX,
    QCOW2_EXT_MAGIC_END,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_INCOMPAT_MASK,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    Extension,
    Header,
)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    version = draw(st.sampled_from([2, 3]))
    cb = draw(st.integers(9, 21))
    cs = 1 << cb
    incompat = 0
    compression, refcount_order, header_length = 0, 4, 72
    compat = autoclear = 0
    if version == 3:
        incompat = draw(st.integers(0, QCOW2_INCOMPAT_MASK)) & ~QCOW2_INCOMPAT_COMPRESSION
        header_length = draw(st.sampled_from([104, 112]))
        if header_length == 112:
            compression = draw(st.sampled_from([0, 1]))
            if compression:
                incompat |= QCOW2_INCOMPAT_COMPRESSION
        refcount_order = draw(st.integers(0, 6))
        compat = draw(st.integers(0, (1 << 64) - 1))
        autoclear = draw(st.integers(0, (1 << 64) - 1))
    per_l2 = cs // (16 if incompat & QCOW2_INCOMPAT_EXTL2 else 8)
    l1_size = draw(st.integers(0, min(4096, QCOW_MAX_L1_SIZE // 8)))
    size = draw(st.integers(0, l1_size * cs * per_l2))
    rt_clusters = draw(st.integers(1, max(1, min(64, QCOW_MAX_REFTABLE_SIZE // cs))))
    cluster = st.integers(1, 1 << 20).map(lambda c: c * cs)
    name_budget = cs - header_length - 8 - 8 * 4
    exts = draw(st.lists(
        st.builds(Extension, st.integers(1, (1 << 32) - 1).filter(
            lambda t: t != QCOW2_EXT_MAGIC_END),
            st.binary(max_size=40).map(lambda b: b + bytes(len(b) % 3))),  # trailing zeros
        max_size=3 if name_budget > 200 else 0))
    used = sum(len(e.pack()) for e in exts)
    backing = draw(st.none() | st.text(
        st.characters(min_codepoint=1, max_codepoint=0x10FFFF, exclude_categories=["Cs"]),
        min_size=1, max_size=60).filter(
            lambda s: len(s.encode()) <= min(BACKING_FILE_NAME_MAX, name_budget - used)))
    return Header(version=version, cluster_bits=cb, size=size, l1_size=l1_size,
                  l1_table_offset=draw(cluster) if l1_size else draw(st.sampled_from([0, cs])),
                  refcount_table_offset=draw(cluster), refcount_table_clusters=rt_clusters,
                  crypt_method=draw(st.integers(0, 2)),
                  nb_snapshots=draw(st.integers(0, 65536)),
                  snapshots_offset=draw(st.sampled_from([0, cs * 7])),
                  incompatible_features=incompat, compatible_features=compat,
                  autoclear_features=autoclear, refcount_order=refcount_order,
                  header_length=header_length, compression_type=compression,
                  backing_file=backing, extensions=exts)


@given(h=headers())
def test_header_parse_of_pack_is_the_header(h: Header) -> None:
    packed = h.pack()
    assert len(packed) <= h.cluster_size
    back = Header.parse(packed + bytes(h.cluster_size - len(packed)))
    assert back.backing_file_offset == (0 if h.backing_file is None else
                                        len(packed) - len(h.backing_file.encode()))
    assert back.replace(backing_file_offset=0) == h.replace(backing_file_offset=0)
    assert back.pack() == packed
