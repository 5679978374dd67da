"""qcow2/entries.py: the L2 entry classifier (``cluster_type``, ``subcluster_type``) on every
class of bit pattern, with and without extended L2 and an external data file, and the
compressed-cluster descriptor codec for every cluster size (cluster_bits 9..21), including
descriptors qemu wrote (fixtures/compressed-*.qcow2).

The expected classes are written out from docs/interop/qcow2.txt ("Cluster mapping",
"Extended L2 Entries", "Compressed Clusters Descriptor") and QEMU's qcow2_get_cluster_type /
qcow2_get_subcluster_type, not recomputed from the module's masks."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskimg.qcow2 import entries as E
from diskimg.qcow2.layout import Header

CT, SCT = E.ClusterType, E.SubclusterType
COMPRESSED, COPIED, ZERO = 1 << 62, 1 << 63, 1
HOST = 0x50000  # a cluster-aligned host offset (bits 9..55)


# --- cluster_type ---------------------------------------------------------------------------
def _expected(compressed: bool, copied: bool, zero: bool, off: int, extended: bool,
              data_file: bool) -> E.ClusterType:
    """The spec's table, case by case."""
    if compressed:
        return CT.COMPRESSED          # bit 62 decides before anything else
    if zero and not extended:         # bit 0 is the zero flag only without extended L2
        return CT.ZERO_ALLOC if off else CT.ZERO_PLAIN
    if off:
        return CT.NORMAL
    if data_file and copied:          # offset 0 is the data file's first cluster
        return CT.NORMAL
    return CT.UNALLOCATED


CASES = list(itertools.product([False, True], [False, True], [False, True], [0, HOST],
                               [False, True], [False, True]))


@pytest.mark.parametrize(("compressed", "copied", "zero", "off", "extended", "data_file"),
                         CASES)
def test_cluster_type_of_every_flag_combination(compressed: bool, copied: bool, zero: bool,
                                                off: int, extended: bool,
                                                data_file: bool) -> None:
    entry = (COMPRESSED if compressed else 0) | (COPIED if copied else 0) | \
        (ZERO if zero else 0) | off
    got = E.cluster_type(entry, extended=extended, has_data_file=data_file)
    assert got == _expected(compressed, copied, zero, off, extended, data_file), hex(entry)


@given(off=st.integers(1, (1 << 47) - 1).map(lambda c: c << 9), copied=st.booleans(),
       extended=st.booleans(), data_file=st.booleans())
def test_any_nonzero_offset_is_a_host_cluster(off: int, copied: bool, extended: bool,
                                              data_file: bool) -> None:
    entry = off | (COPIED if copied else 0)
    assert E.cluster_type(entry, extended=extended, has_data_file=data_file) == CT.NORMAL
    if not extended:
        assert E.cluster_type(entry | ZERO, extended=False,
                              has_data_file=data_file) == CT.ZERO_ALLOC


# --- subcluster_type ------------------------------------------------------------------------
@pytest.mark.parametrize(("entry", "data_file", "has_host"), [
    (0, False, False), (0, True, False), (COPIED, False, False), (COPIED, True, True),
    (HOST, False, True), (HOST | COPIED, True, True)])
@pytest.mark.parametrize("index", [0, 1, 17, 31])
def test_subcluster_type_of_every_bitmap_state(entry: int, data_file: bool, has_host: bool,
                                               index: int) -> None:
    other = (1 << ((index + 1) % 32)) | (1 << (32 + (index + 5) % 32))  # noise elsewhere
    want = {  # (allocated bit, zero bit) -> state, for an entry with / without a host cluster
        (0, 0): SCT.UNALLOCATED_ALLOC if has_host else SCT.UNALLOCATED_PLAIN,
        (1, 0): SCT.NORMAL if has_host else SCT.INVALID,
        (0, 1): SCT.ZERO_ALLOC if has_host else SCT.ZERO_PLAIN,
        (1, 1): SCT.INVALID,
    }
    for (a, z), state in want.items():
        bitmap = other & ~((1 << index) | (1 << (32 + index)))
        bitmap |= (a << index) | (z << (32 + index))
        assert E.subcluster_type(entry, bitmap, index, has_data_file=data_file) == state, \
            (hex(entry), hex(bitmap), index)


@pytest.mark.parametrize("data_file", [False, True])
def test_compressed_extended_entry_needs_an_empty_bitmap(data_file: bool) -> None:
    ent = E.encode_compressed(HOST, 700, 16)
    assert E.subcluster_type(ent, 0, 3, has_data_file=data_file) == SCT.COMPRESSED
    for bitmap in (1 << 3, 1 << 35, 1 << 0, 1 << 63):
        assert E.subcluster_type(ent, bitmap, 3, has_data_file=data_file) == SCT.INVALID


