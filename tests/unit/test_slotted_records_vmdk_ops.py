"""The records issue 20 moved off dataclasses (vmdk headers and descriptor, ops.chain's
layers, the CLI's progress schedule) keep a dataclass's behaviour: field order and
defaults, equality, frozen-ness and hashing, replace, repr and pickling, and no instance
``__dict__``."""

from __future__ import annotations

import pickle

import pytest

from diskimg.cli.progress import QemuProgress, Schedule
from diskimg.ops.chain import _Layer
from diskimg.slotted import FrozenInstanceError
from diskimg.vmdk import markers as M
from diskimg.vmdk import sparse as S
from diskimg.vmdk.cowd import CowdHeader
from diskimg.vmdk.descriptor import Descriptor
from diskimg.vmdk.extent_line import ExtentLine
from diskimg.vmdk.sesparse import SeSparseHeader


def test_sparse_header_defaults_replace_and_bytes() -> None:
    h = S.SparseHeader(1, 3, 2048, 128, 1, 20, 512, 21, 25, 128)
    assert (h.unclean_shutdown, h.eol, h.compress_algorithm) == (0, S.EOL_CHARS, 0)
    g = h.with_(gd_offset=99)
    assert (g.gd_offset, h.gd_offset) == (99, 25) and g != h
    assert S.SparseHeader.parse(g.pack()) == g and hash(S.SparseHeader.parse(h.pack())) == hash(h)
    with pytest.raises(TypeError):
        h.with_(no_such_field=1)
    with pytest.raises(FrozenInstanceError):
        h.flags = 0  # type: ignore[misc]
    assert not hasattr(h, "__dict__")
    assert pickle.loads(pickle.dumps(h)) == h
    assert repr(h).startswith("SparseHeader(version=1, flags=3, capacity=2048, ")


def test_cowd_marker_geometry_and_sesparse_records() -> None:
    c = CowdHeader(1, 3, 8192, 16, 4, 1)
    assert (c.file_sectors, c.sectors_per_track) == (0, 0)
    assert CowdHeader.parse(c.pack()) == c
    assert c.as_sparse().num_gtes_per_gt == CowdHeader.GTES
    m = M.Marker(4, 0, M.MARKER_GT)
    assert M.Marker.parse(m.pack()) == m and {m, M.Marker(4, 0, M.MARKER_GT)} == {m}
    g = S.Geometry(65536, 512, 2, 2048, 1 << 20)
    assert g.replace(gtes=1).gtes == 1 and g.gtes == 512
    fields = tuple(range(26))
    se = SeSparseHeader(fields)
    assert (se.fields, se.version, se.grains_size) == (fields, 1, 25)
    assert SeSparseHeader.parse(se.pack()) == se
    with pytest.raises(AttributeError):
        _ = se.no_such_field


def test_descriptor_records() -> None:
    e = ExtentLine("RW", 2048, "FLAT", "a-flat.vmdk", 0)
    assert ExtentLine("RW", 8, "ZERO") == ExtentLine("RW", 8, "ZERO", None, None)
    assert ExtentLine.parse(e.pack(), 1) == e and hash(e) == hash(ExtentLine.parse(e.pack()))
    with pytest.raises(FrozenInstanceError):
        e.sectors = 1  # type: ignore[misc]
    d, other = Descriptor(["# Disk DescriptorFile"]), Descriptor(["# Disk DescriptorFile"])
    assert (d.trailer, d.extents) == ("", []) and d == other
    d.extents.append(e)  # each descriptor has its own list (default_factory)
    assert other.extents == [] and d != other
    with pytest.raises(TypeError):
        hash(d)
    assert pickle.loads(pickle.dumps(d)) == d


def test_chain_layer_and_progress_schedule() -> None:
    a = _Layer("/a.qcow2", "qcow2", None)
    assert a == _Layer("/a.qcow2", "qcow2", None) != _Layer("/a.qcow2", "qcow2", "b")
    with pytest.raises(FrozenInstanceError):
        a.path = "/b"  # type: ignore[misc]
    p = QemuProgress(False, 1.0)
    s, t = Schedule(p, 100), Schedule(p, 100)
    assert (s.steps, s.done) == ([], 0) and s.steps is not t.steps
    s.add(50, 1.0, 100)
    assert s.steps == [(50, 1.0, 100, "")] and t.steps == []
    with pytest.raises(TypeError):
        hash(s)
