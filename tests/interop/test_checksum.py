"""``diskimg checksum`` / ``diskimg.checksum`` against ovirt-imageio, the oracle.

Every image is made by qemu-img/qemu-io (sizes that are not a multiple of the block size,
data at offset 0 and in the last, short block, holes, zero clusters, written zeros,
compressed clusters, a backing chain, LUKS (qemu-img's fixtures/luks.qcow2, written to by
qemu-io), vmdk).  The oracle's value is computed over
the same guest bytes: qemu-img converts the image to raw and ovirt-imageio's public
``client.checksum`` hashes that file.

ovirt-imageio (PyPI, in the ``test`` extra) builds a C extension: it needs a C compiler
and the Python headers.  When it is not installed the oracle tests are skipped (with that
reason); the tests that need no oracle still run."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

import diskimg

try:
    from ovirt_imageio import client as ovirt_client
except ImportError:  # pragma: no cover - depends on the machine
    ovirt_client = None

pytestmark = pytest.mark.qemu
needs_oracle = pytest.mark.skipif(
    ovirt_client is None,
    reason="ovirt-imageio (the checksum oracle) is not installed: pip install "
           "ovirt-imageio==2.5.1 (needs a C compiler and the Python headers)")

K, M = 1024, 1024 * 1024
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SECRET_OBJ = "secret,id=s0,data=fixture-secret"
KEY = {"secrets": {"s0": b"fixture-secret"}, "options": {"encrypt.key-secret": "s0"}}


def _io(path: Path | str, fmt: str | None, *cmds: str, **kw: Any) -> None:
    QEMU.io(path, *cmds, fmt=fmt, **kw)


def _raw_of(img: Path | str, fmt: str | None, *extra: str) -> Path:
    """The guest bytes of ``img`` as a raw file, converted by qemu-img."""
    out = Path(str(img).split("file.filename=")[-1].split(",")[0] + ".oracle.raw")
    QEMU.img("convert", *(("-f", fmt) if fmt else ()), *extra, "-O", "raw", img, out)
    return out


def oracle(raw: Path, block_size: int, algorithm: str = "blake2b") -> dict[str, Any]:
    assert ovirt_client is not None
    res: dict[str, Any] = ovirt_client.checksum(str(raw), block_size=block_size,
                                                algorithm=algorithm)
    return res


# --- the images (each returns the path, its format and diskimg.open keywords) ----------


Made = tuple[Path, str, dict[str, Any]]


def raw_image(d: Path) -> Made:
    p = d / "disk.raw"
    size = 5 * M + 3 * K
    QEMU.img("create", "-q", "-f", "raw", p, str(size))
    _io(p, "raw", "write -P 0x11 0 64k", "write -P 0x22 2M 100k",
        f"write -P 0x33 {size - K} 1k")
    return p, "raw", {}


def qcow2_holes_zeros(d: Path) -> Made:
    p = d / "holes.qcow2"
    size = 9 * M + 512
    QEMU.img("create", "-q", "-f", "qcow2", p, str(size))
    _io(p, "qcow2",
        "write -P 0xa1 0 4k",              # data at offset 0
        "write -z 1M 128k",                # zero clusters over nothing
        "write -P 0xa2 3M 200k",
        "write -z 3136k 64k",              # zero cluster over data
        "write -P 0 5M 64k",               # allocated, written zeros
        "write -P 0xa3 4194300 8",         # across a 4 MiB block boundary
        f"write -P 0xa4 {size - 512} 512")  # the last, short block
    return p, "qcow2", {}


def qcow2_zero_tail(d: Path) -> Made:
    p = d / "tail.qcow2"
    # past the first read chunk (16 MiB), the last, short block is a hole
    QEMU.img("create", "-q", "-f", "qcow2", p, str(40 * M + 512))
    # a zero run from 16 MiB that ends inside a block
    _io(p, "qcow2", "write -P 0xa5 0 512", f"write -P 0xa6 {30 * M + 100 * K} 1k")
    return p, "qcow2", {}


def qcow2_compressed(d: Path) -> Made:
    src, _, _ = raw_image(d)
    p = d / "comp.qcow2"
    QEMU.img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", src, p)
    src.unlink()
    return p, "qcow2", {}


def qcow2_chain(d: Path) -> Made:
    base = d / "base.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", base, "5M")
    _io(base, "qcow2", "write -P 0xb1 0 5M")
    top = d / "top.qcow2"
    # longer than its backing file: past the base's end the top reads zeros
    QEMU.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
             str(7 * M + K))
    _io(top, "qcow2", "write -P 0xb2 64k 64k", "write -z 1M 1M",
        f"write -P 0xb3 {7 * M} 1k")
    return top, "qcow2", {}


def qcow2_luks(d: Path) -> Made:
    """fixtures/luks.qcow2 (made by qemu-img: 64 KiB + 512, data at 0, 32K and in the last
    partial cluster), more written by qemu-io (qemu-img's LUKS create alone takes seconds)."""
    p = d / "luks.qcow2"
    with gzip.open(FIXTURES / "luks.qcow2.gz") as f:
        p.write_bytes(f.read())
    _io(f"driver=qcow2,file.filename={p},encrypt.key-secret=s0", None,
        "write -z 16k 16k", "write -P 0xc1 40k 1000", image_opts=True, objects=[SECRET_OBJ])
    return p, "qcow2", KEY


def vmdk_sparse(d: Path) -> Made:
    p = d / "disk.vmdk"
    size = 6 * M + 512
    QEMU.img("create", "-q", "-f", "vmdk", p, str(size))
    _io(p, "vmdk", "write -P 0xd1 0 70k", "write -P 0 2M 64k",
        f"write -P 0xd2 {size - 512} 512")
    return p, "vmdk", {}


def vmdk_stream(d: Path) -> Made:
    src, _, _ = raw_image(d)
    p = d / "stream.vmdk"
    QEMU.img("convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             src, p)
    src.unlink()
    return p, "vmdk", {}


IMAGES: dict[str, Callable[[Path], Made]] = {
    "raw": raw_image, "qcow2-holes-zeros": qcow2_holes_zeros, "qcow2-zero-tail": qcow2_zero_tail,
    "qcow2-compressed": qcow2_compressed, "qcow2-chain": qcow2_chain,
    "qcow2-luks": qcow2_luks, "vmdk-sparse": vmdk_sparse, "vmdk-stream": vmdk_stream,
}


def _oracle_raw(p: Path, fmt: str, kw: dict[str, Any]) -> Path:
    if kw:  # LUKS: qemu-img needs the key
        return _raw_of(f"driver=qcow2,file.filename={p},encrypt.key-secret=s0", None,
                       "--object", SECRET_OBJ, "--image-opts")
    return _raw_of(p, fmt)


@needs_oracle
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_checksum_equals_ovirt_imageio(tmp_path: Path, name: str) -> None:
    p, fmt, kw = IMAGES[name](tmp_path)
    raw = _oracle_raw(p, fmt, kw)
    before = p.read_bytes()
    # the default, and blocks small enough for several blocks and a short last one
    for bs in (4 * M, M, 48 * K):
        theirs = oracle(raw, bs)
        ours = diskimg.checksum(p, block_size=bs, format=fmt, **kw)
        assert ours == theirs, (name, bs)
    # defaults are ovirt-imageio's: blake2b, 4 MiB
    assert diskimg.checksum(p, **kw) == oracle(raw, 4 * M)
    assert p.read_bytes() == before  # reads only


@needs_oracle
def test_other_algorithms_equal_ovirt_imageio(tmp_path: Path) -> None:
    p, fmt, _ = qcow2_holes_zeros(tmp_path)
    raw = _raw_of(p, fmt)
    for algorithm in ("sha256", "sha1", "blake2s", "sha3_256", "md5"):
        ours = diskimg.checksum(p, algorithm=algorithm, block_size=M)
        assert ours == oracle(raw, M, algorithm)
        assert ours["algorithm"] == algorithm and ours["block_size"] == M


@needs_oracle
def test_cli_human_json_and_luks_image_opts(tmp_path: Path, run: Any) -> None:
    p, _, _ = qcow2_luks(tmp_path)
    raw = _oracle_raw(p, "qcow2", KEY)
    spec = f"driver=qcow2,file.filename={p},encrypt.key-secret=s0"
    cli = [sys.executable, "-m", "diskimg", "checksum", "--object", SECRET_OBJ,
           "--image-opts"]
    want = oracle(raw, 4 * M)
    human = run([*cli, spec]).stdout
    assert human == f"{want['checksum']}  {spec}\n"  # sha256sum's layout
    js = run([*cli, "--output=json", "-b", "1M", "-a", "sha256", spec]).stdout
    assert json.loads(js) == oracle(raw, M, "sha256")
    assert list(json.loads(js)) == ["algorithm", "block_size", "checksum"]


def test_cli_progress_and_refusals(tmp_path: Path, run: Any) -> None:
    p, _, _ = qcow2_holes_zeros(tmp_path)
    before = p.read_bytes()
    cli = [sys.executable, "-m", "diskimg", "checksum"]
    want = diskimg.checksum(p)["checksum"]
    out = subprocess.run([*cli, "-p", p], capture_output=True, check=True).stdout
    # qemu-img's progress lines, ended by one newline, then the digest
    progress, digest = out.decode().split("\n", 1)
    steps = progress.split("\r")
    assert steps[0] == "    (0.00/100%)" and steps[-2:] == ["    (100.00/100%)", ""]
    assert digest == f"{want}  {p}\n"
    for args, msg in [(["-a", "shake_128"], "Unsupported checksum algorithm 'shake_128'"),
                      (["-b", "128M"], "block_size must be at most 67108864"),
                      (["--output=xml"], "--output must be used with human or json")]:
        res = run([*cli, *args, p], check=1)
        assert res.stdout == "" and msg in res.stderr and res.stderr.count("\n") == 1, args
    res = run([*cli, "-q", p])  # -q: no progress, the digest still printed
    assert res.stdout == f"{want}  {p}\n"
    assert p.read_bytes() == before


def test_content_changes_checksum_and_zeros_equal_holes(tmp_path: Path) -> None:
    size = 5 * M + 3 * K
    hole = tmp_path / "hole.qcow2"
    zeros = tmp_path / "zeros.qcow2"
    zclust = tmp_path / "zclust.qcow2"
    raw = tmp_path / "zeros.raw"
    for p in (hole, zeros, zclust):
        QEMU.img("create", "-q", "-f", "qcow2", p, str(size))
    QEMU.img("create", "-q", "-f", "raw", raw, str(size))
    _io(zeros, "qcow2", f"write -P 0 0 {size}")      # every byte allocated, zeros
    _io(zclust, "qcow2", f"write -z 0 {size}")       # zero clusters
    _io(raw, "raw", "write -P 0 1M 1M")              # some written zeros, rest a hole
    values = {diskimg.checksum(p, block_size=M)["checksum"]
              for p in (hole, zeros, zclust, raw)}
    assert len(values) == 1
    # one byte in the last, short block changes the checksum, and so does the same byte
    # in another block
    _io(hole, "qcow2", f"write -P 1 {size - 1} 1")
    changed = diskimg.checksum(hole, block_size=M)["checksum"]
    _io(zeros, "qcow2", f"write -P 1 {size - 1 - M} 1")
    moved = diskimg.checksum(zeros, block_size=M)["checksum"]
    assert len(values | {changed, moved}) == 3