# --- compressed descriptors -----------------------------------------------------------------
@pytest.mark.parametrize("cluster_bits", range(9, 22))
@given(data=st.data())
def test_compressed_descriptor_round_trips(cluster_bits: int, data: st.DataObject) -> None:
    """x = 62 - (cluster_bits - 8) offset bits, then (cluster_bits - 8) bits of additional
    512-byte sectors: decode(encode(host, n)) gives host and a read length covering n that
    ends in n's last sector; encode(decode(d)) == d for every valid descriptor."""
    x = 62 - (cluster_bits - 8)
    nb_bits = cluster_bits - 8
    assert E.compressed_layout(cluster_bits) == (x, (1 << nb_bits) - 1)
    host = data.draw(st.integers(0, min((1 << x) - 1, (1 << 56) - 1)), label="host")
    max_len = (1 << nb_bits) * 512 - (host & 511)
    length = data.draw(st.integers(1, max_len), label="length")
    ent = E.encode_compressed(host, length, cluster_bits)
    assert ent >> 62 == 1                                      # COMPRESSED, not COPIED
    assert ent & ((1 << x) - 1) == host
    assert (ent >> x) & ((1 << nb_bits) - 1) == (host + length - 1) // 512 - host // 512
    h, n = E.decode_compressed(ent, cluster_bits)
    assert h == host and length <= n and (host + n) % 512 == 0 and n - length < 512
    assert E.encode_compressed(h, n, cluster_bits) == ent
    nb = data.draw(st.integers(0, (1 << nb_bits) - 1), label="nb_csectors")
    desc = COMPRESSED | (nb << x) | host
    assert E.encode_compressed(*E.decode_compressed(desc, cluster_bits), cluster_bits) == desc


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
def test_compressed_descriptor_refuses_what_does_not_fit(cluster_bits: int) -> None:
    x = 62 - (cluster_bits - 8)
    with pytest.raises(ValueError):
        E.encode_compressed(0, (1 << (cluster_bits - 8)) * 512 + 1, cluster_bits)
    if x < 56:
        with pytest.raises(ValueError):
            E.encode_compressed(1 << x, 512, cluster_bits)


