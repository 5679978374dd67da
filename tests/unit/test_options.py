"""options.compat_version: the one parser of qcow2's ``compat`` option, and the spellings
each qemu-img command accepts (create/amend take v2/v3 aliases, measure does not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diskimg.options import compat_version


def test_compat_table() -> None:
    assert [compat_version(v) for v in ("0.10", "1.1", "v2", "v3", "1.0", "", "V3")] == [
        2, 3, 2, 3, None, None, None]
    assert [compat_version(v, qapi_names=False) for v in ("0.10", "1.1", "v2", "v3")] == [
        2, 3, None, None]


@pytest.mark.qemu
@pytest.mark.parametrize("compat", ["0.10", "1.1", "v2", "v3", "bogus"])
def test_measure_and_create_accept_what_qemu_accepts(tmp_path: Path, qemu_img: str,
                                                     compat: str) -> None:
    def both(args: list[str]) -> tuple[int, int]:
        q = subprocess.run([qemu_img, *args], capture_output=True, cwd=tmp_path)
        d = subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                           cwd=tmp_path)
        return q.returncode, d.returncode

    meas = ["measure", "-O", "qcow2", "-o", f"compat={compat}", "--size", "1M"]
    q, d = both(meas)
    assert (q == 0) == (d == 0) == (compat in ("0.10", "1.1"))
    for tool in ("q", "d"):
        (tmp_path / tool).mkdir()
    q_run = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                            f"compat={compat}", "q/i.qcow2", "1M"], cwd=tmp_path,
                           capture_output=True)
    d_run = subprocess.run([sys.executable, "-m", "diskimg", "create", "-q", "-f", "qcow2",
                            "-o", f"compat={compat}", "d/i.qcow2", "1M"], cwd=tmp_path,
                           capture_output=True)
    assert (q_run.returncode == 0) == (d_run.returncode == 0) == (compat != "bogus")
    if compat != "bogus":  # same header version, byte-identical image
        assert (tmp_path / "d/i.qcow2").read_bytes() == (tmp_path / "q/i.qcow2").read_bytes()
    else:
        assert not (tmp_path / "d/i.qcow2").exists()
