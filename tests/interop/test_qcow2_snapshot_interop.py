"""Internal snapshots both ways: qemu-img snapshots read through diskimg; snapshots
diskimg creates, applies and deletes pass qemu-img check and read back in qemu."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_snapshots_read_by_diskimg(tmp_path: Path, compat: str) -> None:
    img = tmp_path / "q.qcow2"
    QEMU.img("create", "-f", "qcow2", "-o", f"compat={compat}", img, "2M")
    QEMU.io(img, "write -P 1 0 128k", fmt=None)
    QEMU.img("snapshot", "-c", "first", img)
    QEMU.io(img, "write -P 2 64k 128k", "write -c -P 3 1M 64k", fmt=None)
    QEMU.img("snapshot", "-c", "second", img)
    QEMU.io(img, "write -P 4 0 4k", fmt=None)
    theirs = json.loads(QEMU.img("info", "--output=json", img).stdout)["snapshots"]
    with diskimg.open(img) as d:
        assert d.info().to_json()["snapshots"] == theirs
        for name in ("first", "second"):
            ref = tmp_path / f"{name}.raw"
            QEMU.img("convert", "-l", f"snapshot.name={name}", "-O", "raw", img, ref)
            with d.snapshot_view(name=name) as v:
                assert v.read(0, v.size) == ref.read_bytes()


def test_diskimg_snapshots_verified_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    diskimg.create(img, "qcow2", 4 << 20)
    with diskimg.open(img, "r+") as d:
        d.write(0, b"\x01" * 200000)
        d.snapshots.create("base")
        d.write(65536, b"\x02" * 70000)
        d.write_compressed(2 << 20, b"\x03" * 65536)
        d.snapshots.create("later")
        d.write(0, b"\x04" * 4096)
    QEMU.check_clean(img)
    listing = QEMU.img("snapshot", "-l", img).stdout
    assert "base" in listing and "later" in listing
    QEMU.io(img, "read -P 4 0 4k", "read -P 1 4k 60k", "read -P 2 64k 70000", fmt=None)
    base = tmp_path / "base.raw"
    QEMU.img("convert", "-l", "snapshot.name=base", "-O", "raw", img, base)
    assert base.read_bytes()[:200000] == b"\x01" * 200000
    assert base.read_bytes()[200000:] == bytes((4 << 20) - 200000)
    # revert in diskimg, then qemu sees the snapshot's contents and a clean image
    with diskimg.open(img, "r+") as d:
        d.snapshots.apply("base")
        d.snapshots.delete("later")
    QEMU.check_clean(img)
    QEMU.io(img, "read -P 1 0 200000", "read -P 0 200000 3994304", fmt=None)
    assert "later" not in QEMU.img("snapshot", "-l", img).stdout


def test_diskimg_applies_and_deletes_qemu_snapshots(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    QEMU.img("create", "-f", "qcow2", img, "1M")
    QEMU.io(img, "write -P 7 0 64k", fmt=None)
    QEMU.img("snapshot", "-c", "s", img)
    QEMU.io(img, "write -P 8 0 64k", fmt=None)
    with diskimg.open(img, "r+") as d:
        d.snapshots.apply("s")
        assert d.read(0, 4) == b"\x07" * 4
        d.snapshots.delete("s")
        assert d.snapshots.list() == []
    QEMU.check_clean(img)
    QEMU.io(img, "read -P 7 0 64k", fmt=None)


def test_unknown_snapshot_and_narrow_refcounts_are_clean_errors(tmp_path: Path) -> None:
    img = tmp_path / "r1.qcow2"
    diskimg.create(img, "qcow2", 1 << 20, options={"refcount_bits": 1})
    with diskimg.open(img, "r+") as d:
        d.write(0, b"x" * 512)
        with pytest.raises(diskimg.UsageError, match="Could not find snapshot 'nope'"):
            d.snapshots.apply("nope")
        with pytest.raises(diskimg.UsageError, match="maximum"):
            d.snapshots.create("s")
    # unlike qemu-img, the refused snapshot leaks nothing
    QEMU.check_clean(img)


@pytest.mark.parametrize("name", ["a\0b", "x" * 65536])
def test_snapshot_names_the_table_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    """qemu reads names as C strings of at most 65535 bytes: a name with a NUL or longer
    than that would not read back, so create refuses it and the image stays unchanged."""
    img = tmp_path / "n.qcow2"
    diskimg.create(img, "qcow2", 1 << 20)
    before = img.read_bytes()
    with diskimg.open(img, "r+") as d, pytest.raises(diskimg.DiskImgError, match="NUL"):
        d.snapshots.create(name)  # type: ignore[attr-defined]
    assert img.read_bytes() == before
    assert json.loads(QEMU.img("info", "--output=json", img).stdout).get("snapshots") \
        is None


def test_snapshot_name_that_is_not_utf8_survives_a_table_rewrite(tmp_path: Path) -> None:
    """Names are bytes on disk: one qemu wrote that is not UTF-8 is kept byte for byte
    when diskimg rewrites the table (a new snapshot), and is found by those bytes."""
    img = tmp_path / "b.qcow2"
    raw = b"bad\xff\xfename"
    QEMU.img("create", "-f", "qcow2", img, "1M")
    QEMU.io(img, "write -P 7 0 64k", fmt=None)
    QEMU.img(b"snapshot", b"-c", raw, bytes(img))
    QEMU.io(img, "write -P 8 0 64k", fmt=None)
    with diskimg.open(img, "r+") as d:
        d.snapshots.create("new")  # type: ignore[attr-defined]
        old = d.snapshots.find(raw.decode("utf-8", "surrogateescape"))  # type: ignore
        assert old.id == "1"
    # qemu finds the old name by its bytes and reverts to its data
    QEMU.img(b"snapshot", b"-a", raw, bytes(img))
    QEMU.io(img, "read -P 7 0 64k", fmt=None)
    QEMU.check_clean(img)


def test_awkward_snapshot_names_print_as_qemu_prints_them(tmp_path: Path) -> None:
    """Tables pad by bytes and print names raw; JSON escapes every non-ASCII character as
    \\uXXXX (upper case), DEL too, and bytes that are not UTF-8 as U+FFFD."""
    img = tmp_path / "w.qcow2"
    QEMU.img("create", "-f", "qcow2", img, "1M")
    for name in (b"bad\xff\xfename", "caf\u00e9".encode(),
                 b"t\tab\x7fdel\xf0\x9f\x98\x80/x\"q\\", b"\\u00e9 literal"):
        QEMU.img(b"snapshot", b"-c", name, bytes(img))
    for args in (["snapshot", "-l"], ["info"], ["info", "--output=json"]):
        theirs = QEMU.img(*args, img, ok=None, text=False)
        mine = subprocess.run([sys.executable, "-m", "diskimg", *args, img],
                              capture_output=True)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
    doc = json.loads(subprocess.run([sys.executable, "-m", "diskimg", "info",
                                     "--output=json", img], capture_output=True).stdout)
    assert [s["name"] for s in doc["snapshots"]][:2] == ["bad\ufffd\ufffdname", "caf\u00e9"]


def test_snapshot_names_that_are_no_bytes_are_refused(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    diskimg.create(img, "qcow2", 1 << 20)
    with diskimg.open(img, "r+") as d, pytest.raises(diskimg.UsageError, match="surrogate"):
        d.snapshots.create("x\ud800")  # type: ignore[attr-defined]
