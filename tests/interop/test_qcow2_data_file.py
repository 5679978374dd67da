"""qcow2 with an external data file against qemu (issue 15, bugs 2 and 3).

With a data file, guest cluster k lies at data-file offset k * cluster_size, so guest
cluster 0 lies at offset 0 and its L2 entry is QCOW_OFLAG_COPIED with offset 0: a data
cluster, not an unallocated one.  qemu writes the images (at offset 0, in the middle, in
the last partial cluster, write_zeroes with and without unmap, discard, and at subcluster
granularity with extended L2), diskimg must read every byte as qemu does and map them as
``qemu-img map`` does; then diskimg writes partial clusters (cluster 0 among them) and
qemu must read every byte as the model says, with ``qemu-img check`` clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

RunFn = Callable[..., "subprocess.CompletedProcess[str]"]  # the ``run`` fixture

pytestmark = pytest.mark.qemu

# (cluster size, data_file_raw, extended_l2); extended L2 needs clusters of 16 KiB or more
CASES = [
    (4096, "off", "off"),
    (4096, "on", "off"),
    (1024, "on", "off"),
    (65536, "off", "off"),
    (16384, "off", "on"),
    (65536, "on", "on"),
]


def _qemu_ops(cs: int, size: int, ext: bool) -> list[tuple[str, int, int, int]]:
    """(kind, offset, length, pattern) as qemu-io applies them; kinds: w (write),
    z (write -z), u (write -z -u), d (discard)."""
    ops = [
        ("w", 0, cs + cs // 2 + 100, 0x11),        # guest offset 0, into cluster 1
        ("w", 5 * cs + 300, 2 * cs, 0x22),          # the middle, unaligned
        ("w", size - 700, 700, 0x33),               # the last, partial cluster
        ("z", 8 * cs, 2 * cs, 0),                   # zero over unallocated clusters
        ("w", 11 * cs, 3 * cs, 0x44),
        ("z", 11 * cs, cs, 0),                      # zero, cluster kept
        ("u", 12 * cs, cs, 0),                      # zero with unmap
        ("d", 13 * cs, cs, 0),                      # discard
        ("z", 512, 512, 0),                         # partial zero inside cluster 0
    ]
    if ext:
        sc = cs // 32
        ops += [("w", 16 * cs + 3 * sc, sc, 0x55),  # one subcluster
                ("w", 17 * cs + sc + 7, 5 * sc, 0x66),
                ("z", 17 * cs + 2 * sc, 2 * sc, 0)]  # subcluster zero bits
    return ops


def _first_diff(got: bytes | bytearray, want: bytes | bytearray) -> int | None:
    """Offset of the first byte where ``got`` differs from ``want`` (None: identical).
    Used instead of ``assert got == want``, whose diff of MiB-sized bytes takes minutes."""
    if got == want:
        return None
    n = min(len(got), len(want))
    return next((i for i in range(n) if got[i] != want[i]), n)


def _assert_bytes(got: bytes | bytearray, want: bytes | bytearray, what: str) -> None:
    bad = _first_diff(got, want)
    assert bad is None, (f"{what}: first differing byte at {bad:#x} "
                         f"(got {got[bad : bad + 8].hex()}, want {want[bad : bad + 8].hex()})")


def _apply(model: bytearray, off: int, n: int, pat: int) -> None:
    model[off : off + n] = bytes([pat]) * n


def _qemu_map(img: Path) -> tuple[object, str]:
    return (QEMU.map(img.name, cwd=img.parent),
            QEMU.img("map", img.name, cwd=img.parent).stdout)


def _diskimg_map(run: RunFn, img: Path) -> tuple[object, str]:
    cli = [sys.executable, "-m", "diskimg", "map"]
    js = run([*cli, "--output=json", img.name], cwd=img.parent).stdout
    human = run([*cli, img.name], cwd=img.parent).stdout
    return json.loads(js), human


@pytest.mark.parametrize(("cs", "raw_flag", "ext"), CASES,
                         ids=[f"cs{c}-raw_{r}-extl2_{e}" for c, r, e in CASES])
def test_data_file_reads_writes_and_map_match_qemu(
        tmp_path: Path, run: RunFn, qemu_img: str, qemu_io: str,
        make_image: Callable[..., Path], cs: int, raw_flag: str, ext: str) -> None:
    size = 24 * cs + 1536  # the last cluster is partial
    data = tmp_path / "d.raw"
    img = make_image("d.qcow2", "qcow2", size, options={
        "cluster_size": str(cs), "data_file": str(data), "data_file_raw": raw_flag,
        "extended_l2": ext})
    model = bytearray(size)
    io_cmds: list[str] = []
    for kind, off, n, pat in _qemu_ops(cs, size, ext == "on"):
        io_cmds += ["-c", {"w": f"write -P {pat} {off} {n}", "z": f"write -z {off} {n}",
                           "u": f"write -z -u {off} {n}", "d": f"discard {off} {n}"}[kind]]
        _apply(model, off, n, pat)
    run([qemu_io, "-f", "qcow2", *io_cmds, img.name], cwd=tmp_path)

    # 1. diskimg reads what qemu wrote, every byte, and maps it as qemu does
    _assert_bytes(QEMU.raw_bytes(img.name, cwd=img.parent), model, "qemu after qemu-io")
    with diskimg.open(img) as d:
        _assert_bytes(d.read(0, size), model, "diskimg after qemu-io")
    assert _diskimg_map(run, img) == _qemu_map(img)

    # 2. diskimg writes partial clusters (cluster 0 first); qemu reads the model
    sc = cs // 32 if ext == "on" else cs
    writes = [
        (100, 50, 0xA1),                     # inside cluster 0 (data-file offset 0)
        (cs + cs // 2 + 50, 300, 0xA2),      # cluster 1, half written by qemu
        (5 * cs + 10, 20, 0xA3),             # a data cluster in the middle
        (8 * cs + 7, 9, 0xA4),               # a zero cluster
        (11 * cs + 3, 5, 0xA5),              # a zero cluster that kept its host cluster
        (13 * cs + 3, 5, 0xA6),              # a discarded cluster
        (20 * cs + 1, 3, 0xA7),              # an unallocated cluster
        (size - 100, 50, 0xA8),              # the last, partial cluster
        (16 * cs + 3 * sc + 1, 2, 0xA9),     # a subcluster qemu wrote (extended L2)
    ]
    with diskimg.open(img, "r+") as d:
        for off, n, pat in writes:
            d.write(off, bytes([pat]) * n)
            _apply(model, off, n, pat)
        d.write_zeroes(cs // 4, cs)          # partial zeroes over clusters 0 and 1
        _apply(model, cs // 4, cs, 0)
        d.write_zeroes(2 * cs, 2 * cs)       # whole clusters, no unmap
        d.write_zeroes(4 * cs, cs, may_unmap=True)
        d.write_zeroes(6 * cs, cs)           # a whole data cluster, no unmap
        d.discard(14 * cs, cs)
        _apply(model, 2 * cs, 3 * cs, 0)
        _apply(model, 6 * cs, cs, 0)
        _apply(model, 14 * cs, cs, 0)
        _assert_bytes(d.read(0, size), model, "diskimg after its writes")
    _assert_bytes(QEMU.raw_bytes(img.name, cwd=img.parent), model, "qemu after diskimg's writes")
    with diskimg.open(img) as d:
        _assert_bytes(d.read(0, size), model, "diskimg reopened")
    QEMU.check_clean(img.name, cwd=img.parent)
    assert _diskimg_map(run, img) == _qemu_map(img)
    if raw_flag == "on":  # data_file_raw: the data file itself is the disk
        _assert_bytes(data.read_bytes()[:size], model, "the raw data file")


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_write_to_cluster_0_written_by_qemu_only(
        tmp_path: Path, run: RunFn, qemu_img: str, qemu_io: str,
        make_image: Callable[..., Path], raw_flag: str) -> None:
    """The report's repro: qemu writes guest cluster 0 alone; diskimg reads it back and a
    partial write by diskimg keeps the rest of the cluster for qemu."""
    cs = 65536
    data = tmp_path / "d.raw"
    img = make_image("d.qcow2", "qcow2", 1 << 20, options={
        "data_file": str(data), "data_file_raw": raw_flag})
    run([qemu_io, "-f", "qcow2", "-c", f"write -P 0x5a 0 {cs}", img.name], cwd=tmp_path)
    model = bytearray(1 << 20)
    model[:cs] = b"\x5a" * cs
    # the write first: this asserts the write path alone (the old code zero-filled the
    # rest of the cluster in the data file, destroying qemu's data)
    with diskimg.open(img, "r+") as d:
        d.write(4096, b"\x01" * 512)
    model[4096 : 4096 + 512] = b"\x01" * 512
    _assert_bytes(QEMU.raw_bytes(img.name, cwd=img.parent), model, "qemu after diskimg's write")
    _assert_bytes(data.read_bytes()[:cs], model[:cs], "the data file")
    with diskimg.open(img) as d:
        _assert_bytes(d.read(0, 1 << 20), model, "diskimg")
    QEMU.check_clean(img.name, cwd=img.parent)


def test_commit_empties_a_data_file_top_without_touching_refcounts(
        tmp_path: Path, run: RunFn, qemu_img: str, qemu_io: str,
        make_image: Callable[..., Path]) -> None:
    """commit then empties the top (qemu's make_empty): its data clusters live in the data
    file and carry no refcount, so emptying must not drop references in the qcow2 file
    (the old code did, and left refcount 0 on the header and the tables)."""
    base = make_image("base.qcow2", "qcow2", 1 << 20)
    data = tmp_path / "top.raw"
    top = make_image("top.qcow2", "qcow2", 1 << 20, options={
        "cluster_size": "4096", "data_file": str(data), "backing_file": str(base),
        "backing_fmt": "qcow2"})
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 12k", "-c", "write -P 0x22 64k 4k",
         top.name], cwd=tmp_path)
    model = bytearray(1 << 20)
    model[: 12 << 10] = b"\x11" * (12 << 10)
    model[64 << 10 : 68 << 10] = b"\x22" * 4096
    run([sys.executable, "-m", "diskimg", "commit", top.name], cwd=tmp_path)
    QEMU.check_clean(top.name, cwd=top.parent)
    _assert_bytes(QEMU.raw_bytes(base.name, cwd=base.parent), model, "the base after commit")
    _assert_bytes(QEMU.raw_bytes(top.name, cwd=top.parent), model, "the emptied top")
    js, _ = _qemu_map(top)
    assert isinstance(js, list) and all(e["depth"] == 1 or not e["present"] for e in js)


def _l2_entry_offset(img: Path, cluster: int) -> int:
    """File offset of the standard L2 entry of guest ``cluster`` (first L2 table)."""
    from diskimg.qcow2.layout import Header

    raw = img.read_bytes()
    h = Header.parse(raw[:4096])
    l1 = int.from_bytes(raw[h.l1_table_offset : h.l1_table_offset + 8], "big")
    return (l1 & 0x00FFFFFFFFFFFE00) + 8 * cluster


def test_data_file_cluster_not_at_its_guest_offset_is_corrupt_like_qemu(
        tmp_path: Path, qemu_img: str, qemu_io: str, run: RunFn) -> None:
    """An L2 entry of a data-file image must map guest cluster k to data-file offset
    k * cluster_size.  Cluster 1 patched to COPIED|0x2000: qemu fails reads and map of it
    with EIO (marking a writable image corrupt), check finds nothing; diskimg read guest
    cluster 1 from offset 0x2000 (guest cluster 2's bytes) and wrote there."""
    import hashlib
    import shutil

    from diskimg.errors import CorruptImageError

    good = tmp_path / "good.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
         f"data_file={tmp_path / 'd.raw'},cluster_size=4096", good, "64k"])
    run([qemu_io, "-c", "write -P 0x11 0 8k", "-c", "write -P 0x22 8k 4k", good])
    ent = _l2_entry_offset(good, 1)
    buf = bytearray(good.read_bytes())
    buf[ent : ent + 8] = ((1 << 63) | 0x2000).to_bytes(8, "big")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(buf))
    data = (tmp_path / "d.raw").read_bytes()
    msg = ("External data file host cluster offset 0x2000 does not match guest cluster "
           "offset: 0x1000, L2 index: 0x1)")

    def fresh(name: str) -> Path:
        p = tmp_path / name
        shutil.copyfile(bad, p)
        return p

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    # qemu: read-only read fails, nothing changes; a writable read marks it corrupt
    q = fresh("q.qcow2")
    r = run([qemu_io, "-r", "-c", "read 4k 4k", q], check=False)
    assert "Input/output error" in r.stdout + r.stderr and msg in r.stderr
    assert sha(q) == sha(bad)
    run([qemu_io, "-c", "read 4k 4k", q], check=False)
    qemu_corrupt = json.loads(run([qemu_img, "info", "--output=json", "-U", q]).stdout)[
        "format-specific"]["data"]["corrupt"]
    assert qemu_corrupt is True

    # diskimg read-only: refused naming the entry, every byte unchanged
    p = fresh("p.qcow2")
    with diskimg.open(p) as d:
        assert d.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(CorruptImageError) as ei:
            d.read(4096, 4096)
        assert msg in str(ei.value) and ei.value.offset == ent
        with pytest.raises(CorruptImageError):
            list(d.map())
    assert sha(p) == sha(bad)
    assert (tmp_path / "d.raw").read_bytes() == data
    # diskimg writable read: marked corrupt as qemu marks it
    with diskimg.open(p, "r+") as d, pytest.raises(CorruptImageError):
        d.read(4096, 4096)
    info = json.loads(run([qemu_img, "info", "--output=json", "-U", p]).stdout)
    assert info["format-specific"]["data"]["corrupt"] is qemu_corrupt
    assert (tmp_path / "d.raw").read_bytes() == data

    # a write to the cluster is refused and leaves guest cluster 2 (offset 0x2000) alone
    for off, n in ((4096, 4096), (4096, 512), (5120, 512)):
        w = fresh("w.qcow2")
        with diskimg.open(w, "r+") as d, pytest.raises(CorruptImageError):
            d.write(off, b"\x33" * n)
        assert (tmp_path / "d.raw").read_bytes() == data
        r = run([qemu_io, "-r", "-c", "read -P 0x22 8k 4k", w])
        assert "Pattern verification failed" not in r.stdout

    # map and convert fail as qemu's do (exit 1), check reports what qemu-img check does
    m = fresh("m.qcow2")
    for args in (["map", m], ["map", "--output=json", m], ["convert", "-O", "raw", m,
                                                           tmp_path / "out.raw"]):
        want = run([qemu_img, *args], check=False)
        got = run([sys.executable, "-m", "diskimg", *args], check=False)
        assert (got.returncode, want.returncode) == (1, 1), got.stderr
        assert msg in got.stderr
    want = run([qemu_img, "check", m], check=False)
    got = run([sys.executable, "-m", "diskimg", "check", m], check=False)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert sha(m) == sha(bad)
    assert (tmp_path / "d.raw").read_bytes() == data