@pytest.mark.parametrize("name", ["compressed-zlib.qcow2", "compressed-zstd.qcow2"])
def test_qemu_written_descriptors_decode_and_re_encode_identically(
        name: str, fixture_file: Callable[[str], Path]) -> None:
    """Every L2 entry qemu-img convert -c wrote: compressed ones re-encode to the same 64
    bits and point inside the file; the one uncompressed cluster is NORMAL."""
    raw = fixture_file(name).read_bytes()
    h = Header.parse(raw[: Header.cluster_size_of(raw)], len(raw))
    cb = h.cluster_bits
    l1 = [int.from_bytes(raw[h.l1_table_offset + 8 * i: h.l1_table_offset + 8 * i + 8], "big")
          for i in range(h.l1_size)]
    kinds: list[E.ClusterType] = []
    for l1e in l1:
        l2_off = l1e & E.L1E_OFFSET_MASK
        if not l2_off:
            continue
        for i in range(h.cluster_size // 8):
            ent = int.from_bytes(raw[l2_off + 8 * i: l2_off + 8 * i + 8], "big")
            t = E.cluster_type(ent, extended=False, has_data_file=False)
            kinds.append(t)
            if t == CT.COMPRESSED:
                host, n = E.decode_compressed(ent, cb)
                assert E.encode_compressed(host, n, cb) == ent
                assert 0 < host and host + n <= len(raw) + 511
    assert kinds.count(CT.COMPRESSED) == 5  # 8k at 0, 6k at 130k (2 clusters), the tail
    assert kinds.count(CT.NORMAL) == 1


# -- extended-L2 subcluster bitmaps: the one builder the writers and the checker share --

_bitmaps = st.integers(0, (1 << 64) - 1)
_ranges = st.tuples(st.integers(0, 32), st.integers(0, 32)).map(sorted)


@given(_bitmaps, _ranges)
def test_bitmap_with_alloc_allocates_exactly_the_range(bm: int, rng: list[int]) -> None:
    lo, hi = rng
    new = E.bitmap_with_alloc(bm, E.subcluster_mask(lo, hi))
    assert new < 1 << 64
    for i in range(32):
        inside = lo <= i < hi
        state = E.subcluster_type(1 << 9 | E.QCOW_OFLAG_COPIED, new, i, has_data_file=False)
        if inside:
            assert state == E.SubclusterType.NORMAL
        else:  # subclusters outside the range keep both of their bits
            assert (new >> i & 1, new >> 32 + i & 1) == (bm >> i & 1, bm >> 32 + i & 1)


@given(_bitmaps, _ranges)
def test_bitmap_with_zero_zeroes_exactly_the_range(bm: int, rng: list[int]) -> None:
    lo, hi = rng
    new = E.bitmap_with_zero(bm, E.subcluster_mask(lo, hi))
    assert new < 1 << 64
    for i in range(32):
        if lo <= i < hi:
            assert E.subcluster_type(0, new, i, has_data_file=False) == \
                E.SubclusterType.ZERO_PLAIN
        else:
            assert (new >> i & 1, new >> 32 + i & 1) == (bm >> i & 1, bm >> 32 + i & 1)


def test_bitmap_constants_and_conflicts() -> None:
    assert E.L2_BITMAP_ALL_ALLOC == 0xFFFFFFFF
    assert E.L2_BITMAP_ALL_ZERO == 0xFFFFFFFF << 32
    assert E.subcluster_mask(0, 32) == E.L2_BITMAP_ALL_ALLOC
    assert E.subcluster_mask(3, 5) == 0b11000
    assert E.bitmap_conflicts(1 << 4 | 1 << 36) == 1 << 4
    assert E.bitmap_conflicts(E.L2_BITMAP_ALL_ALLOC) == 0
    # the checker's repair of a misaligned preallocated cluster: allocated -> zero
    assert E.bitmap_with_zero(0b101 | 1 << 40, 0b101) == (0b101 | 1 << 8) << 32


_L1_VALUES = [1 << 63, 0x1FF, 1 << 56, 0x200, 0x10000, 0x7FFF0000, (1 << 63) | 0x30000]


@given(st.integers(0, 12000), st.lists(st.tuples(st.integers(0, 11999),
                                                 st.sampled_from(_L1_VALUES)), max_size=6),
       st.integers(0, 12100), st.integers(0, 12100))
def test_first_masked_is_the_first_entry_with_a_masked_bit(
        n: int, placed: list[tuple[int, int]], i: int, last: int) -> None:
    """``first_masked`` (blocks of the table tested as big integers) finds the entry a
    plain scan finds: flag-only entries (COPIED, reserved bits) are passed over, offsets
    found, in long runs of empty entries (its blocks grow to 4096) and past the end."""
    from array import array

    words = [0] * n
    for at, value in placed:
        if at < n:
            words[at] = value
    table = memoryview(array("Q", words))
    last = min(last, n)
    mask = E.L1E_OFFSET_MASK
    want = next((k for k in range(i, last) if table[k] & mask), last)
    assert E.first_masked(table, i, last, mask) == want


@pytest.mark.parametrize("start", [0, 3])
def test_first_masked_finds_an_entry_on_every_block_edge(start: int) -> None:
    """Entries just before, on and after each edge of ``first_masked``'s growing blocks
    (8, 64, 512, then 4096 entries from ``start``) are found, behind a flag-only entry
    (COPIED) that must be passed over: no entry falls between two blocks."""
    from array import array

    edges = [0, 8, 72, 584, 4680, 8776]
    for at in sorted({max(0, e + d) for e in edges for d in (-1, 0, 1)}):
        words = [0] * 9000
        if at:
            words[start + at - 1] = 1 << 63
        words[start + at] = 0x10000
        table = memoryview(array("Q", words))
        assert E.first_masked(table, start, len(words), E.L1E_OFFSET_MASK) == start + at


# --- the table codec and TableBreaks over tables with a zero head and tail ------------------
#: entries of an L2 table: plain data clusters (with and without COPIED), zero flags,
#: compressed descriptors, and entries with a reserved bit (56-61) set
_L2_VALUES = [0, 1, COPIED | 0x30000, 0x40000, COPIED | 0x50000 | 1, COMPRESSED | 0x1234567,
              COPIED | (1 << 57) | 0x60000, 0xFFFF_FFFF_FFFF_FFFF]


def _table(head: int, body: list[int], tail: int) -> list[int]:
    return [0] * head + body + [0] * tail


def _lanes(words: list[int], order: str) -> bytes:
    """Entry ``j``'s mask bytes as the spec of TableBreaks says: 1 where its byte is not 0."""
    return b"".join(bytes(b != 0 for b in w.to_bytes(8, order)) for w in words)  # type: ignore[arg-type]


@given(st.integers(0, 600), st.lists(st.one_of(st.sampled_from(_L2_VALUES),
                                               st.integers(0, (1 << 64) - 1)), max_size=40),
       st.integers(0, 600), st.sampled_from([512, 65536, 1 << 21]), st.booleans())
def test_table_breaks_masks_are_the_per_entry_rule(head: int, body: list[int], tail: int,
                                                   cs: int, big: bool) -> None:
    """TableBreaks' masks (made for the entries from the one before the first non-zero
    entry on, the zero head given its known bytes) are, byte for byte, the per-entry rule
    over the whole table up to one entry past the last non-zero one: ``nonzero`` the
    entry's own bytes, ``same`` the entry against the next, ``stepped`` the entry (bits
    0-62) plus the cluster size against the next (None when an entry that is not
    compressed has a reserved bit), in the on-disk (big-endian) bytes and in a decoded
    table alike."""
    import struct

    words = _table(head, body, tail)
    if not words:
        return
    n = len(words)
    order = "big" if big else "little"
    raw = struct.pack(f">{n}Q", *words)
    table = raw if big else E.be_u64_table(raw)
    b = E.TableBreaks(table, cs, big=big)
    last = max((j for j, w in enumerate(words) if w), default=-1)
    used = min(n, last + 2)
    nxt = [*words[1:used], *([words[used]] if used < n else [0])]
    assert b.nonzero() == _lanes(words[:used], order)
    assert b.same() == _lanes([w ^ x for w, x in zip(words[:used], nxt)], order)
    low = (1 << 63) - 1
    if any(w & (0x3F << 56) and not w & COMPRESSED for w in words):
        assert b.stepped() is None
    else:
        want = _lanes([((w & low) + cs) ^ (x & low) for w, x in zip(words[:used], nxt)],
                      order)
        assert b.stepped() == want


@given(st.sampled_from("HIQ"), st.integers(0, 300), st.lists(st.integers(0, 1 << 16),
                                                              max_size=30),
       st.integers(0, 300))
def test_table_codec_round_trips_with_zero_head_and_tail(code: str, head: int,
                                                         body: list[int], tail: int) -> None:
    """be_table decodes a big-endian table with a zero head and tail (only the words
    between swapped) to the values struct reads, and pack_be_table gives the same bytes
    back."""
    import struct

    size = struct.calcsize(code)
    words = [w & ((1 << 8 * size) - 1) for w in _table(head, body, tail)]
    raw = struct.pack(f">{len(words)}{code}", *words)
    t = E.be_table(raw, code)  # type: ignore[arg-type]
    assert t.tolist() == words
    assert E.pack_be_table(t) == raw


def test_a_table_whose_data_starts_mid_table_maps_as_qemu_img(tmp_path: Path) -> None:
    """A 64 KiB-cluster image whose data sits in the middle of an L2 table, past a long
    run of empty entries (the zero head TableBreaks skips), and in the middle of an L1
    table: ``map`` gives qemu-img's entries."""
    import json
    import shutil
    import subprocess

    import diskimg

    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    p = tmp_path / "mid.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "4T"], check=True)
    cmds = ["write -P 0x11 1234567k 3m", "write -P 0x22 1234572k 64k", "write -z 1234576k 64k",
            "write -P 0x33 2000000m 1m", "write -c -P 0x44 2000002m 64k"]
    for c in cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, str(p)], check=True,
                       capture_output=True)
    want = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(p)],
                                     check=True, capture_output=True, text=True).stdout)
    with diskimg.open(p) as img:
        got = [e.to_json() for e in img.map()]
    assert got == want


