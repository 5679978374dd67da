"""Start-up shape, without clocks: a command imports only what it needs (issue 7).

``info``, ``check`` and ``map`` copy no data, so they must not load the copy engine
(``diskimg.operations``: threads and queues), the progress printer, the ``--object``
parser, the storage-pool layer or the compression libraries; human output must not load
``json``.  Each case runs the real CLI in a fresh interpreter and lists ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg

NOT_FOR_READING = ("diskimg.operations", "diskimg.cli.progress", "diskimg.secrets",
                   "diskimg.pool", "diskimg.vmdk", "concurrent.futures", "queue",
                   "zstandard", "cryptography")

PROBE = """\
import sys
from diskimg.cli.main import main
code = main(sys.argv[1:])
sys.stdout.flush()
had_json = "json" in sys.modules
import json
sys.stderr.write("\\n@@" + json.dumps([had_json, code, sorted(sys.modules)]))
"""


def _modules_after(args: list[str]) -> tuple[int, set[str], bool]:
    """Exit code of ``diskimg ARGS``, the modules it loaded, and whether ``json`` was
    among them (the probe imports json itself afterwards)."""
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                       text=True, check=False)
    had_json, code, mods = json.loads(r.stderr.rsplit("\n@@", 1)[1])
    return code, set(mods), had_json


@pytest.mark.parametrize("args, wants_json", [
    (["info"], False), (["info", "--output=json"], True), (["check"], False),
    (["check", "--output=json"], True), (["map"], False), (["map", "--output=json"], False),
    (["snapshot", "-l"], False),
])
def test_reading_commands_import_only_what_they_need(image: Path, args: list[str],
                                                     wants_json: bool) -> None:
    code, mods, had_json = _modules_after([*args, str(image)])
    assert code == 0
    assert "diskimg.qcow2.image" in mods  # the probe did run the command
    loaded = sorted(m for m in mods for bad in NOT_FOR_READING
                    if m == bad or m.startswith(bad + "."))
    assert loaded == []
    # map writes its JSON lines itself (qemu's one-line-per-entry layout)
    assert had_json == wants_json


def test_convert_loads_the_copy_engine(image: Path, tmp_path: Path) -> None:
    """The other side: the lazy imports are really taken when a command copies data."""
    code, mods, _ = _modules_after(["convert", "-f", "qcow2", "-O", "raw", str(image),
                                    str(tmp_path / "o.raw")])
    assert code == 0
    assert "diskimg.ops.copier" in mods
    # the copy engine only: not the other commands, nor the compatibility re-exports
    assert not {"diskimg.operations", "diskimg.ops.chain", "diskimg.ops.compare",
                "diskimg.ops.dd"} & mods, sorted(mods)
    assert (tmp_path / "o.raw").stat().st_size == 1 << 30


def test_lazy_top_level_names_are_the_real_ones() -> None:
    """``diskimg.convert`` and friends, imported on first use, are the operations."""
    from diskimg import operations

    for name in ("commit", "compare", "convert", "dd", "rebase"):
        assert getattr(diskimg, name) is getattr(operations, name)
    from diskimg import convert

    assert convert is operations.convert
