"""Golden layout tests: diskimg writes the same qcow2 bytes as qemu-img 7.2.

Each row runs qemu-img and diskimg with the same arguments on the same input and
``cmp``s the resulting files byte for byte.
"""

from __future__ import annotations

import filecmp
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
