"""Leftovers of docs/compatibility.md's "Not there yet" list (issue 17), checked against
qemu-img: the lines a read-write open of a dirty lazy-refcounts image prints while it
repairs the image; the frame header of zstd-compressed clusters."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg import progname
from diskimg.qcow2.entries import decode_compressed
from diskimg.qcow2.layout import Header
from qemukit import QEMU

pytestmark = pytest.mark.qemu


def _dirty_lazy(d: Path) -> Path:
    """A lazy-refcounts image whose writer was killed: dirty bit set, refcounts stale."""
    p = d / "dirty.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "64M")
    QEMU.io(p, "write -P 0x5a 0 512", "write -P 0xa5 128k 64k", "flush", "sigraise 9",
            ok=None)  # killed on purpose: the image stays dirty
    with open(p, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1, "image should be left dirty"
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run_both(src: Path, args: tuple[str, ...]) -> tuple[
        Path, Path, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run ``qemu-img ARGS`` and ``diskimg ARGS`` (in ``src``'s directory) on two copies
    of ``src``; ``{}`` in ``args`` stands for the image, else it goes last."""
    d = src.parent
    ours, theirs = d / "ours.qcow2", d / "theirs.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)

    def argv(p: Path) -> list[str]:
        a = [x.format(p) for x in args]
        return a if "{}" in args else [*a, str(p)]

    want = QEMU.img(*argv(theirs), cwd=d)
    got = subprocess.run([sys.executable, "-m", "diskimg", *argv(ours)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=60, cwd=d)
    assert got.returncode == 0, got.stderr
    return ours, theirs, want, got


@pytest.mark.parametrize("args", [("amend", "-o", "lazy_refcounts=off"),
                                  ("resize", "{}", "+1M")], ids=["amend", "resize"])
def test_dirty_repair_prints_qemus_lines(tmp_path: Path, args: tuple[str, ...]) -> None:
    ours, theirs, want, got = _run_both(_dirty_lazy(tmp_path), args)
    assert "Repairing cluster" in want.stderr  # the repair did happen, in qemu too
    assert got.stderr == want.stderr
    assert got.stdout == want.stdout
    assert _sha(ours) == _sha(theirs)
    QEMU.check_clean(ours)


def test_library_open_repairs_quietly_unless_given_a_sink(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _dirty_lazy(tmp_path)
    quiet, heard = tmp_path / "quiet.qcow2", tmp_path / "heard.qcow2"
    shutil.copyfile(src, quiet)
    shutil.copyfile(src, heard)
    want = QEMU.io(tmp_path / "dirty.qcow2", "write -P 0x77 4096 512").stderr
    with diskimg.open(quiet, "r+") as dev:
        dev.write(4096, b"\x77" * 512)
    assert capfd.readouterr().err == ""  # the library prints nothing by itself
    lines: list[str] = []
    progname.set_message_sink(lines.append)
    try:
        with diskimg.open(heard, "r+") as dev:
            dev.write(4096, b"\x77" * 512)
    finally:
        progname.set_message_sink(None)
    assert "".join(line + "\n" for line in lines) == want
    assert _sha(quiet) == _sha(heard) == _sha(tmp_path / "dirty.qcow2")


def _zstd_frames(p: Path) -> list[bytes]:
    """The stored bytes of every compressed cluster in the first L2 table of ``p``."""
    data = p.read_bytes()
    h = Header.parse(data[:65536])
    l2 = int.from_bytes(data[h.l1_table_offset:h.l1_table_offset + 8], "big") \
        & 0x00FF_FFFF_FFFF_FE00
    out = []
    for i in range(h.cluster_size // 8):
        e = int.from_bytes(data[l2 + 8 * i:l2 + 8 * i + 8], "big")
        if e >> 62 & 1:
            off, n = decode_compressed(e, h.cluster_bits)
            out.append(data[off:off + n])
    return out


def test_zstd_frames_carry_the_content_size_as_qemus(tmp_path: Path, run: object) -> None:
    import zstandard

    src = tmp_path / "src.raw"
    words = [bytes([97 + (i * 7 + j) % 26 for j in range(2 + i % 7)]) + b" "
             for i in range(97)]
    src.write_bytes(b"".join(words[(i * i) % 97] for i in range(80000))[:256 << 10])
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for exe, out in (([sys.executable, "-m", "diskimg"], ours), ([QEMU.qemu_img], theirs)):
        subprocess.run([*exe, "convert", "-c", "-O", "qcow2", "-o",
                        "compression_type=zstd", str(src), str(out)],
                       check=True, capture_output=True, timeout=60)
    mine, qemus = _zstd_frames(ours), _zstd_frames(theirs)
    assert len(mine) == len(qemus) == 4
    for a, b in zip(mine, qemus):
        fa, fb = zstandard.get_frame_parameters(a), zstandard.get_frame_parameters(b)
        assert (fa.content_size, fa.window_size, fa.has_checksum, fa.dict_id) == \
            (fb.content_size, fb.window_size, fb.has_checksum, fb.dict_id) == \
            (65536, 65536, False, 0)
        assert a[:7] == b[:7]  # magic, frame header descriptor, 2-byte content size
    assert QEMU.compare(ours, theirs) == 0
    assert QEMU.raw_bytes(ours) == src.read_bytes()
    QEMU.check_clean(ours)


def _foreign_table(d: Path, autoclear: int = 0) -> Path:
    """A qcow2 image whose feature-name table another tool wrote (one name changed)."""
    p = d / "foreign.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p, "1M")
    data = bytearray(p.read_bytes())
    i = data.index(b"dirty bit")
    data[i:i + 9] = b"DIRTY BIT"
    data[95] |= autoclear  # low byte of autoclear_features (0x58)
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("args", [("amend", "-o", "lazy_refcounts=off"),
                                  ("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2"),
                                  ("bitmap", "--add", "{}", "b0")],
                         ids=["amend-nochange", "rebase", "bitmap"])
def test_whole_header_rewrite_writes_qemus_feature_table(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    ours, theirs, want, got = _run_both(_foreign_table(tmp_path), args)
    assert b"DIRTY BIT" not in ours.read_bytes()
    assert _sha(ours) == _sha(theirs)


def test_clearing_unknown_autoclear_bits_writes_qemus_feature_table(tmp_path: Path) -> None:
    src = _foreign_table(tmp_path, autoclear=0x20)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    QEMU.io(theirs, "write -P 0x3c 0 512")
    with diskimg.open(ours, "r+") as dev:
        dev.write(0, b"\x3c" * 512)
    data = ours.read_bytes()
    assert b"DIRTY BIT" not in data and b"dirty bit" in data
    assert _sha(ours) == _sha(theirs)


def test_cli_in_process_leaves_the_library_quiet(tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """Running the CLI in-process (``diskimg.cli.main.main([...])``) sets the stderr
    message sink for that call only: a later library open repairs quietly again."""
    from diskimg.cli.main import main

    src = _dirty_lazy(tmp_path)
    other = tmp_path / "other.qcow2"
    shutil.copyfile(src, other)
    assert main(["info", str(src)]) == 0
    capfd.readouterr()
    with diskimg.open(other, "r+") as dev:
        dev.write(4096, b"\x77" * 512)
    assert capfd.readouterr().err == ""
    assert progname.message_sink() is None
