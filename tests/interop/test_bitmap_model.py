"""Persistent bitmaps against a model: any sequence of add/remove/clear/enable/disable/
merge/write/reopen through ``img.bitmaps`` leaves bitmaps whose dirty granules are the
model's, read back by diskimg and by qemu-nbd + nbdinfo, in an image qemu-img check
finds clean, with the flags and granularities qemu-img info shows."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemukit import QEMU

import diskimg

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd")
                                      and shutil.which("nbdinfo")),
                                 reason="qemu-img/qemu-nbd/nbdinfo absent")]

SIZE = 3 << 20
NAMES = ("a", "b", "c")
_name = st.sampled_from(NAMES)
_ops = st.one_of(
    st.tuples(st.just("add"), _name, st.sampled_from([512, 4096, 65536, 1 << 20]),
              st.booleans()),
    st.tuples(st.just("remove"), _name),
    st.tuples(st.just("clear"), _name),
    st.tuples(st.just("enable"), _name),
    st.tuples(st.just("disable"), _name),
    st.tuples(st.just("merge"), _name, _name),
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200000)),
    st.tuples(st.just("reopen")),
)


class Model:
    def __init__(self) -> None:
        self.bm: dict[str, dict[str, Any]] = {}  # name -> granularity, enabled, granules
        self.order: list[str] = []

    def mark(self, name: str, off: int, n: int) -> None:
        g = self.bm[name]["gran"]
        self.bm[name]["dirty"].update(range(off // g, (off + n - 1) // g + 1))

    def extents(self, name: str) -> list[tuple[int, int]]:
        g = self.bm[name]["gran"]
        out: list[tuple[int, int]] = []
        for i in sorted(self.bm[name]["dirty"]):
            off, end = i * g, min((i + 1) * g, SIZE)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((off, end - off))
        return out


def _apply(d: Any, m: Model, op: tuple[Any, ...]) -> None:
    kind, *args = op
    if kind == "write":
        off, n = args[0], min(args[1], SIZE - args[0])
        d.write(off, b"\xa5" * n)
        for name in m.bm:
            if m.bm[name]["on"]:
                m.mark(name, off, n)
        return
    name = args[0]
    exists = name in m.bm
    if kind == "add":
        if exists:
            with pytest.raises(diskimg.UsageError, match="already exists"):
                d.bitmaps.add(name, args[1], disabled=args[2])
            return
        d.bitmaps.add(name, args[1], disabled=args[2])
        m.bm[name] = {"gran": args[1], "on": not args[2], "dirty": set()}
        m.order.append(name)
        return
    if not exists or (kind == "merge" and args[1] not in m.bm):
        with pytest.raises(diskimg.UsageError, match="not found"):
            getattr(d.bitmaps, kind)(*args)
        return
    getattr(d.bitmaps, kind)(*args)
    if kind == "remove":
        del m.bm[name]
        m.order.remove(name)
    elif kind == "clear":
        m.bm[name]["dirty"] = set()
    elif kind in ("enable", "disable"):
        m.bm[name]["on"] = kind == "enable"
    else:
        for off, n in m.extents(args[1]):
            m.mark(name, off, n)


@settings(max_examples=6)
@given(ops=st.lists(_ops, min_size=1, max_size=14))
def test_bitmap_actions_match_the_model(tmp_path_factory: pytest.TempPathFactory,
                                        ops: list[tuple[Any, ...]]) -> None:
    p = tmp_path_factory.mktemp("model") / "m.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", p, str(SIZE))
    m = Model()
    d = diskimg.open(p, "r+")
    try:
        for op in ops:
            if op[0] == "reopen":
                d.close()
                d = diskimg.open(p, "r+")
            else:
                _apply(d, m, op)
        for name in m.order:
            assert list(d.dirty_extents(name)) == m.extents(name)
    finally:
        d.close()
    QEMU.check_clean(p)
    info = QEMU.info(p)["format-specific"]["data"].get("bitmaps", [])
    assert info == [{"flags": ["auto"] if m.bm[n]["on"] else [], "name": n,
                     "granularity": m.bm[n]["gran"]} for n in m.order]
    with diskimg.open(p) as d:
        for name in m.order:
            assert list(d.dirty_extents(name)) == m.extents(name) == QEMU.dirty_map(p, name)
