"""qcow2 open and check behaviours QEMU's own iotests expect (issue 17 item 7), each
against qemu-img 7.2 on a separate copy of the same input: the same stdout, stderr (with
the program name swapped), exit code and resulting bytes.

- a dirty lazy-refcounts image (iotest 039) is checked as it is by ``check`` and
  ``check -r``; every other read-write open repairs it first;
- the Backing-format header extension given twice: the last one wins;
- a zlib image with incompatible bit 3 set is refused;
- unknown incompatible features are named from the feature-name table (iotest 036);
  unknown autoclear and compatible bits;
- ``check -r all`` of a snapshot table with oversized entries or too many of them
  (iotest 261).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import FormatError
from diskimg.hostio import open_host_file
from diskimg.qcow2 import header_io
from diskimg.qcow2.layout import (FEATURE_NAMES, QCOW2_EXT_MAGIC_BACKING_FORMAT,
                                  QCOW2_EXT_MAGIC_FEATURE_TABLE, Extension, Header,
                                  pack_feature_table)
from diskimg.qcow2.refcount import Refcounts
from diskimg.qcow2.snapshot_table import Snapshot, read_entries
from tests.cli.conftest import Result, di, needs_qemu  # di: diskimg ARGS in-process

__all__ = ["di"]  # the fixture, imported for this module's tests

pytestmark = [pytest.mark.qemu, needs_qemu]

IMG = "t.qcow2"
DI = Callable[..., Result]


def _pair(tmp_path: Path, src: Path) -> tuple[Path, Path]:
    """Copies of ``src`` named alike in q/ (for qemu) and d/ (for diskimg), with holes
    where ``src`` has zeros (a 64 MiB snapshot table is mostly holes)."""
    data = src.read_bytes()
    out = []
    for who in ("q", "d"):
        (tmp_path / who).mkdir(exist_ok=True)
        out.append(tmp_path / who / IMG)
        with out[-1].open("wb") as f:
            for pos in range(0, len(data), 1 << 20):
                piece = data[pos:pos + (1 << 20)]
                if piece.count(0) < len(piece):
                    f.seek(pos)
                    f.write(piece)
            f.truncate(len(data))
    return out[0], out[1]


def _both(di: DI, tmp_path: Path, *args: str) -> tuple[Result, Result]:
    """``qemu-img ARGS`` in q/ and ``diskimg ARGS`` in d/; qemu's result, ours."""
    q = QEMU.img(*args, ok=None, cwd=tmp_path / "q")
    d = di(*args, cwd=tmp_path / "d")
    return Result(q.returncode, q.stdout, q.stderr), d


def _same(di: DI, tmp_path: Path, *args: str) -> Result:
    """Run ARGS with both tools and assert the same exit code, stdout and stderr (where
    qemu-img names itself, diskimg does)."""
    want, got = _both(di, tmp_path, *args)
    assert (got.rc, got.out, got.err.replace("diskimg", "qemu-img")) == \
        (want.rc, want.out, want.err)
    return got


def _bytes(tmp_path: Path) -> tuple[bytes, bytes]:
    return (tmp_path / "q" / IMG).read_bytes(), (tmp_path / "d" / IMG).read_bytes()


def _info(tmp_path: Path, who: str) -> dict[str, object]:
    info: dict[str, object] = QEMU.info(IMG, "-U", cwd=tmp_path / who)
    info.pop("actual-size")
    return info


# --- 1. dirty lazy refcounts (iotest 039) -------------------------------------------------
def _dirty_lazy(tmp_path: Path) -> Path:
    """A lazy-refcounts image whose writer was killed: dirty bit set, the refcount of the
    data cluster still 0."""
    p = tmp_path / "dirty.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", p, "64M")
    QEMU.io(p, "write -P 0x5a 0 512", "write -P 0xa5 1M 64k", "sigraise 9", ok=None)
    assert p.read_bytes()[79] & 1, "qemu-io should leave the image dirty"
    return p


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_dirty_lazy_refcounts_checked_as_it_is(di: DI, tmp_path: Path, repair: str | None) -> None:
    q, d = _pair(tmp_path, _dirty_lazy(tmp_path))
    before = d.read_bytes()
    _same(di, tmp_path, "info", IMG)
    _same(di, tmp_path, "info", "--output=json", IMG)
    opt = ["-r", repair] if repair else []
    got = _same(di, tmp_path, "check", *opt, IMG)
    assert "ERROR cluster 5 refcount=0 reference=1" in got.err
    qb, db = _bytes(tmp_path)
    if repair is None:
        assert got.rc == 2 and db == before == qb  # a plain check writes nothing
    elif repair == "leaks":
        # a rebuild is needed, which -r leaks may not do: qemu then marks the image clean
        # all the same; diskimg keeps the dirty bit (byte 79) for the next read-write open
        assert got.rc == 1 and "ERROR need to rebuild refcount structures" in got.err
        assert (qb[79], db[79]) == (0, 1)
        assert qb[:79] + qb[80:] == db[:79] + db[80:]
        _same(di, tmp_path, "check", IMG)  # the refcounts are still stale in both
    else:
        assert got.rc == 0 and "Rebuilding refcount structure" in got.err
        assert "The following inconsistencies were found and repaired" in got.out
        assert qb == db and not db[79] & 1
        QEMU.check_clean(d)
        assert QEMU.compare(q, d) == 0
    if repair != "leaks":
        assert _info(tmp_path, "q") == _info(tmp_path, "d")


