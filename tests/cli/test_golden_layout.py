"""Golden layout tests: diskimg writes the same qcow2 bytes as qemu-img 7.2.

Each row runs qemu-img and diskimg with the same arguments on the same input and
``cmp``s the resulting files byte for byte.
"""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import needs_qemu, qemu

pytestmark = [needs_qemu, pytest.mark.qemu]

# preallocation=metadata with 512-byte clusters: with one refcount-table cluster (64
# entries) the table overflows at 64 refcount blocks -- 8 MiB of clusters at 16 bits,
# 4 MiB at 32 bits, 2 MiB at 64 bits -- and QEMU builds a new table at the next
# refcount-block boundary.  Sizes before and after that point.
CREATE_ROWS = [
    ("refcount_bits=16", "4M"),
    ("refcount_bits=16", "9M"),
    ("refcount_bits=32", "5M"),
    ("refcount_bits=64", "1M"),
    ("refcount_bits=64", "3M"),
    ("refcount_bits=64,compat=1.1,lazy_refcounts=on", "3M"),
    ("refcount_bits=8", "9M"),
]


@pytest.mark.parametrize(("extra", "size"), CREATE_ROWS)
def test_create_metadata_512_byte_identical(di, tmp_path: Path, extra: str,
                                            size: str) -> None:
    opts = f"preallocation=metadata,cluster_size=512,{extra}"
    q = qemu("create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", size, cwd=tmp_path)
    assert q.rc == 0, q.err
    d = di("create", "-q", "-f", "qcow2", "-o", opts, "d.qcow2", size, cwd=tmp_path)
    assert d.rc == 0, d.err
    assert filecmp.cmp(tmp_path / "q.qcow2", tmp_path / "d.qcow2", shallow=False), \
        f"{opts} {size}: files differ"
    chk = qemu("check", "d.qcow2", cwd=tmp_path)
    assert chk.rc == 0, chk.out + chk.err


# resize --preallocation=falloc|full: QEMU puts exactly sized refcount structures after
# the last cluster in use, the data clusters in one run after them and the L2 tables
# last; a partly used old last cluster gets a new cluster with its head copied (and, with
# extended L2, its old subcluster bitmap kept).
RESIZE_ROWS = [
    ("compat=1.1", "64M", "100M", "write -P 1 0 64K"),
    ("compat=1.1", "10M", "300M", "write -P 1 0 64K"),
    ("compat=0.10", "1M", "3M", "write -P 1 0 64K"),
    ("cluster_size=512,refcount_bits=64", "9M", "40M", "write -P 1 0 64K"),
    ("lazy_refcounts=on", "1M", "20M", "write -P 1 0 64K"),
    ("compat=1.1", "1000K", "5M", "write -P 2 960K 40K"),
    ("cluster_size=4096", "1000K", "5M", "write -z 960K 40K"),
    ("extended_l2=on", "1000K", "5M", "write -P 3 960K 2K"),
    ("extended_l2=on", "1000K", "5M", "write -z 960K 40K"),
]


@pytest.mark.parametrize("mode", ["falloc", "full"])
@pytest.mark.parametrize(("opts", "old", "new", "write"), RESIZE_ROWS)
def test_resize_preallocation_byte_identical(di, tmp_path: Path, mode: str, opts: str,
                                             old: str, new: str, write: str) -> None:
    import shutil
    import subprocess

    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    assert qemu("create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", old,
                cwd=tmp_path).rc == 0
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64K", "-c", write, "q.qcow2"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    shutil.copy(tmp_path / "q.qcow2", tmp_path / "d.qcow2")
    q = qemu("resize", "-q", f"--preallocation={mode}", "q.qcow2", new, cwd=tmp_path)
    assert q.rc == 0, q.err
    d = di("resize", "-q", f"--preallocation={mode}", "d.qcow2", new, cwd=tmp_path)
    assert d.rc == 0, d.err
    assert filecmp.cmp(tmp_path / "q.qcow2", tmp_path / "d.qcow2", shallow=False), \
        f"{opts} {old}->{new} {mode}: files differ"
    chk = qemu("check", "d.qcow2", cwd=tmp_path)
    assert chk.rc == 0, chk.out + chk.err


@pytest.mark.parametrize("cluster_size", ["4096", "65536"])
def test_convert_compressed_zlib_is_byte_identical(tmp_path: Path, cluster_size: str) -> None:
    """``convert -c`` (zlib) writes the same file as qemu-img: same deflate output, same
    allocation, and the file end padded to 512 bytes as qemu-img's final zero-length
    compressed write does."""
    import random

    r = random.Random(7)
    data = bytearray(3 << 20)
    for k in range(0, len(data), 65536):
        kind = k // 65536 % 4
        if kind == 0:
            data[k:k + 65536] = bytes(r.randrange(16) for _ in range(65536))  # compressible
        elif kind == 1:
            data[k:k + 65536] = r.randbytes(65536)  # stored uncompressed
        elif kind == 2:
            data[k:k + 1000] = b"tail" * 250  # mostly zeros
    (tmp_path / "s.raw").write_bytes(bytes(data))
    import sys

    for tool, out in ((["qemu-img"], "q.qcow2"), ([sys.executable, "-m", "diskimg"], "d.qcow2")):
        subprocess.run([*tool, "convert", "-c", "-O", "qcow2", "-o",
                        f"cluster_size={cluster_size}", "s.raw", out], cwd=tmp_path,
                       check=True, capture_output=True)
    q, d = (tmp_path / "q.qcow2").read_bytes(), (tmp_path / "d.qcow2").read_bytes()
    assert len(d) % 512 == 0 and len(d) == len(q)
    assert d == q
