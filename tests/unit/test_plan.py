"""diskimg.plan: the Run record and the plan invariants check_plan states."""

from __future__ import annotations

import pytest

from diskimg.plan import Run, RunKind, check_plan
from diskimg.slotted import FrozenInstanceError

D, Z, U, C = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED


def test_run_is_frozen_slotted_and_knows_its_end_and_allocation() -> None:
    r = Run(4096, 512, D, 1 << 20, filename="x.vmdk")
    assert (r.end, r.allocated) == (4608, True)
    assert not Run(0, 1, U).allocated and Run(0, 1, Z).allocated and Run(0, 1, C).allocated
    with pytest.raises(FrozenInstanceError):
        r.length = 1  # type: ignore[misc]
    assert not hasattr(r, "__dict__")
    assert r == Run(4096, 512, D, 1 << 20, 0, "x.vmdk")


def test_kinds_are_an_enum_not_strings() -> None:
    assert {k.name for k in RunKind} == {"DATA", "ZERO", "UNALLOCATED", "COMPRESSED"}
    assert all(not isinstance(k.value, str) for k in RunKind)


def test_check_plan_accepts_a_contiguous_ordered_cover() -> None:
    check_plan([Run(0, 10, U), Run(10, 5, D, 99), Run(15, 1, Z)], 0, 16, size=16)
    check_plan([], 7, 7)


@pytest.mark.parametrize("runs,start,end,size,msg", [
    ([Run(0, 0, U)], 0, 0, None, "empty"),
    ([Run(0, 4, U), Run(5, 4, U)], 0, 9, None, "expected 4"),     # a gap
    ([Run(0, 4, U), Run(3, 4, U)], 0, 7, None, "expected 4"),     # an overlap
    ([Run(0, 4, D)], 0, 4, None, "host"),                          # DATA without host
    ([Run(0, 4, U)], 0, 8, None, "ends at 4"),                      # short
    ([Run(0, 8, U)], 0, 8, 4, "outside"),                           # past the device
    ([Run(-4, 4, U)], -4, 0, None, "outside"),
])
def test_check_plan_names_the_broken_invariant(runs: list[Run], start: int, end: int,
                                               size: int | None, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        check_plan(runs, start, end, size)