def test_dirty_lazy_refcounts_repaired_on_other_read_write_opens(
        di: DI, tmp_path: Path) -> None:
    """amend opens read-write (not for check): the image is repaired first, as qemu does,
    then amended; the same bytes as qemu's."""
    q, d = _pair(tmp_path, _dirty_lazy(tmp_path))
    want, got = _both(di, tmp_path, "amend", "-o", "lazy_refcounts=off", IMG)
    assert (got.rc, got.out, want.rc) == (0, "", 0)
    qb, db = _bytes(tmp_path)
    assert qb == db and not db[79] & 1
    QEMU.check_clean(d)
    assert QEMU.io(d, "read -P 0x5a 0 512", "read -P 0xa5 1M 64k").returncode == 0


# --- 2. the Backing-format extension given twice ------------------------------------------
def test_backing_format_extension_twice_the_last_wins(di: DI, tmp_path: Path) -> None:
    """The header names the raw backing file twice, first as qcow2 then as raw: qemu
    reads each extension into one field, so raw wins (and is all a header rewrite keeps)."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * 4096)
    src = tmp_path / "src.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", src, "1M",
             cwd=tmp_path)
    QEMU.io(src, "write -P 0x77 64k 4k")
    buf = bytearray(src.read_bytes())
    h = Header.parse(bytes(buf[:65536]))
    assert [e.type for e in h.extensions] == [QCOW2_EXT_MAGIC_BACKING_FORMAT,
                                              QCOW2_EXT_MAGIC_FEATURE_TABLE]
    h.extensions.insert(0, Extension(QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2"))
    packed = h.pack()  # the one header codec writes both extensions as they are
    buf[:len(packed)] = packed
    src.write_bytes(buf)
    q, d = _pair(tmp_path, src)
    for who in ("q", "d"):
        shutil.copyfile(base, tmp_path / who / "base.raw")
    got = _same(di, tmp_path, "info", IMG)
    assert "backing file format: raw" in got.out
    _same(di, tmp_path, "info", "--output=json", IMG)
    _same(di, tmp_path, "map", "--output=json", IMG)
    _same(di, tmp_path, "convert", "-O", "raw", IMG, "out.raw")
    want = (tmp_path / "q" / "out.raw").read_bytes()
    assert (tmp_path / "d" / "out.raw").read_bytes() == want
    assert want[65536:69632] == b"\x77" * 4096 and want[:65536] == base.read_bytes()[:65536]
    # a header rewrite keeps the extension once, with the last one's data
    _same(di, tmp_path, "rebase", "-u", "-b", "base.raw", "-F", "raw", IMG)
    qb, db = _bytes(tmp_path)
    assert qb == db and qb.count(b"qcow2\0") == 0


# --- 3. compression type and incompatible bit 3 -------------------------------------------
def _plain(tmp_path: Path, *opts: str) -> Path:
    """A qemu-made 1 MiB v3 image with some data."""
    p = tmp_path / "plain.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", *opts, p, "1M")
    QEMU.io(p, "write -P 0x3c 0 64k")
    return p


def _poke(p: Path, offset: int, data: bytes) -> None:
    buf = bytearray(p.read_bytes())
    buf[offset:offset + len(data)] = data
    p.write_bytes(buf)


ALL_COMMANDS = (["info", "--output=json", IMG], ["check", IMG], ["check", "-r", "all", IMG],
                ["map", IMG], ["convert", "-O", "raw", IMG, "out.raw"],
                ["amend", "-o", "size=2M", IMG])
SOME_COMMANDS = (["info", IMG], ["check", "-r", "all", IMG],
                 ["convert", "-O", "raw", IMG, "out.raw"])


def _refused_alike(di: DI, tmp_path: Path, src: Path, message: str,
                   commands: tuple[list[str], ...] = SOME_COMMANDS) -> None:
    """Each command refuses ``src`` with qemu's words, and neither tool writes a byte."""
    q, d = _pair(tmp_path, src)
    before = src.read_bytes()
    for args in commands:
        got = _same(di, tmp_path, *args)
        assert (got.rc, got.err) == (1, f"diskimg: Could not open '{IMG}': {message}\n")
    assert q.read_bytes() == before == d.read_bytes()
    assert not (tmp_path / "d" / "out.raw").exists()


