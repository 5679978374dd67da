"""SOURCE_DATE_EPOCH makes create/convert/snapshot byte-reproducible (vmdk CIDs, snapshot
dates); without it vmdk CIDs stay random, as qemu-img's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import diskimg


def build(d: Path) -> list[bytes]:
    d.mkdir()
    diskimg.create(d / "a.vmdk", "vmdk", 10 << 20)
    diskimg.create(d / "q.qcow2", "qcow2", 10 << 20)
    with diskimg.open(d / "q.qcow2", "r+") as q:
        q.write(0, b"x" * 70000)
        q.snapshots.create("s")  # type: ignore[attr-defined]
    with diskimg.open(d / "a.vmdk", "r+") as v:
        v.write(0, b"x" * 70000)  # changes the CID
    diskimg.convert(d / "q.qcow2", d / "s.vmdk", "vmdk",
                    options={"subformat": "streamOptimized"})
    return [(d / n).read_bytes() for n in ("a.vmdk", "q.qcow2", "s.vmdk")]


def test_source_date_epoch_gives_identical_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert build(tmp_path / "x") == build(tmp_path / "y")
    with diskimg.open(tmp_path / "x" / "q.qcow2") as q:
        assert q.snapshots.list()[0].date_sec == 1700000000  # type: ignore[attr-defined]


def test_without_it_vmdk_cids_are_random(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    cids = set()
    for i in range(3):
        diskimg.create(tmp_path / f"{i}.vmdk", "vmdk", 1 << 20)
        with diskimg.open(tmp_path / f"{i}.vmdk") as v:
            cids.add(v.cid)  # type: ignore[attr-defined]
    assert len(cids) == 3
    assert "SOURCE_DATE_EPOCH" not in os.environ
