"""The CI job of docs/howto/validate-in-ci.md works under ``bash -e`` (GitHub Actions' shell).

The ``run: |`` script is taken from the how-to's YAML block as written and run with
``bash -e`` over a directory of uploads: a clean image, one that only leaks (``check`` exits
3), a raw file (63) and one naming a backing file outside its directory (1).  The job must
visit every image, keep each one's ``check --output=json`` report, flag only the refused
one and exit 1; with only acceptable uploads it exits 0.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import diskimg

REPO = Path(__file__).resolve().parents[2]
HOWTO = REPO / "docs" / "howto" / "validate-in-ci.md"


def ci_script() -> str:
    """The body of the how-to's ``run: |`` step, dedented."""
    text = HOWTO.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block, "no yaml block in the how-to"
    m = re.search(r"^(\s*)run: \|\n((?:\1\s+.*\n|\s*\n)+)", block.group(1), re.M)
    assert m, "no `run: |` step in the how-to's yaml block"
    return textwrap.dedent(m.group(2))


def _tools(bin_dir: Path) -> dict[str, str]:
    """``diskimg`` running this tree's code, and a ``pip`` that installs nothing."""
    bin_dir.mkdir()
    (bin_dir / "diskimg").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m diskimg "$@"\n')
    (bin_dir / "pip").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _leaky(path: Path) -> None:
    """A qcow2 image with one leaked cluster (check exits 3)."""
    diskimg.create(str(path), "qcow2", 16 << 20)
    with open(path, "r+b") as f:
        f.seek(48)
        reftable, = struct.unpack(">Q", f.read(8))
        f.seek(reftable)
        refblock, = struct.unpack(">Q", f.read(8))
        leaked = -(-f.seek(0, 2) // 65536)
        f.seek(leaked * 65536)
        f.write(bytes(65536))
        f.seek(refblock + 2 * leaked)
        f.write(struct.pack(">H", 1))


def _run(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120)


def test_ci_howto_runs_under_bash_e(tmp_path: Path) -> None:
    script = ci_script()
    assert "pip install diskimg" in script and "--untrusted check" in script
    env = _tools(tmp_path / "bin")
    work = tmp_path / "job"
    up = work / "uploads"
    up.mkdir(parents=True)
    diskimg.create(str(up / "a-clean.qcow2"), "qcow2", 1 << 20)
    _leaky(up / "b-leaky.qcow2")
    (up / "c-disk.raw").write_bytes(b"\x55" * 4096)
    diskimg.create(str(work / "base.qcow2"), "qcow2", 1 << 20)
    diskimg.create(str(up / "d-escape.qcow2"), "qcow2", 1 << 20,
                   backing_file="../base.qcow2", backing_fmt="qcow2")
    images = {p.name: p.read_bytes() for p in up.iterdir()}

    p = _run(script, work, env)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == "::error file=uploads/d-escape.qcow2::check exit 1\n"
    assert "outside the allowed directories" in p.stderr
    # every image was visited and is unchanged; each acceptable one has its report
    assert {p.name: p.read_bytes() for p in up.iterdir() if p.name in images} == images
    clean = json.loads((up / "a-clean.qcow2.check.json").read_text())
    leaky = json.loads((up / "b-leaky.qcow2.check.json").read_text())
    assert (clean["check-errors"], clean.get("leaks", 0), clean["findings"]) == (0, 0, [])
    assert leaky["leaks"] == 1 and [f["kind"] for f in leaky["findings"]] == ["leak"]
    assert (up / "c-disk.raw.check.json").exists()
    assert (up / "d-escape.qcow2.check.json").read_text() == ""

    # only acceptable uploads (leaks and raw included): the job passes, also re-run over
    # the directory that now holds the reports
    (up / "d-escape.qcow2").unlink()
    (up / "d-escape.qcow2.check.json").unlink()
    p = _run(script, work, env)
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    assert json.loads((up / "b-leaky.qcow2.check.json").read_text())["leaks"] == 1