@pytest.mark.parametrize(("opts", "poke", "message"), [
    ([], {79: 0x08}, "qcow2: Compression type incompatible feature bit must not be set"),
    ([], {79: 0x08, 103: 104}, "qcow2: Compression type incompatible feature bit must not be set"),
    (["-o", "compression_type=zstd"], {79: 0x00},
     "qcow2: Compression type incompatible feature bit must be set"),
    (["-o", "compression_type=zstd"], {104: 7}, "qcow2: unknown compression type: 7"),
], ids=["zlib-bit3", "no-field-bit3", "zstd-no-bit3", "type7"])
def test_compression_type_and_bit_3_refused_as_qemu(
        di: DI, tmp_path: Path, opts: list[str], poke: dict[int, int], message: str) -> None:
    src = _plain(tmp_path, *opts)
    for off, val in poke.items():
        _poke(src, off, bytes([val]))
    _refused_alike(di, tmp_path, src, message, ALL_COMMANDS if poke == {79: 8} else SOME_COMMANDS)


# --- 4. unknown feature bits (iotest 036) --------------------------------------------------
def _with_feature_table(src: Path, names: list[tuple[int, int, bytes]]) -> None:
    """Replace the feature-name table extension of ``src`` (the one header codec)."""
    buf = bytearray(src.read_bytes())
    h = Header.parse(bytes(buf[:65536]))
    h.set_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, pack_feature_table(names))
    packed = h.pack()
    buf[:len(packed)] = packed
    src.write_bytes(buf)


@pytest.mark.parametrize(("bits", "table", "message"), [
    (0xE000000000000000, [*FEATURE_NAMES, (0, 63, b"Test feature")],
     "Test feature, Unknown incompatible feature: 6000000000000000"),
    (1 << 63, None, "Unknown incompatible feature: 8000000000000000"),
    ((1 << 40) | (1 << 5) | 1, [(0, 40, b"forty"), (1, 5, b"compat five"), (0, 0, b"dirty"),
                                (0, 5, b"five")], "forty, five"),
], ids=["named-and-unknown", "no-table", "table-order"])
def test_unknown_incompatible_features_named_from_the_table(
        di: DI, tmp_path: Path, bits: int, table: list[tuple[int, int, bytes]] | None,
        message: str) -> None:
    src = _plain(tmp_path)
    if table is not None:
        _with_feature_table(src, table)
    _poke(src, 72, struct.pack(">Q", bits))
    _refused_alike(di, tmp_path, src, f"Unsupported qcow2 feature(s): {message}",
                   ALL_COMMANDS if table and len(table) > 4 else SOME_COMMANDS)


def test_a_feature_name_that_is_not_utf8_is_printed_as_its_bytes(tmp_path: Path) -> None:
    """qemu prints a feature-table name as the C string it is: diskimg too (it used to
    print U+FFFD's bytes for a byte that is not UTF-8), and the refusal writes nothing."""
    src = _plain(tmp_path)
    _with_feature_table(src, [(0, 40, b"caf\xc3\xa9 \xff")])
    _poke(src, 72, struct.pack(">Q", 1 << 40))
    before = src.read_bytes()
    want = subprocess.run(["qemu-img", "info", src], capture_output=True).stderr
    got = subprocess.run([sys.executable, "-m", "diskimg", "info", src],
                         capture_output=True).stderr
    assert want.endswith(b"Unsupported qcow2 feature(s): caf\xc3\xa9 \xff\n")
    assert got.replace(b"diskimg", b"qemu-img") == want
    assert src.read_bytes() == before


