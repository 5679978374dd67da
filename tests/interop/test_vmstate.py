"""qcow2 internal snapshots that carry VM state, diskimg against qemu-img 7.2.

A running QEMU's ``savevm`` writes the VM state "like guest disk content, except that it
is stored at offsets that are larger than the virtual disk": from the first cluster of
the first L1 entry that maps no guest cluster (docs/interop/qcow2.txt, snapshot table
entry bytes 32-35 and extra data bytes 0-7).  The snapshot's L1 table is the active one
at that moment, so it maps the state; then QEMU discards the state from the active image.
Neither qemu-img nor diskimg can write VM state (that needs a running VM), so
:func:`savevm` lays it out that way with diskimg's API (the disk grown over the state's
place, the state written, ``snapshot -c``, the state discarded from the active image)
and then sets the sizes a savevm leaves: the disk's size in the header and in the entry,
``vm_state_size`` in the entry (with the snapshot-table codec).  qemu is the judge of
every image built here: ``qemu-img check`` finds it clean and ``qemu-img snapshot -l``
lists the VM size written.

After ``snapshot -a`` the active image maps the snapshot's VM state too (qemu copies the
snapshot's whole L1 table, and so does diskimg): ``keep=True`` builds that state."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from qemukit import QEMU

import diskimg
from diskimg.cli.main import main
from diskimg.qcow2.layout import HDR_SIZE
from diskimg.qcow2.snapshot_table import pack_table_exact

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = MiB  # the disk
VM = 200 * 1024 + 512  # bytes of VM state: four clusters, the last one partly used
CS = 64 * 1024
SPAN = CS * (CS // 8)  # guest bytes one L1 entry maps
VM_AT = -(-SIZE // SPAN) * SPAN  # where the VM state starts (guest offset)


class Result(NamedTuple):
    rc: int
    out: str
    err: str


def dimg(*args: str | Path) -> Result:
    """``diskimg ARGS`` in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return Result(rc, out.getvalue(), err.getvalue())


def qimg(*args: str | Path) -> Result:
    r = QEMU.img(*args, ok=None)
    return Result(r.returncode, r.stdout, r.stderr)


def same_words(q: Result, d: Result, *names: tuple[Path, Path]) -> None:
    """Exit code, stdout and stderr alike, with the program's and the images' names
    replaced."""
    def norm(r: Result, prog: str, idx: int) -> tuple[int, str, str]:
        out, err = r.out, r.err.replace(prog, "PROG")
        for pair in names:
            out, err = out.replace(str(pair[idx]), "IMG"), err.replace(str(pair[idx]), "IMG")
        return r.rc, out, err
    assert norm(d, "diskimg", 1) == norm(q, "qemu-img", 0)


