"""The metadata interface (qcow2/metadata.py, issue 16): snapshot.py and bitmaps.py see
the image only through :class:`MetadataImage`, and what the interface's methods do to
the file."""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

import pytest

import diskimg
from diskimg.crypto import SectorCipher
from diskimg.qcow2 import metadata
from diskimg.qcow2.image import Qcow2Image
from diskimg.qcow2.metadata import MetadataImage

SRC = Path(metadata.__file__).resolve().parent
CS = 65536


def _members() -> set[str]:
    tree = ast.parse((SRC / "metadata.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MetadataImage")
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _image_attrs(module: str) -> list[tuple[int, str]]:
    """(line, name) of every attribute read or written on the image: ``img.X`` and
    ``self.img.X`` (the modules name the image ``img``)."""
    out = []
    for node in ast.walk(ast.parse((SRC / module).read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if (isinstance(v, ast.Name) and v.id == "img") or (
                isinstance(v, ast.Attribute) and v.attr == "img"
                and isinstance(v.value, ast.Name) and v.value.id == "self"):
            out.append((node.lineno, node.attr))
    return out


@pytest.mark.parametrize("module", ["snapshot.py", "bitmaps.py", "snapshot_table.py"])
def test_metadata_modules_use_only_the_interface(module: str) -> None:
    members = _members()
    used = _image_attrs(module)
    assert used, module  # the walk finds the accesses at all
    outside = [(line, name) for line, name in used if name not in members]
    assert outside == [], f"{module} uses image members outside MetadataImage: {outside}"


def test_metadata_interface_is_assigned_nowhere() -> None:
    """The tables are replaced through install_*, never by assignment."""
    for module in ("snapshot.py", "bitmaps.py"):
        for node in ast.walk(ast.parse((SRC / module).read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute):
                        v = t.value
                        assert not (isinstance(v, ast.Name) and v.id == "img"), (
                            f"{module}:{node.lineno} assigns img.{t.attr}")


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 255 for i in range(n))


def test_qcow2image_has_every_interface_member(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 4 * CS)
    with diskimg.open(p, "r+") as img:
        missing = [m for m in sorted(_members()) if not hasattr(img, m)]
        assert missing == []
        assert isinstance(img, Qcow2Image)
        md: MetadataImage = img  # mypy checks that Qcow2Image implements the interface
        assert md.has_data_file is False and md.cs == CS and md.cb == 16


@pytest.mark.qemu
def test_free_after_flush_frees_at_the_flush_only(tmp_path: Path, qemu_img: str) -> None:
    """A cluster handed to free_after_flush keeps its refcount until the flush writes
    the tables, then is free (reused by the next allocation); the guest data is
    untouched and qemu-img check finds neither leak nor corruption."""
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 8 * CS)
    data = _pattern(3 * CS, 7)
    with diskimg.open(p, "r+") as img:
        img.write(0, data)
        img.flush()
        assert isinstance(img, Qcow2Image)
        md: MetadataImage = img
        md.begin_change()
        off = md.refcounts.alloc(1)
        md.flush_refcounts()
        md.host.pwrite(off, b"\xaa" * CS)
        md.free_after_flush(off, CS)
        assert md.refcounts.get(off // CS) == 1  # not before the flush
        img.flush()
        assert md.refcounts.get(off // CS) == 0
        assert md.refcounts.alloc(1) == off  # the freed cluster is the first free one
        md.refcounts.free(off, CS)
        img.flush()
        assert img.read(0, 3 * CS) == data
    res = subprocess.run([qemu_img, "check", "--output=json", str(p)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"leaks"' not in res.stdout and '"corruptions"' not in res.stdout
    raw = tmp_path / "a.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(p), str(raw)], check=True)
    assert hashlib.sha256(raw.read_bytes()).digest() == hashlib.sha256(
        data + bytes(5 * CS)).digest()


@pytest.mark.qemu
def test_install_tables_after_snapshot_switch(tmp_path: Path, qemu_img: str) -> None:
    """After a snapshot create (the header switch, then install_tables) the image in
    memory is the one on disk: the same reads before and after reopening, writes
    after the switch land (COW of the now shared clusters), and the snapshot keeps the
    old data."""
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", 8 * CS)
    old, new = _pattern(2 * CS, 1), _pattern(CS // 2, 2)
    with diskimg.open(p, "r+") as img:
        assert isinstance(img, Qcow2Image)
        img.write(0, old)
        img.snapshots.create("s1", date=1.0)
        assert img.l1_dirty == set()
        assert img.read(0, 2 * CS) == old
        img.write(100, new)
    want = bytearray(old) + bytes(6 * CS)
    want[100 : 100 + len(new)] = new
    res = subprocess.run([qemu_img, "check", str(p)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    with diskimg.open(p) as img:
        assert isinstance(img, Qcow2Image)
        assert img.read(0, 8 * CS) == bytes(want)
        assert img.snapshot_view(name="s1").read(0, 2 * CS) == old


def test_sector_cipher_protocol_declares_wipe() -> None:
    """Closing an image wipes its cipher's key: part of the protocol, not probed."""

    class NoWipe:
        def encrypt(self, sector: int, buf: bytearray | memoryview) -> None: ...

        def decrypt(self, sector: int, buf: bytearray | memoryview) -> None: ...

    assert not isinstance(NoWipe(), SectorCipher)
    from diskimg.crypto.qcow_aes import QcowAesCipher

    c = QcowAesCipher.from_passphrase(b"pw")
    assert isinstance(c, SectorCipher)
    c.wipe()
    assert c.wiped