def test_commit_deallocates_the_data_file_clusters_of_the_top_like_qemu(
        tmp_path: Path, run: RunFn, qemu_img: str, qemu_io: str) -> None:
    """qemu-img commit empties a top with a data file by a full discard, which also
    deallocates the top's clusters in its data file (``du top.raw`` is 0 after); diskimg
    cleared the L2 entries but left the blocks allocated.  Same images, both tools: the
    data file, the top, the base and the maps must come out identical."""
    q, d = tmp_path / "q", tmp_path / "d"
    for where in (q, d):  # built twice: a copy would not keep the data file sparse
        where.mkdir()
        run([qemu_img, "create", "-q", "-f", "qcow2", where / "base.qcow2", "1M"])
        run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "-o", "data_file=top.raw,cluster_size=4096", "top.qcow2"], cwd=where)
        run([qemu_io, "-c", "write -P 0x11 0 12k", "-c", "write -P 0x22 64k 4k",
             "-c", "write -P 0x33 80k 4k", "-c", "write -z 80k 4k", "top.qcow2"], cwd=where)
        assert (where / "top.raw").stat().st_blocks > 0
    run([qemu_img, "commit", "top.qcow2"], cwd=q)
    run([sys.executable, "-m", "diskimg", "commit", "top.qcow2"], cwd=d)
    assert (q / "top.raw").stat().st_blocks == 0
    assert (d / "top.raw").stat().st_blocks == 0
    for name in ("top.raw", "top.qcow2"):
        assert (d / name).read_bytes() == (q / name).read_bytes(), name
    # the base: same guest bytes (qemu's commit job allocates its clusters in another order)
    run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", q / "base.qcow2",
         d / "base.qcow2"])
    assert (run([qemu_img, "check", "top.qcow2"], cwd=d).stdout
            == run([qemu_img, "check", "top.qcow2"], cwd=q).stdout)
    QEMU.check_clean("base.qcow2", cwd=d)

    def top_map(where: Path) -> list[tuple[int, bool, bool]]:
        """(guest offset, present, data) per byte run, split at every 4 KiB."""
        js = json.loads(run([qemu_img, "map", "--output=json", "top.qcow2"],
                            cwd=where).stdout)
        assert all(e["depth"] == 1 or not e["present"] for e in js)
        return [(p, e["present"], e["data"]) for e in js
                for p in range(e["start"], e["start"] + e["length"], 4096)]

    assert top_map(d) == top_map(q)