def savevm(path: Path, *, compat: str = "1.1", keep: bool = False, vm: int = VM,
           vm_size_field: int | None = None, name: str = "vm1",
           backing: Path | None = None, no_extra: bool = False) -> None:
    """A qcow2 image of SIZE bytes with guest data and a snapshot ``name`` holding ``vm``
    bytes of VM state (pattern 0x5A) past the disk's end, as QEMU's savevm leaves it
    (see the module docstring).  ``keep``: the active image still maps the state (as
    after ``snapshot -a``).  ``vm_size_field``: the VM state size the entry records, when
    it is to differ from the bytes written (the 64-bit field past 4 GiB).  ``no_extra``:
    the entry has no extra data, as QEMU before 1.1 wrote it (the VM state size in the
    32-bit field only, the disk size unknown)."""
    opts = f"compat={compat},cluster_size={CS}"
    if backing is None:
        QEMU.img("create", "-q", "-f", "qcow2", "-o", opts, path, str(SIZE))
    else:
        QEMU.img("create", "-q", "-f", "qcow2", "-o", opts, "-b", backing, "-F", "qcow2",
                 path, str(SIZE))
    with diskimg.open(path, "r+") as img:
        img.write(0, b"\x11" * CS)
        img.write(SIZE - 4096, b"\x22" * 4096)
        clusters = -(-vm // CS) * CS
        img.resize(VM_AT + clusters)  # QEMU grows the active L1 table to write the state
        img.write(VM_AT, b"\x5a" * vm)
        img.snapshots.create(name)
        if not keep:  # QEMU: "the VM state isn't needed any more in the active L1 table"
            img.discard(VM_AT, clusters)
        h = img.header
        table_at = h.snapshots_offset
        snaps = img.snapshots.list()
    snaps[-1].vm_state_size = vm if vm_size_field is None else vm_size_field
    snaps[-1].disk_size = SIZE
    if no_extra:
        snaps[-1].extra_data_size = 0
    with open(path, "r+b") as f:
        f.seek(table_at)
        f.write(pack_table_exact(snaps))
        f.seek(HDR_SIZE.offset)
        f.write(struct.pack(">Q", SIZE))


def guest_bytes() -> bytes:
    """What the guest saw when the snapshot was taken."""
    return b"\x11" * CS + bytes(SIZE - CS - 4096) + b"\x22" * 4096


def check_json(path: Path) -> dict[str, Any]:
    """qemu-img check's report without the file's name and end (diskimg's snapshot
    operations write new tables: compatibility.md)."""
    rep = QEMU.check(path)
    rep.pop("filename")
    rep.pop("image-end-offset")
    return rep


def sha(data: bytes) -> str:
    """SHA-256 of ``data``: compared instead of the bytes (a failure prints two lines,
    not pytest's diff of megabytes)."""
    return hashlib.sha256(data).hexdigest()


def digest(p: Path) -> str:
    return sha(p.read_bytes())


GUEST = sha(guest_bytes())


def twins(src: Path, tmp: Path) -> tuple[Path, Path]:
    """Two copies of ``src``: one for qemu-img, one for diskimg."""
    q, d = tmp / "q.qcow2", tmp / "d.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, d)
    return q, d


KINDS = {
    "savevm": {},
    "applied": {"keep": True},
    "v2": {"compat": "0.10", "no_extra": True},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vmstate")
    out = {}
    for kind, kw in KINDS.items():
        out[kind] = d / f"{kind}.qcow2"
        savevm(out[kind], **kw)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_qemu_judges_the_image_and_every_listing_matches(images: dict[str, Path],
                                                         kind: str) -> None:
    """qemu-img finds the crafted image clean, lists the VM size written and reads the
    snapshot's disk; diskimg's info, snapshot -l, check (human and JSON), map and measure
    print the same."""
    p = images[kind]
    ref = {}
    for args in (["info"], ["info", "--output=json"], ["snapshot", "-l"], ["check"],
                 ["check", "--output=json"], ["map", "--output=json"],
                 ["measure", "-O", "qcow2", "-l", "vm1"]):
        ref[" ".join(args)] = q = qimg(*args, p)
        d = dimg(*args, p)
        if args[1:] == ["--output=json"] and args[0] == "check":
            d_rep = json.loads(d.out)
            assert d_rep.pop("findings") == []
            d = d._replace(out=json.dumps(d_rep, indent=4) + "\n")
        same_words(q, d)
    listing = ref["snapshot -l"].out.splitlines()
    assert re.match(r"1\s+vm1\s+200 KiB ", listing[2]), listing  # %0.3g of 200.5
    assert json.loads(ref["info --output=json"].out)["snapshots"][0]["vm-state-size"] == VM
    rep = json.loads(ref["check --output=json"].out)
    # the state's clusters are referenced (counted by check only through the active
    # L1 table, so only when it maps them), never leaked
    assert ref["check --output=json"].rc == 0 and "leaks" not in rep and "corruptions" not in rep
    assert rep["allocated-clusters"] == 2 + (4 if KINDS[kind].get("keep") else 0)
    assert sha(QEMU.raw_bytes(p, None, "-l", "vm1")) == GUEST


def test_vm_size_column_and_64_bit_field(tmp_path: Path) -> None:
    """A VM state past 4 GiB is recorded only in the 64-bit field of the extra data
    (the 32-bit one holds 0); both tools list it alike (size column, JSON)."""
    p = tmp_path / "big.qcow2"
    savevm(p, vm_size_field=(5 << 30) + 12345)
    QEMU.check_clean(p)
    for args in (["snapshot", "-l"], ["info", "--output=json"]):
        q = qimg(*args, p)
        same_words(q, dimg(*args, p))
    assert "5 GiB" in qimg("snapshot", "-l", p).out


def content(p: Path, *extra: str) -> bytes:
    return QEMU.raw_bytes(p, "qcow2", *extra)


@pytest.mark.parametrize("kind", ["savevm", "applied", "v2"])
def test_snapshot_delete_frees_the_vm_state(images: dict[str, Path], tmp_path: Path,
                                            kind: str) -> None:
    q, d = twins(images[kind], tmp_path)
    same_words(qimg("snapshot", "-d", "vm1", q), dimg("snapshot", "-d", "vm1", d), (q, d))
    # no leak: the state's clusters are free unless the active image maps them
    rep = check_json(d)
    assert rep == check_json(q) and rep["_returncode"] == 0
    assert dimg("snapshot", "-l", d).out == ""
    assert sha(content(d)) == sha(content(q)) == GUEST


@pytest.mark.parametrize("kind", ["savevm", "applied", "v2"])
def test_snapshot_apply_maps_the_state_as_qemu(images: dict[str, Path], tmp_path: Path,
                                               kind: str) -> None:
    """qemu's ``snapshot -a`` copies the snapshot's whole L1 table, VM state included,
    into the active one: the active image maps the state past the disk's end (check
    counts its clusters) until the next savevm.  diskimg does the same."""
    q, d = twins(images[kind], tmp_path)
    for p in (q, d):
        with diskimg.open(p, "r+") as img:
            img.write(0, b"\x33" * 4096)
    same_words(qimg("snapshot", "-a", "vm1", q), dimg("snapshot", "-a", "vm1", d), (q, d))
    rep = check_json(d)
    assert rep == check_json(q) and rep["_returncode"] == 0
    assert rep["allocated-clusters"] == 6  # two of the disk, four of the state
    assert QEMU.map(d) == QEMU.map(q)
    assert sha(content(d)) == sha(content(q)) == GUEST


def test_convert_and_measure_of_a_snapshot_take_the_disk_only(images: dict[str, Path],
                                                               tmp_path: Path) -> None:
    src = images["applied"]
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    QEMU.img("convert", "-l", "vm1", "-O", "qcow2", src, q)
    assert dimg("convert", "-l", "vm1", "-O", "qcow2", src, d).rc == 0
    assert digest(q) == digest(d)
    assert sha(content(d)) == GUEST
    assert "snapshots" not in QEMU.info(d)
    same_words(qimg("convert", "-s", "vm1", "-O", "raw", src, q),
               dimg("convert", "-s", "vm1", "-O", "raw", src, d), (src, src))
    qr, dr = tmp_path / "q.raw", tmp_path / "d.raw"
    QEMU.img("convert", "-l", "snapshot.name=vm1", "-O", "raw", src, qr)
    assert dimg("convert", "-l", "snapshot.name=vm1", "-O", "raw", src, dr).rc == 0
    assert digest(qr) == digest(dr)
    assert digest(dr) == GUEST


def test_convert_of_a_snapshot_after_a_grow_has_the_snapshot_size(images: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """After the disk grew over the place of a snapshot's VM state, qemu-img 7.2 reads
    the snapshot at the current size, so its VM state shows as guest data; diskimg
    reads it at its own size (compatibility.md, "Differences chosen on purpose")."""
    src = tmp_path / "grown.qcow2"
    shutil.copyfile(images["savevm"], src)
    QEMU.img("resize", "-q", src, str(VM_AT + MiB))
    qr, dr = tmp_path / "q.raw", tmp_path / "d.raw"
    QEMU.img("convert", "-l", "vm1", "-O", "raw", src, qr)
    assert dimg("convert", "-l", "vm1", "-O", "raw", src, dr).rc == 0
    assert digest(dr) == GUEST
    with open(qr, "rb") as f:
        assert sha(f.read(SIZE)) == GUEST
        f.seek(VM_AT)
        assert sha(f.read(VM)) == sha(b"\x5a" * VM)  # qemu-img's: the VM state as guest data


def reads(p: Path, offset: int, length: int, pattern: int) -> bool:
    """qemu-io reads ``length`` bytes of ``pattern`` at ``offset`` of the guest disk."""
    r = QEMU.io(p, f"read -P {pattern} {offset} {length}", verify=False, ok=(0, 1))
    return "Pattern verification failed" not in r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["savevm", "applied"])
def test_resize_never_shows_the_vm_state(images: dict[str, Path], tmp_path: Path,
                                         kind: str) -> None:
    """Growing the disk over the place of the VM state: where the active image maps
    the state (after ``snapshot -a``) qemu-img 7.2 shows it as guest data in the grown
    area; diskimg's grown area reads zeros.  Otherwise the files are qemu's, byte for
    byte.  The snapshot keeps its state: applying it restores the disk."""
    q, d = twins(images[kind], tmp_path)
    new = str(VM_AT + MiB)
    same_words(qimg("resize", q, new), dimg("resize", d, new), (q, d))
    assert reads(d, VM_AT, VM, 0)
    if kind == "savevm":
        assert digest(q) == digest(d)
    else:
        assert reads(q, VM_AT, VM, 0x5A)  # qemu-img's
        grown = [e for e in QEMU.map(d) if e["start"] + e["length"] > SIZE]
        assert grown and not any(e["data"] or not e["zero"] for e in grown)
        assert [e for e in QEMU.map(d) if e["start"] < SIZE] == \
            [e for e in QEMU.map(q) if e["start"] < SIZE]
    rep = check_json(d)
    assert rep["_returncode"] == 0 and rep["allocated-clusters"] == 2
    assert dimg("snapshot", "-a", "vm1", d).rc == 0
    QEMU.check_clean(d)
    assert sha(content(d)) == GUEST
    assert check_json(d)["allocated-clusters"] == 6


@pytest.mark.parametrize("kind", ["savevm", "applied"])
def test_shrink_frees_the_active_state_without_leaks(images: dict[str, Path],
                                                     tmp_path: Path, kind: str) -> None:
    """A shrink drops the active L1 entries past the new end, as qemu's does; where they
    map VM state (after ``snapshot -a``) qemu-img 7.2 frees only the L2 tables and leaks
    the state's clusters (refcount 2, one reference); diskimg drops those references."""
    q, d = twins(images[kind], tmp_path)
    same_words(qimg("resize", "--shrink", q, "512K"), dimg("resize", "--shrink", d, "512K"),
               (q, d))
    rep = check_json(d)
    assert rep["_returncode"] == 0 and rep["allocated-clusters"] == 1
    if kind == "savevm":
        assert digest(q) == digest(d)
    else:
        assert check_json(q) == {**rep, "_returncode": 3, "leaks": 4}  # qemu-img's
    assert sha(content(d)) == sha(content(q))
    assert dimg("snapshot", "-a", "vm1", d).rc == 0
    QEMU.check_clean(d)
    assert sha(content(d)) == GUEST


@pytest.mark.parametrize("kind", ["savevm", "applied", "v2"])
def test_amend_compat_both_ways_as_qemu(images: dict[str, Path], tmp_path: Path,
                                        kind: str) -> None:
    """Downgrading to compat=0.10 over a backing file allocates the active image's zero
    clusters, those past the disk's end too (the discarded state); upgrading rewrites
    the table (an entry without extra data gets it).  Both as qemu-img, byte for byte."""
    if kind == "v2":
        src = images[kind]
    else:
        base = tmp_path / "base.qcow2"
        QEMU.img("create", "-q", "-f", "qcow2", base, str(SIZE))
        QEMU.io(base, f"write -P 0x77 0 {SIZE}")
        src = tmp_path / "src.qcow2"
        savevm(src, backing=base, keep=kind == "applied")
        QEMU.check_clean(src)
    q, d = twins(src, tmp_path)
    if kind != "v2":
        same_words(qimg("amend", "-o", "compat=0.10", q),
                   dimg("amend", "-o", "compat=0.10", d))
        assert digest(q) == digest(d)
        QEMU.check_clean(d)
    same_words(qimg("amend", "-o", "compat=1.1", q), dimg("amend", "-o", "compat=1.1", d))
    assert digest(q) == digest(d)
    QEMU.check_clean(d)
    assert QEMU.info(d)["snapshots"][0]["vm-state-size"] == VM


@pytest.mark.parametrize("args", [["commit"], ["rebase", "-b", "base2.qcow2", "-F", "qcow2"],
                                  ["rebase", "-u", "-b", "base2.qcow2", "-F", "qcow2"]],
                         ids=["commit", "rebase", "rebase-u"])
def test_commit_and_rebase_leave_the_state_as_qemu(tmp_path: Path, args: list[str]) -> None:
    """``commit`` empties the disk of the top image, not what it maps past the end;
    a rebase copies the disk only.  Top and base files are qemu-img's, byte for byte."""
    src = tmp_path / "src"
    src.mkdir()
    QEMU.img("create", "-q", "-f", "qcow2", src / "base.qcow2", str(SIZE))
    QEMU.io(src / "base.qcow2", f"write -P 0x77 0 {SIZE}")
    QEMU.img("create", "-q", "-f", "qcow2", src / "base2.qcow2", str(SIZE))
    QEMU.io(src / "base2.qcow2", "write -P 0x78 0 512k")
    savevm(src / "top.qcow2", backing=Path("base.qcow2"), keep=True)
    q, d = tmp_path / "q", tmp_path / "d"
    shutil.copytree(src, q)
    shutil.copytree(src, d)
    qr = QEMU.img(*args, "top.qcow2", cwd=q, ok=None)
    with contextlib.chdir(d):
        dr = dimg(*args, "top.qcow2")
    same_words(Result(qr.returncode, qr.stdout, qr.stderr), dr)
    for name in ("top.qcow2", "base.qcow2", "base2.qcow2"):
        assert digest(q / name) == digest(d / name), name
    QEMU.check_clean(d / "top.qcow2")
