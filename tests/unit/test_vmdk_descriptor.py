"""diskimg.vmdk.descriptor: content IDs (new_cid) and the text descriptor round trip."""

from __future__ import annotations

import pytest

from diskimg.vmdk.create import build
from diskimg.vmdk.descriptor import NO_PARENT, Descriptor, new_cid
from diskimg.vmdk.extent_line import ExtentLine


def test_new_cid_is_reproducible_with_source_date_epoch_and_never_the_previous(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")
    a = new_cid(5)
    assert a == new_cid(5) and a != 5 and 0 <= a < 1 << 32
    assert new_cid(a) != a
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert len({new_cid(7) for _ in range(8)}) > 1       # random without it


def test_build_parses_back_and_set_cid_changes_only_the_cid() -> None:
    text = build(cid=0x1234abcd, parent_cid=NO_PARENT, create_type="monolithicFlat",
                 parent_hint=None, extents=[ExtentLine("RW", 2048, "FLAT", "a-flat.vmdk", 0)],
                 hw_version="4", cylinders=2, heads=16, adapter_type="ide",
                 tools_version="2147483647")
    d = Descriptor.parse(text.encode("latin-1"))
    assert (d.cid, d.parent_cid, d.create_type) == (0x1234abcd, NO_PARENT, "monolithicFlat")
    assert d.extents == [ExtentLine("RW", 2048, "FLAT", "a-flat.vmdk", 0)]
    d.set("CID", "beef")
    packed = d.pack().decode("latin-1")
    assert packed == text.replace("CID=1234abcd", "CID=beef")