def test_tables_with_a_zero_head_read_and_write_as_qemu(tmp_path: Path) -> None:
    """Both ways over L2 tables whose entries start mid-table (a zero head the table
    codec does not swap): every byte diskimg reads of a qemu-written 1 GiB image (offset 0
    and the last partial cluster included) is what was written, and after diskimg writes
    mid-table too, ``qemu-img check`` finds nothing and ``qemu-img compare`` finds the
    image equal to the expected raw file."""
    import shutil
    import subprocess

    import diskimg

    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    size = (1 << 30) + 1536
    p, want = tmp_path / "mid.qcow2", tmp_path / "want.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), str(size)], check=True)
    with open(want, "wb") as f:
        f.truncate(size)
    qemu = [(300 << 20, 1 << 20, 0x11), (900 << 20, 64 << 10, 0x22), (1 << 30, 1536, 0x33)]
    for off, n, pat in qemu:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pat} {off} {n}", str(p)],
                       check=True, capture_output=True)
    ours = [(700 << 20, 128 << 10, 0x44), ((300 << 20) - 4096, 8192, 0x55)]

    def put(writes: list[tuple[int, int, int]]) -> None:
        with open(want, "r+b") as f:
            for off, n, pat in writes:
                f.seek(off)
                f.write(bytes([pat]) * n)

    def same_bytes() -> None:
        chunk = 64 << 20
        with diskimg.open(p) as img, open(want, "rb") as f:
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                assert img.read(off, n) == f.read(n), f"bytes differ in [{off}, {off + n})"

    put(qemu)
    same_bytes()
    with diskimg.open(p, "r+") as img:
        for off, n, pat in ours:
            img.write(off, bytes([pat]) * n)
    put(ours)
    chk = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
    assert chk.returncode == 0 and "No errors were found" in chk.stdout, chk.stdout + chk.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(p), str(want)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    same_bytes()
