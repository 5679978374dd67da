"""The shipped example images are the ones fixtures/README.md describes."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
_ROW = re.compile(r"^\| (\S+\.gz) \| (\d+) \| ([0-9a-f]{64}) \| ([0-9a-f]{64}) \|$", re.M)
TABLE = {m[0]: m[1:] for m in _ROW.findall((FIXTURES / "README.md").read_text())}


def test_every_stored_fixture_is_listed() -> None:
    assert sorted(TABLE) == sorted(p.name for p in FIXTURES.glob("*.gz"))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_fixture_checksums_match_readme(name: str) -> None:
    size, sha_img, sha_gz = TABLE[name]
    blob = (FIXTURES / name).read_bytes()
    assert len(blob) == int(size)
    assert hashlib.sha256(blob).hexdigest() == sha_gz
    assert hashlib.sha256(gzip.decompress(blob)).hexdigest() == sha_img


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["example.qcow2", "chain-top.qcow2"])
def test_qcow2_fixtures_are_clean_for_qemu(name: str, fixture_file, run, qemu_img: str) -> None:
    img = fixture_file(name)
    if name == "chain-top.qcow2":
        fixture_file("chain-base.qcow2")
    run([qemu_img, "check", img])
    run([qemu_img, "info", "--backing-chain", img])
