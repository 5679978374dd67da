"""diskimg amend against qemu-img amend on twin images."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import needs_qemu, qemu
from .lifecycle_helpers import create, qcheck_clean, qcompare, qio, sh

pytestmark = [pytest.mark.qemu, needs_qemu]


def build(d: Path) -> None:
    create(d, "am.qcow2", "10M")
    qio(d, "am.qcow2", "write -P 1 0 64k", "write -z 1M 128k", "write -P 2 3M 64k",
        "write -z 3M 64k", "write -c -P 5 5M 64k")
    create(d, "ov.qcow2", None, "-b", "am.qcow2", "-F", "qcow2")
    qio(d, "ov.qcow2", "write -z 0 64k", "write -P 3 2M 64k")
    create(d, "v2.qcow2", "10M", "-o", "compat=0.10")
    qio(d, "v2.qcow2", "write -P 1 0 64k")


# (image, options, byte-identical to qemu's result)
CASES = [
    ("am.qcow2", "compat=0.10", True), ("ov.qcow2", "compat=0.10", True),
    ("v2.qcow2", "compat=1.1", True), ("am.qcow2", "lazy_refcounts=on", True),
    ("am.qcow2", "size=20M", True), ("am.qcow2", "size=4M", False),
    ("am.qcow2", "refcount_bits=1", False), ("am.qcow2", "refcount_bits=64", False),
    ("ov.qcow2", "backing_file=am.qcow2,backing_fmt=qcow2", True),
    ("am.qcow2", "compat=0.10,refcount_bits=8", True), ("am.qcow2", "help", True),
    ("am.qcow2", "cluster_size=4k", True), ("am.qcow2", "extended_l2=on", True),
    ("am.qcow2", "compression_type=zstd", True), ("am.qcow2", "backing_fmt=raw", True),
    ("am.qcow2", "foo=bar", True), ("am.qcow2", "compat=foo", True),
    ("am.qcow2", "refcount_bits=3", True), ("am.qcow2", "data_file=x", True),
    ("am.qcow2", "data_file_raw=on", True), ("v2.qcow2", "lazy_refcounts=on", True),
]


@pytest.mark.parametrize("name,olist,identical", CASES)
def test_amend_matches_qemu(di, twin_dirs: tuple[Path, Path], name: str, olist: str,
                            identical: bool) -> None:
    q, m = twin_dirs
    build(q)
    build(m)
    ref = qemu("amend", "-o", olist, name, cwd=q)
    mine = di("amend", "-o", olist, name, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    qcheck_clean(m, name)
    assert qcompare(q / name, m / name) == 0
    assert sh(q, "qemu-img", "info", name).stdout.split("disk size")[0] == \
        sh(m, "qemu-img", "info", name).stdout.split("disk size")[0]
    if identical:
        assert (q / name).read_bytes() == (m / name).read_bytes()


def test_amend_needs_options(di, tmp_path: Path) -> None:
    build(tmp_path)
    for args in (["amend", "am.qcow2"], ["amend", "-o", "compat=0.10"]):
        mine = di(*args, cwd=tmp_path)
        ref = qemu(*args, cwd=tmp_path)
        assert (mine.rc, mine.err) == (ref.rc, ref.err)
