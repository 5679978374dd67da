"""Issue 4's bad input through the CLI: damaged snapshot tables and overlapping metadata.

For each damage: ``info``, ``check`` and ``convert`` end in a clean ``diskimg:`` error or a
qemu-style result (never a traceback, bounded time), ``check`` reports the damage as
corruptions or a check error rather than crashing, and ``check -r all`` never makes the
image worse by qemu-img's own count.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import needs_qemu, qemu
from .lifecycle_helpers import create

pytestmark = [pytest.mark.qemu, needs_qemu]


def _u32(p: Path, off: int) -> int:
    with p.open("rb") as f:
        f.seek(off)
        return int(struct.unpack(">I", f.read(4))[0])


def _u64(p: Path, off: int) -> int:
    with p.open("rb") as f:
        f.seek(off)
        return int(struct.unpack(">Q", f.read(8))[0])


def _put(p: Path, off: int, data: bytes) -> None:
    with p.open("r+b") as f:
        f.seek(off)
        f.write(data)


def _snap_name_64k(p: Path) -> None:
    so = _u64(p, 64)
    _put(p, so + 14, struct.pack(">H", 0xFFFF))  # name_size: 64 KiB name


def _snap_table_past_eof(p: Path) -> None:
    _put(p, 64, struct.pack(">Q", (p.stat().st_size + (1 << 20)) & ~0xFFFF))


def _snap_l1_past_eof(p: Path) -> None:
    so = _u64(p, 64)
    _put(p, so, struct.pack(">Q", 1 << 40))  # the snapshot's l1_table_offset


def _snap_extra_absurd(p: Path) -> None:
    so = _u64(p, 64)
    _put(p, so + 36, struct.pack(">I", 0x7FFFFFFF))  # extra_data_size


def _snap_extra_none(p: Path) -> None:
    """Entry 0 rewritten without its extra data (an incomplete v3 entry)."""
    so = _u64(p, 64)
    with p.open("rb") as f:
        f.seek(so)
        head = f.read(40)
        extra = struct.unpack(">I", head[36:40])[0]
        id_len, name_len = struct.unpack(">HH", head[12:16])
        f.seek(so + 40 + extra)
        names = f.read(id_len + name_len)
    entry = head[:36] + struct.pack(">I", 0) + names
    _put(p, so, entry + bytes(-len(entry) % 8 + 64))


def _reftable_over_l1(p: Path) -> None:
    _put(p, 48, struct.pack(">Q", _u64(p, 40)))  # refcount_table_offset = l1_table_offset


def _snap_count_huge(p: Path) -> None:
    _put(p, 60, struct.pack(">I", 10**9))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "snapshot-name-64KiB": _snap_name_64k,
    "snapshot-table-past-eof": _snap_table_past_eof,
    "snapshot-l1-past-eof": _snap_l1_past_eof,
    "snapshot-extra-data-absurd": _snap_extra_absurd,
    "refcount-table-overlaps-l1": _reftable_over_l1,
    "snapshot-count-1e9": _snap_count_huge,
    "snapshot-extra-data-missing": _snap_extra_none,
}

#: damage qemu-img opens, reads and repairs: diskimg must give the same answers
SAME_AS_QEMU = ["snapshot-name-64KiB", "snapshot-table-past-eof",
                "snapshot-extra-data-missing"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    create(d, "img.qcow2", "4M")
    QEMU.io("img.qcow2", "write -P 1 0 1M", fmt=None, cwd=d)
    QEMU.img("snapshot", "-c", "s1", "img.qcow2", cwd=d)
    QEMU.io("img.qcow2", "write -P 2 512k 64k", fmt=None, cwd=d)
    return d / "img.qcow2"


def _qcheck(p: Path) -> tuple[int, int]:
    """qemu-img's (exit code, corruptions + check errors) for ``p``."""
    r = QEMU.img("check", "--output=json", p, ok=None)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        return r.returncode, 1 << 30  # qemu could not even check it
    return r.returncode, int(doc.get("corruptions", 0)) + int(doc.get("check-errors", 0))


def _clean_outcome(r, allowed: tuple[int, ...], qemu_said=None) -> None:
    """A clean result or error; an open error says where, unless it is qemu-img's own
    text (``qemu_said``: qemu-img's result for the same command, program names swapped;
    the error then still names field and offset as attributes)."""
    assert r.rc in allowed, (r.rc, r.out, r.err)
    assert "Traceback" not in r.err
    if r.rc == 1:
        first = r.err.splitlines()[0] if r.err else ""
        assert first.startswith(("diskimg:", "ERROR")), r.err
        if first.startswith("diskimg: Could not open") and not (
                qemu_said is not None and (qemu_said.rc, qemu_said.err) == (1, r.err)):
            assert " at 0x" in first, f"the error does not say where: {first}"


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_lifecycle_metadata(damage: str, pristine: Path, tmp_path: Path, di) -> None:
    p = tmp_path / "img.qcow2"
    shutil.copy(pristine, p)
    DAMAGE[damage](p)
    before = p.read_bytes()
    # read-only commands: a clean result or a clean error, and the file is untouched
    r = di("info", "--output=json", p.name, cwd=tmp_path)
    _clean_outcome(r, (0, 1), qemu("info", "--output=json", p.name, cwd=tmp_path))
    r = di("check", p.name, cwd=tmp_path)
    _clean_outcome(r, (0, 1, 2, 3))
    r = di("snapshot", "-l", p.name, cwd=tmp_path)
    _clean_outcome(r, (0, 1), qemu("snapshot", "-l", p.name, cwd=tmp_path))
    r = di("convert", "-O", "raw", p.name, "out.raw", cwd=tmp_path)
    _clean_outcome(r, (0, 1), qemu("convert", "-O", "raw", p.name, "q.raw", cwd=tmp_path))
    assert p.read_bytes() == before, "a read-only command wrote to the image"
    # -r all never makes the image worse by qemu-img's own count
    q_rc, q_bad = _qcheck(p)
    r = di("check", "-r", "all", p.name, cwd=tmp_path)
    _clean_outcome(r, (0, 1, 2, 3))
    a_rc, a_bad = _qcheck(p)
    assert a_bad <= q_bad, (damage, q_rc, q_bad, a_rc, a_bad, r.out, r.err)