def test_unknown_autoclear_and_compatible_bits(di: DI, tmp_path: Path) -> None:
    """Unknown compatible bits are ignored and kept; unknown autoclear bits are kept by
    read-only commands and cleared by a repair (and any change), as qemu clears them."""
    src = _plain(tmp_path)
    _poke(src, 80, struct.pack(">QQ", 1 << 50, (1 << 63) | (1 << 40)))
    q, d = _pair(tmp_path, src)
    before = src.read_bytes()
    _same(di, tmp_path, "info", IMG)
    _same(di, tmp_path, "info", "--output=json", IMG)
    _same(di, tmp_path, "check", IMG)
    _same(di, tmp_path, "map", "--output=json", IMG)
    assert q.read_bytes() == before == d.read_bytes()
    got = _same(di, tmp_path, "check", "-r", "all", IMG)
    assert got.rc == 0
    qb, db = _bytes(tmp_path)
    assert qb == db
    assert struct.unpack(">QQ", db[80:96]) == (1 << 50, 0)
    assert db[96:] == before[96:]
    QEMU.check_clean(d)
    assert QEMU.compare(q, d) == 0


# --- 5. snapshot tables check -r all trims (iotest 261) -----------------------------------
def _install_table(img: Path, snaps: list[Snapshot], at: int | None = None) -> None:
    """Write ``snaps`` as the snapshot table of ``img`` at ``at`` (the clusters there
    already in use) or in new clusters (refcounted), the zero runs of the entries left as
    holes, and point the header at it."""
    entries = [s.pack() for s in snaps]
    total = sum(len(e) for e in entries)
    with open_host_file(img, True, lock_mode=False) as host:
        h = Header.parse(host.pread(0, 65536))
        clusters = -(-total // h.cluster_size)
        if at is None:
            rc = Refcounts(host, h)
            at = rc.alloc(clusters)
            rc.flush()
        off = at
        blob = b"".join(entries)
        for pos in range(0, total, 1 << 16):
            piece = blob[pos:pos + (1 << 16)]
            if piece.count(0) < len(piece):
                host.pwrite(off + pos, piece)
        host.truncate(max(host.size(), off + clusters * h.cluster_size))
        header_io.set_snapshots(host, len(snaps), off)
        host.flush()


def test_check_repairs_oversized_extra_data_as_qemu(di: DI, tmp_path: Path) -> None:
    """Entry 0 of two real snapshots carries 1116 bytes of extra data: opening refuses it
    with qemu's hint; check -r all cuts it to 1024 bytes and rewrites the table."""
    src = _plain(tmp_path)
    QEMU.img("snapshot", "-c", "s1", src)
    QEMU.io(src, "write -P 0x4d 0 64k")
    QEMU.img("snapshot", "-c", "s2", src)
    with open_host_file(src, False, lock_mode=False) as host:
        h = Header.parse(host.pread(0, 65536))
        snaps = read_entries(host, h.snapshots_offset, h.nb_snapshots, 65536)
    snaps[0].extra, snaps[0].extra_data_size = bytes(range(256)) * 4 + b"\x01" * 68, 1116
    _install_table(src, snaps, at=h.snapshots_offset)  # it fits the old table's cluster
    assert QEMU.img("check", src, ok=None).returncode == 1
    # with the dirty bit set, a read-write open reads the table before it repairs
    # anything: refused alike, nothing written
    dirty = tmp_path / "dirty.qcow2"
    dirty.write_bytes(src.read_bytes())
    _poke(dirty, 79, b"\x01")
    q, d = _pair(tmp_path, dirty)
    got = _same(di, tmp_path, "resize", IMG, "2M")
    assert got.rc == 1 and "Too much extra metadata" in got.err
    res = QEMU.io(q, "write 0 512", ok=(1,))  # a read-write open, as diskimg.open(r+)
    with pytest.raises(FormatError) as exc:
        diskimg.open(d, "r+")
    assert str(exc.value).replace("diskimg", "qemu-img") in res.stderr
    assert _bytes(tmp_path) == (dirty.read_bytes(),) * 2
    q, d = _pair(tmp_path, src)
    got = _same(di, tmp_path, "info", IMG)
    assert got.err == (f"diskimg: Could not open '{IMG}': Too much extra metadata in "
                       "snapshot table entry 0\nYou can force-remove this extra metadata "
                       "with diskimg check -r all\n")
    _same(di, tmp_path, "snapshot", "-l", IMG)
    _same(di, tmp_path, "check", IMG)
    got = _same(di, tmp_path, "check", "-r", "all", IMG)
    assert got.rc == 0 and "Discarding too much extra metadata in snapshot table entry 0 " \
        "(1116 > 1024)" in got.err
    qb, db = _bytes(tmp_path)
    assert qb == db  # so qemu-img info and snapshot -l answer alike for both
    assert [s["name"] for s in _info(tmp_path, "d")["snapshots"]] == ["s1", "s2"]
    QEMU.check_clean(d)
    for sn, pattern in (("s1", "0x3c"), ("s2", "0x4d")):
        raw = QEMU.raw_bytes(d, "qcow2", "-l", sn)
        assert raw[:65536] == bytes([int(pattern, 16)]) * 65536


def test_check_trims_a_snapshot_table_over_64_mib_as_qemu(di: DI, tmp_path: Path) -> None:
    """510 entries of 132136 bytes (1023 bytes of extra data, an id and a name of 65535
    bytes each, all NULs): the table passes 64 MiB at entry 507.  qemu refuses to open
    it; check -r all keeps the first 507 where they are (the header's count cut in
    place) and frees the clusters of the rest."""
    src = _plain(tmp_path)
    _install_table(src, [Snapshot(id="\0" * 65535, name="\0" * 65535, l1_table_offset=0,
                                  l1_size=0, disk_size=1 << 20, extra_data_size=1023,
                                  extra=bytes(999)) for i in range(510)])
    q, d = _pair(tmp_path, src)
    hint = "You can force-remove all 3 overhanging snapshots with diskimg check -r all\n"
    got = _same(di, tmp_path, "info", IMG)
    assert got.err == f"diskimg: Could not open '{IMG}': Snapshot table is too big\n{hint}"
    got = _same(di, tmp_path, "check", IMG)
    assert hint in got.err and got.rc == 1
    got = _same(di, tmp_path, "check", "-r", "all", IMG)
    assert got.rc == 0 and got.err.startswith(
        "Discarding 3 overhanging snapshots (snapshot table is too big)\n")
    qb, db = _bytes(tmp_path)
    assert qb == db and struct.unpack(">IQ", db[60:72]) == (507, 0x60000)
    assert len(_info(tmp_path, "d")["snapshots"]) == 507  # qemu reads the table kept


def test_check_keeps_65536_of_too_many_snapshots_as_qemu(di: DI, tmp_path: Path) -> None:
    """65537 entries: qemu refuses to open the image; check -r all drops the last one by
    cutting the header's count to 65536 in place, the table staying where it is."""
    src = _plain(tmp_path)
    # entry 0's long name keeps the last entry off a cluster boundary: dropping it leaks
    # nothing, so only the count changes
    _install_table(src, [Snapshot(id=str(i + 1), name="" if i else "first" * 20,
                                  l1_table_offset=0, l1_size=0, disk_size=1 << 20)
                         for i in range(65537)])
    q, d = _pair(tmp_path, src)
    got = _same(di, tmp_path, "info", IMG)
    assert got.err == f"diskimg: Could not open '{IMG}': Snapshot table too large\n"
    got = _same(di, tmp_path, "check", IMG)
    assert got.err == ("diskimg: ERROR snapshot table too large\nYou can force-remove all 1 "
                       "overhanging snapshots with diskimg check -r all\n"
                       "diskimg: Check failed: File too large\n")
    # qemu-img needs about 25 s to repair and re-read 65536 entries: CI checks diskimg
    # against qemu's answer as qemu-img 7.2 gives it (DISKIMG_QEMU_LONG=1 runs it too)
    expected = bytearray(src.read_bytes())
    expected[60:64] = struct.pack(">I", 65536)
    if os.environ.get("DISKIMG_QEMU_LONG") == "1":
        want, got = _both(di, tmp_path, "check", "-r", "all", IMG)
        assert (got.rc, got.out, got.err) == (want.rc, want.out, want.err)
        assert q.read_bytes() == expected
    else:
        got = di("check", "-r", "all", IMG, cwd=tmp_path / "d")
    assert (got.rc, got.err) == (0, "Discarding 1 overhanging snapshots\n")
    assert got.out == (
        "The following inconsistencies were found and repaired:\n\n"
        "    0 leaked clusters\n    1 corruptions\n\n"
        "Double checking the fixed image now...\nNo errors were found on the image.\n"
        "1/16 = 6.25% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
        f"Image end offset: {len(expected)}\n")
    assert d.read_bytes() == expected
