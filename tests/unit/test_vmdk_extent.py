"""diskimg.vmdk.flat: flat and zero extents as one-run plans; diskimg.vmdk.descfile: the
extent type guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskimg.errors import FormatError, UnsupportedFeatureError
from diskimg.hostio import open_host_file
from diskimg.plan import Run, RunKind
from diskimg.vmdk.descfile import guard_type
from diskimg.vmdk.flat import FlatExtent, ZeroExtent


def test_flat_extent_is_one_data_run_from_its_start(tmp_path: Path) -> None:
    p = tmp_path / "f.raw"
    p.write_bytes(b"h" * 1024 + b"guest" + b"g" * 507)
    with open_host_file(p) as h:
        ext = FlatExtent(h, 1024, 4096, "f.raw", "FLAT", True)
        r = ext.lookup(2, 4000)
        assert r == Run(2, 4000, RunKind.DATA, 1026, filename="f.raw")
        buf = bytearray(4000)
        ext.read_data(r, memoryview(buf))      # bytes past the file end read as zeros
    assert bytes(buf) == b"est" + b"g" * 507 + bytes(4000 - 510)


def test_zero_extent_plans_zeros_and_noaccess_refuses_reads() -> None:
    assert ZeroExtent(8192).lookup(512, 1024) == Run(512, 1024, RunKind.ZERO)
    na = ZeroExtent(8192, "FLAT", "gone.vmdk")
    with pytest.raises(UnsupportedFeatureError, match="NOACCESS"):
        na.lookup(0, 512)
    st = na.status(0, 512)                     # map still reports it, as zeros
    assert (st.length, st.allocated, st.data, st.zero) == (512, True, False, True)


@pytest.mark.parametrize("typ,err", [("VMFSRDM", UnsupportedFeatureError),
                                     ("VMFSRAW", UnsupportedFeatureError),
                                     ("BOGUS", FormatError)])
def test_guard_type_refuses_unknown_and_raw_device_extents(typ: str,
                                                           err: type[Exception]) -> None:
    with pytest.raises(err, match=typ):
        guard_type(typ)
    for ok in ("SPARSE", "FLAT", "VMFS", "ZERO", "VMFSSPARSE", "SESPARSE"):
        guard_type(ok)