def _damaged_twins(pristine: Path, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """The same damaged image in ``q/`` (for qemu-img) and ``d/`` (for diskimg)."""
    q, d = tmp_path / "q", tmp_path / "d"
    for side in (q, d):
        side.mkdir()
        shutil.copy(pristine, side / "img.qcow2")
        DAMAGE[damage](side / "img.qcow2")
    return q, d


def _same_output(q: Path, d: Path, di, *commands: list[str]) -> None:
    """Each command gives the same exit code, stderr and stdout (JSON parsed, without
    diskimg's ``findings``) in both directories."""
    for args in commands:
        want = qemu(*args, "img.qcow2", cwd=q)
        got = di(*args, "img.qcow2", cwd=d)
        assert (got.rc, got.err) == (want.rc, want.err), args
        if args[-1] == "--output=json" and want.out:
            doc = json.loads(got.out)
            doc.pop("findings", None)
            assert doc == json.loads(want.out), args
        else:
            assert got.out == want.out, args


def _same_repair(q: Path, d: Path, di) -> None:
    """``check -r all`` prints the same and leaves the same bytes; qemu-img finds the
    result clean."""
    want = qemu("check", "-r", "all", "img.qcow2", cwd=q)
    got = di("check", "-r", "all", "img.qcow2", cwd=d)
    assert (got.rc, got.out, got.err) == (want.rc, want.out, want.err)
    assert (d / "img.qcow2").read_bytes() == (q / "img.qcow2").read_bytes()
    assert qemu("check", "img.qcow2", cwd=d).rc == 0


@pytest.mark.parametrize("damage", SAME_AS_QEMU)
def test_damaged_snapshot_table_same_as_qemu(damage: str, pristine: Path, tmp_path: Path,
                                             di) -> None:
    """qemu-img reads the table as zeros past EOF and names as C strings, reports v3
    entries without extra data as incomplete, and repairs them by rewriting the table:
    info, snapshot -l, convert, check and check -r all agree with it, byte for byte."""
    q, d = _damaged_twins(pristine, tmp_path, damage)
    _same_output(q, d, di, ["info", "--output=json"], ["snapshot", "-l"], ["check"],
                 ["check", "--output=json"])
    assert qemu("convert", "-O", "raw", "img.qcow2", "out.raw", cwd=q).rc == 0
    assert di("convert", "-O", "raw", "img.qcow2", "out.raw", cwd=d).rc == 0
    assert (q / "out.raw").read_bytes() == (d / "out.raw").read_bytes()
    _same_repair(q, d, di)


@pytest.mark.parametrize("damage", ["snapshot-extra-data-absurd", "snapshot-count-1e9",
                                    "refcount-table-overlaps-l1"])
def test_damaged_check_same_as_qemu(damage: str, pristine: Path, tmp_path: Path, di) -> None:
    """Damage qemu-img refuses to open but checks (it opens for check without reading the
    snapshot table): check prints the same lines, counts and exit code as qemu-img.  The
    oversized extra data and the overlapping refcount table are repaired as qemu-img does,
    to the same bytes; 10^9 snapshots are refused by -r all (qemu-img marks the image
    corrupt), leaving the file untouched."""
    q, d = _damaged_twins(pristine, tmp_path, damage)
    _same_output(q, d, di, ["check"], ["check", "--output=json"])
    if damage == "snapshot-count-1e9":
        before = (d / "img.qcow2").read_bytes()
        r = di("check", "-r", "all", "img.qcow2", cwd=d)
        assert r.rc == 1 and "Too many snapshots" in r.err
        assert (d / "img.qcow2").read_bytes() == before
        return
    _same_repair(q, d, di)


def test_snapshot_ops_refused_when_opened_for_check_with_a_damaged_table(
        pristine: Path, tmp_path: Path) -> None:
    """An image opened for check with an unreadable snapshot table shows no snapshots;
    creating or deleting one then would rewrite the table without the damaged entries,
    so both are refused and the file is untouched."""
    import diskimg

    p = tmp_path / "img.qcow2"
    shutil.copy(pristine, p)
    _snap_extra_absurd(p)
    before = p.read_bytes()
    with diskimg.open(p, "r+", "qcow2", for_check=True) as d:
        assert d.snapshots.list() == []  # type: ignore[attr-defined]
        for op in (lambda: d.snapshots.create("new"),  # type: ignore[attr-defined]
                   lambda: d.snapshots.delete("1")):  # type: ignore[attr-defined]
            with pytest.raises(diskimg.DiskImgError, match="snapshot table is damaged"):
                op()
    assert p.read_bytes() == before
