"""qcow2 check/repair (diskimg.qcow2.check) against qemu-img 7.2 as the oracle.

Each scenario builds an image with qemu-img/qemu-io, corrupts it with struct patches, then
checks two copies -- one with ``qemu-img check``, one with ``check_image`` -- and compares
the JSON (minus ``findings``), stdout, stderr, exit code and, after a repair, the bytes of
the repaired files and the guest data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from qemukit import QEMU

from diskimg.errors import DiskImgError
from diskimg.hostio import open_host_file
from diskimg.qcow2.check import CheckResult, check_image
from diskimg.qcow2.layout import Header
from diskimg.qcow2.refcount import decode_refblock, encode_refblock

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")

L1_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


# --- helpers ---------------------------------------------------------------------------
def mkimg(path: Path, size: str = "1M", opts: str = "", writes: tuple[str, ...] = (),
          extra: tuple[str, ...] = ()) -> Path:
    QEMU.img("create", "-f", "qcow2", *(["-o", opts] if opts else []), *extra, path, size)
    if writes:
        QEMU.io(path, *writes, fmt=None)
    return path


def rd(p: Path, off: int, n: int) -> bytes:
    with open(p, "rb") as f:
        f.seek(off)
        return f.read(n)


def wr(p: Path, off: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


def u64(p: Path, off: int) -> int:
    return struct.unpack(">Q", rd(p, off, 8))[0]


def put64(p: Path, off: int, v: int) -> None:
    wr(p, off, struct.pack(">Q", v))


def hdr(p: Path) -> Header:
    return Header.parse(rd(p, 0, 1 << 16), None)


def l1_off(p: Path, i: int = 0) -> int:
    return hdr(p).l1_table_offset + 8 * i


def l2_off(p: Path, j: int, i: int = 0, esz: int = 8) -> int:
    return (u64(p, l1_off(p, i)) & L1_MASK) + esz * j


def refblock0(p: Path) -> int:
    return u64(p, hdr(p).refcount_table_offset)


def set_ref16(p: Path, cluster: int, value: int) -> None:
    wr(p, refblock0(p) + 2 * cluster, struct.pack(">H", value))


def mine(path: Path, repair: str | None = None) -> CheckResult:
    with open_host_file(path, writable=repair is not None, lock_mode=False) as h:
        header = Header.parse(h.pread(0, 1 << 21), None)
        return check_image(h, header, repair)


def qemu_check(path: Path, repair: str | None, as_json: bool) -> tuple[int, str, str]:
    p = QEMU.img("check", *(["-r", repair] if repair else []),
                 *(["--output=json"] if as_json else []), path, ok=None)
    return p.returncode, p.stdout, p.stderr


def raw_digest(path: Path) -> str | None:
    """sha256 of the guest data per qemu-img convert, None if qemu cannot read it."""
    out = path.with_suffix(".raw")
    p = QEMU.img("convert", "-U", "-f", "qcow2", "-O", "raw", path, out, ok=None)
    if p.returncode:
        return None
    d = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return d


def assert_parity(src: Path, repair: str | None, *, same_bytes: bool = True) -> CheckResult:
    """Compare qemu-img check and check_image on copies of ``src`` (human and JSON)."""
    q = src.with_name("q_" + src.name)
    m = src.with_name("m_" + src.name)
    result = None
    for as_json in (False, True):
        shutil.copy(src, q)
        shutil.copy(src, m)
        rc, out, err = qemu_check(q, repair, as_json)
        r = mine(m, repair)
        result = r
        assert r.exit_code == rc
        if as_json:
            got = r.to_json()
            assert isinstance(got.pop("findings"), list)
            if out.strip():
                exp = json.loads(out)
                got["filename"] = exp["filename"]
                assert got == exp
            else:
                assert r.failure_message and r.failure_message.startswith("Check failed")
        else:
            assert r.summary_lines() == out.splitlines()
            exp_err = [line.replace("qemu-img", "diskimg") for line in err.splitlines()]
            got_err = ((r.repair_messages if r.repaired else []) + r.messages
                       + ([f"diskimg: {r.failure_message}"] if r.failure_message else []))
            assert got_err == exp_err
            # human_lines() = stderr and stdout in logical order
            assert sorted(r.human_lines()) == sorted(got_err + r.summary_lines())
        if repair and same_bytes:
            assert q.read_bytes() == m.read_bytes()
    assert result is not None
    return result


# --- scenarios -------------------------------------------------------------------------
def _base(d: Path, name: str = "base.qcow2", opts: str = "") -> Path:
    return mkimg(d / name, opts=opts, writes=("write -P 1 0 64k", "write -P 2 128k 64k",
                                              "write -P 3 512k 128k"))


def sc_clean(d: Path) -> Path:
    return _base(d)


def sc_leak(d: Path) -> Path:
    p = _base(d)
    set_ref16(p, 4, 2)  # the L2 table: leak + OFLAG_COPIED corruption
    return p


def sc_leak_many(d: Path) -> Path:
    p = _base(d)
    for c in (3, 5, 6):
        set_ref16(p, c, 3)
    return p


def sc_zero_ref(d: Path) -> Path:
    p = _base(d)
    set_ref16(p, 5, 0)  # data cluster: two corruptions, needs a rebuild
    return p


def sc_oflag_l2(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 0), u64(p, l2_off(p, 0)) & ~COPIED)
    return p


def sc_oflag_l1(d: Path) -> Path:
    p = _base(d)
    put64(p, l1_off(p), u64(p, l1_off(p)) & ~COPIED)
    return p


def sc_l2_unaligned(d: Path) -> Path:
    p = _base(d)
    put64(p, l1_off(p), u64(p, l1_off(p)) + 0x200)
    return p


def sc_l2_past_eof(d: Path) -> Path:
    p = _base(d)
    put64(p, l1_off(p), COPIED | (1 << 40))
    return p


def sc_data_unaligned(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 2), u64(p, l2_off(p, 2)) + 0x200)
    return p


def sc_data_past_eof(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 2), COPIED | (1 << 36))
    return p


def sc_zero_unaligned(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 2), (u64(p, l2_off(p, 2)) + 0x200) | 1)
    return p


def sc_reserved_bits(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 2), u64(p, l2_off(p, 2)) | 0x4)
    put64(p, l1_off(p), u64(p, l1_off(p)) | 0x1)
    return p


def sc_reftable_past_eof(d: Path) -> Path:
    p = _base(d)
    put64(p, 48, 1 << 30)
    return p


def sc_refblock_unaligned(d: Path) -> Path:
    p = _base(d)
    put64(p, hdr(p).refcount_table_offset, refblock0(p) + 0x200)
    return p


def sc_refblock_past_eof(d: Path) -> Path:
    p = _base(d)
    put64(p, hdr(p).refcount_table_offset, 1 << 24)
    return p


def sc_l2_on_l1(d: Path) -> Path:
    p = _base(d)
    put64(p, l1_off(p), COPIED | hdr(p).l1_table_offset)
    return p


def sc_data_on_reftable(d: Path) -> Path:
    p = _base(d)
    put64(p, l2_off(p, 2), COPIED | hdr(p).refcount_table_offset)
    return p


def sc_v2_zero(d: Path) -> Path:
    p = mkimg(d / "v2.qcow2", opts="compat=0.10", writes=("write -P 1 0 64k",))
    set_ref16(p, 4, 0)
    return p


def sc_c512_leak(d: Path) -> Path:
    p = mkimg(d / "c512.qcow2", opts="cluster_size=512",
              writes=("write -P 1 0 8k", "write -P 2 100k 3k"))
    set_ref16(p, 7, 5)
    return p


def sc_r64_zero(d: Path) -> Path:
    p = mkimg(d / "r64.qcow2", opts="cluster_size=4096,refcount_bits=64",
              writes=("write -P 1 0 8k", "write -P 2 100k 3k"))
    wr(p, refblock0(p) + 8 * 5, bytes(8))
    return p


def sc_r1_zero(d: Path) -> Path:
    p = mkimg(d / "r1.qcow2", opts="cluster_size=4096,refcount_bits=1",
              writes=("write -P 1 0 8k",))
    wr(p, refblock0(p), bytes([0x3F]))
    return p


def sc_r1_overflow(d: Path) -> Path:
    p = mkimg(d / "ovf.qcow2", opts="refcount_bits=1", writes=("write 0 64k",))
    put64(p, l2_off(p, 1), u64(p, l2_off(p, 0)))
    return p


def sc_extl2_zero(d: Path) -> Path:
    p = mkimg(d / "extl2.qcow2", opts="extended_l2=on",
              writes=("write -P 1 0 4k", "write -P 2 64k 64k", "write -z 200k 8k"))
    set_ref16(p, 5, 0)
    return p


def sc_compressed_zero(d: Path) -> Path:
    p = mkimg(d / "comp.qcow2", writes=("write -c -P 5 0 64k", "write -c -P 6 64k 64k",
                                        "write -P 7 300k 4k"))
    set_ref16(p, 5, 0)
    return p


def sc_snapshot_leak(d: Path) -> Path:
    p = mkimg(d / "snap.qcow2", writes=("write -P 1 0 64k", "write -P 2 64k 64k"))
    QEMU.img("snapshot", "-c", "s1", p)
    QEMU.io(p, "write -P 3 0 64k", fmt=None)
    set_ref16(p, 6, 3)  # shared cluster: refcount 2 expected
    return p


def sc_snapshot_low(d: Path) -> Path:
    p = sc_snapshot_leak(d)
    set_ref16(p, 6, 1)
    return p


def sc_snapshot_l1_unaligned(d: Path) -> Path:
    p = sc_snapshot_leak(d)
    set_ref16(p, 6, 2)
    so = hdr(p).snapshots_offset
    put64(p, so, u64(p, so) + 8)
    return p


def sc_backing_leak(d: Path) -> Path:
    mkimg(d / "back.qcow2", writes=("write -P 1 0 64k",))
    p = mkimg(d / "over.qcow2", extra=("-b", "back.qcow2", "-F", "qcow2"),
              writes=("write -P 4 64k 4k",))
    set_ref16(p, 6, 1)
    return p


def sc_dirty_lazy(d: Path) -> Path:
    p = mkimg(d / "lazy.qcow2", opts="lazy_refcounts=on")
    QEMU.io(p, "write -P 0x33 0 64k", "write -P 0x44 128k 64k", "flush", "sigraise 9",
            fmt=None, ok=None)  # killed on purpose: the image stays dirty
    assert u64(p, 72) & 1, "image should be left dirty"
    return p


def sc_compressed_copied(d: Path) -> Path:
    p = mkimg(d / "cc.qcow2", writes=("write -c -P 1 0 64k", "write -c -P 2 64k 64k"))
    put64(p, l2_off(p, 1), u64(p, l2_off(p, 1)) | COPIED)
    set_ref16(p, 5, 7)
    return p


def sc_extl2_unaligned_zero(d: Path) -> Path:
    p = mkimg(d / "exz.qcow2", opts="extended_l2=on",
              writes=("write -P 1 0 64k", "write -z 64k 64k"))
    wr(p, l2_off(p, 1, esz=16), struct.pack(">QQ", COPIED | 0x50200, 0xFFFF0000))
    wr(p, l2_off(p, 0, esz=16) + 8, struct.pack(">Q", 0x1_00000001))
    return p


def sc_leak_at_end(d: Path) -> Path:
    p = mkimg(d / "end.qcow2", writes=("write 0 64k",))
    set_ref16(p, 6, 1)
    with open(p, "r+b") as f:
        f.truncate(7 * 65536)
    return p


SCENARIOS = [sc_clean, sc_leak, sc_leak_many, sc_zero_ref, sc_oflag_l2, sc_oflag_l1,
             sc_l2_unaligned, sc_l2_past_eof, sc_data_unaligned, sc_data_past_eof,
             sc_zero_unaligned, sc_reserved_bits, sc_reftable_past_eof,
             sc_refblock_unaligned, sc_refblock_past_eof, sc_l2_on_l1, sc_data_on_reftable,
             sc_v2_zero, sc_c512_leak, sc_r64_zero, sc_r1_zero, sc_r1_overflow,
             sc_extl2_zero, sc_compressed_zero, sc_snapshot_leak, sc_snapshot_low,
             sc_snapshot_l1_unaligned, sc_backing_leak, sc_dirty_lazy, sc_compressed_copied,
             sc_extl2_unaligned_zero, sc_leak_at_end]


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__[3:] for s in SCENARIOS])
def test_parity_with_qemu(tmp_path: Path, scenario) -> None:
    src = scenario(tmp_path)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert_parity(src, None)
    # a plain check never writes
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert hashlib.sha256((tmp_path / ("m_" + src.name)).read_bytes()).hexdigest() == before
    for mode in ("leaks", "all"):
        keeps_dirty = scenario is sc_dirty_lazy and mode == "leaks"
        r = assert_parity(src, mode, same_bytes=not keeps_dirty)
        if keeps_dirty:
            # qemu marks the image clean although its refcounts still need a rebuild;
            # diskimg keeps the dirty bit (byte 79) so the next read-write open rebuilds
            # them (compatibility.md).  Every other byte is qemu's.
            q, m = (bytearray((tmp_path / (w + src.name)).read_bytes()) for w in ("q_", "m_"))
            assert (q[79], m[79]) == (0, 1)
            m[79] = 0
            assert q == m
        if r.exit_code == 0:
            m = tmp_path / ("m_" + src.name)
            rc, _, err = qemu_check(m, None, False)
            assert rc == 0, err
            orig = raw_digest(src)
            if orig is not None:
                assert raw_digest(m) == orig


@pytest.mark.qemu
@needs_qemu
def test_dirty_lazy_refcounts_repair(tmp_path: Path) -> None:
    src = sc_dirty_lazy(tmp_path)
    r = mine(src)
    assert r.corruptions == 4 and r.exit_code == 2
    assert any("OFLAG_COPIED data cluster" in m for m in r.messages)
    r = mine(src, "all")
    assert r.exit_code == 0 and r.corruptions_fixed == 2 and r.repaired
    assert not u64(src, 72) & 1  # dirty bit cleared
    QEMU.io(src, "read -P 0x33 0 64k", "read -P 0x44 128k 64k", fmt=None, ok=None)


@pytest.mark.qemu
@needs_qemu
def test_findings_and_human_lines(tmp_path: Path) -> None:
    src = sc_zero_ref(tmp_path)
    r = mine(src)
    kinds = {f["kind"] for f in r.findings}
    assert {"refcount-too-low", "oflag-copied"} <= kinds
    oflag = next(f for f in r.findings if f["kind"] == "oflag-copied")
    assert oflag["guest_offset"] == 0 and oflag["repaired"] is False
    assert r.human_lines()[:2] == ["ERROR cluster 5 refcount=0 reference=1",
                                   "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000"
                                   " refcount=0"]
    assert "2 errors were found on the image." in r.human_lines()
    r = mine(src, "all")
    lines = r.human_lines()
    assert lines.index("Rebuilding refcount structure") < lines.index(
        "Double checking the fixed image now...")
    assert all(f["repaired"] for f in r.findings if f["kind"] == "leak")


@pytest.mark.qemu
@needs_qemu
def test_leaks_mode_refuses_rebuild(tmp_path: Path) -> None:
    src = sc_zero_ref(tmp_path)
    r = mine(src, "leaks")
    assert r.exit_code == 1 and r.error == "Input/output error"
    assert r.messages[-1] == "ERROR need to rebuild refcount structures"
    assert r.summary_lines() == []


# --- hostile input ---------------------------------------------------------------------
@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("patch", [
    ("l1_size", 36, struct.pack(">I", 0x400000)),          # L1 past EOF (32 MiB, capped)
    ("l1_offset", 40, struct.pack(">Q", 1 << 40)),
    ("snap_l1_size", None, struct.pack(">I", 0x7FFFFFFF)),
    ("snap_extra", None, struct.pack(">I", 0xFFFFFFFF)),
    ("snap_offset_unaligned", 64, struct.pack(">Q", 0x80008)),
    ("rt_clusters", 56, struct.pack(">I", 0x100000)),
])
def test_hostile_never_tracebacks(tmp_path: Path, patch) -> None:
    name, off, data = patch
    p = sc_snapshot_leak(tmp_path)
    set_ref16(p, 6, 2)
    so = hdr(p).snapshots_offset
    if name == "snap_l1_size":
        off = so + 8
    elif name == "snap_extra":
        off = so + 36
    wr(p, off, data)
    try:
        header = Header.parse(rd(p, 0, 1 << 16), None)
    except DiskImgError as exc:
        assert str(exc)
        return
    for repair in (None, "all"):
        q = tmp_path / f"h_{repair}.qcow2"
        shutil.copy(p, q)
        try:
            with open_host_file(q, writable=repair is not None, lock_mode=False) as h:
                r = check_image(h, header, repair)
        except DiskImgError as exc:
            assert str(exc)
            continue
        assert r.exit_code in (0, 1, 2, 3)
        json.dumps(r.to_json())


# --- pure unit tests -------------------------------------------------------------------
def test_json_conditional_keys() -> None:
    r = CheckResult(filename="x", image_end_offset=458752, total_clusters=16,
                    allocated_clusters=2)
    j = r.to_json()
    assert set(j) == {"filename", "format", "check-errors", "image-end-offset",
                      "total-clusters", "allocated-clusters", "findings"}
    assert r.exit_code == 0
    r.leaks, r.corruptions, r.compressed_clusters = 1, 2, 1
    assert {"leaks", "corruptions", "compressed-clusters"} <= set(r.to_json())
    assert r.exit_code == 2
    r.corruptions = 0
    assert r.exit_code == 3
    r.check_errors = 1
    assert r.exit_code == 1 and r.failure_message == "Check failed"


def test_summary_text() -> None:
    r = CheckResult(filename="x", leaks=1, corruptions=1, image_end_offset=458752,
                    total_clusters=16, allocated_clusters=2)
    assert r.summary_lines() == [
        "", "1 errors were found on the image.",
        "Data may be corrupted, or further writes to the image may corrupt it.",
        "", "1 leaked clusters were found on the image.",
        "This means waste of disk space, but no harm to data.",
        "2/16 = 12.50% allocated, 0.00% fragmented, 0.00% compressed clusters",
        "Image end offset: 458752"]


@pytest.mark.parametrize("order", range(7))
def test_refblock_codec_roundtrip(order: int) -> None:
    bits = 1 << order
    cs = 512
    entries = cs * 8 // bits
    raw = bytes((i * 37 + 11) & 0xFF for i in range(cs))
    vals = decode_refblock(raw, order)
    assert len(vals) == entries
    assert encode_refblock(vals, order) == raw
    if bits < 8:  # sub-byte refcounts are packed LSB first
        assert vals[0] == raw[0] & ((1 << bits) - 1)


@needs_qemu
@pytest.mark.parametrize("index, flagged", [(0, True), (1, True), (511, True), (511, False),
                                            (256, False)])
def test_an_entry_anywhere_in_a_sparse_l2_table(tmp_path: Path, index: int,
                                                flagged: bool) -> None:
    """A plain L2 table is tested up to its last non-zero entry only (walk._plain_hosts):
    an entry with a reserved bit set first, second or last in the table is reported as
    qemu-img reports it, and a table whose entries end at the last slot, or the middle
    one, is counted as qemu-img counts it (4 KiB clusters: 512 entries a table)."""
    writes = tuple(f"write -P 0x5a {i * 4096} 4k" for i in sorted({0, index}))
    p = mkimg(tmp_path / "a.qcow2", "4M", "cluster_size=4096", writes)
    if flagged:
        put64(p, l2_off(p, index), u64(p, l2_off(p, index)) | 0x2)  # bit 1: reserved
    r = assert_parity(p, None)
    assert (r.exit_code, r.corruptions) == ((2, 1) if flagged else (0, 0))
    assert r.allocated_clusters == len({0, index})


@needs_qemu
@pytest.mark.parametrize("case", ["copied-flag-alone", "reverse-order", "512-byte-clusters"])
def test_plain_table_edges(tmp_path: Path, case: str) -> None:
    """The plain-table path's edges, as qemu-img checks them: an entry that is COPIED and
    nothing else (no host offset: qemu reads it as unallocated), data written in
    reverse guest order (fragments counted between neighbouring entries), and 512-byte
    clusters, whose L2 tables point into several refcount blocks (256 refcounts each)."""
    p = tmp_path / "a.qcow2"
    if case == "copied-flag-alone":
        mkimg(p, "4M", "cluster_size=4096", ("write -P 0x41 0 4k", "write -P 0x42 8k 4k"))
        put64(p, l2_off(p, 5), COPIED)
    elif case == "reverse-order":
        mkimg(p, "4M", "cluster_size=4096",
              tuple(f"write -P {i + 1} {i * 4096} 4k" for i in (7, 5, 4, 3, 0)))
    else:
        mkimg(p, "1M", "cluster_size=512", ("write -P 0x33 0 256k",))
    r = assert_parity(p, None)
    want = {"copied-flag-alone": (0, 2, 0), "reverse-order": (0, 5, 4),
            "512-byte-clusters": (0, 512, 0)}[case]
    assert (r.exit_code, r.allocated_clusters, r.fragmented_clusters) == want
    if case == "copied-flag-alone":
        assert_parity(p, "all")  # the repaired bytes equal qemu-img's
