"""``dd -p`` (diskimg's addition: qemu-img dd has no ``-p``): ``convert -p``'s
``    (NN.NN/100%)\\r`` lines on stdout, rising from 0.00 to 100.00, then a newline; the
output image holds the copied blocks."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from diskimg import api

from .conftest import make_raw, run_module

MIB = 1 << 20


def values(out: str) -> list[float]:
    assert out.endswith("\r\n")
    lines = out[:-1].split("\r")[:-1]
    assert all(re.fullmatch(r" {4}\(\d+\.\d\d/100%\)", x) for x in lines), lines
    return [float(x.strip()[1:].split("/")[0]) for x in lines]


def guest(path: Path) -> bytes:
    with api.open(path, "r") as dev:
        return dev.read(0, dev.size)


def test_dd_progress(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MIB)
    make_raw(tmp_path / "in.raw", 10 * MIB, [(MIB, data), (9 * MIB, b"\x11" * 512)])
    r = run_module("dd", "-p", "-O", "qcow2", "bs=64k", "if=in.raw", "of=out.qcow2",
                   cwd=tmp_path)
    assert (r.rc, r.err) == (0, "")
    assert values(r.out) == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]  # 2 MiB chunks of 10 MiB
    assert hashlib.sha256(guest(tmp_path / "out.qcow2")).digest() == \
        hashlib.sha256((tmp_path / "in.raw").read_bytes()).digest()
    # skip and count: the percentages are of the 4 MiB copied
    r = run_module("dd", "-p", "bs=1M", "skip=1", "count=5", "if=in.raw", "of=part.raw",
                   cwd=tmp_path)
    assert (r.rc, r.err) == (0, "")
    assert values(r.out) == [0.0, 50.0, 100.0]
    assert (tmp_path / "part.raw").read_bytes() == (tmp_path / "in.raw").read_bytes()[MIB:5 * MIB]
    # without -p: nothing on stdout
    r = run_module("dd", "bs=1M", "count=1", "if=in.raw", "of=p2.raw", cwd=tmp_path)
    assert (r.rc, r.out, r.err) == (0, "", "")
