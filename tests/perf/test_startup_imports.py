"""Start-up, pinned without clocks (issue 20 item 1): the modules each command imports.

Each case runs the real CLI (or ``import diskimg``) in a fresh interpreter started with
``-S``, so that no ``.pth`` start-up hook of the environment pre-loads modules and hides
an import of ours, and lists what ``sys.modules`` gained.  The diskimg modules a command
may load are an allow-list: a new eager import (a module-level import of the copy engine,
the pool layer, a codec ...) fails here with the module's name and the command, and the
list is widened only on purpose.  Standard-library and third-party modules that a command
must not load are a deny-list.  Each case also checks what the command printed, so a probe
that silently did nothing cannot pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg

SRC = str(Path(diskimg.__file__).resolve().parents[1])

PROBE = """\
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
if sys.argv[2] == "import":
    import diskimg
    code = 0
else:
    from diskimg.cli.main import main
    code = main(sys.argv[2:])
sys.stdout.flush()
new = sorted(set(sys.modules) - before)
import json
sys.stderr.write("\\n@@" + json.dumps([code, new]))
"""

#: what ``import diskimg`` may load: the package and its exception classes, nothing else
IMPORT_ONLY = {"diskimg", "diskimg.errors"}
#: ``diskimg --version``: the entry point and the error wording, no argparse, no formats
VERSION = IMPORT_ONLY | {"diskimg.cli", "diskimg.cli.errors", "diskimg.cli.main"}
#: what opening a qcow2 and reading its metadata takes, for info, check and map alike
QCOW2_READ = VERSION | {
    "diskimg.api", "diskimg.cli.commands",
    "diskimg.cli.commands._shared", "diskimg.cli.commands.pool", "diskimg.cli.output",
    "diskimg.cli.parser", "diskimg.device", "diskimg.device_io", "diskimg.hostio",
    "diskimg.hostio.file", "diskimg.hostio.lock", "diskimg.hostio.sparse",
    "diskimg.info_text", "diskimg.internal_snapshots", "diskimg.options", "diskimg.params",
    "diskimg.persistent_bitmaps", "diskimg.qcow2.bitmap_table",
    "diskimg.plan", "diskimg.policy", "diskimg.probe", "diskimg.records", "diskimg.slotted",
    "diskimg.units",
    "diskimg.qcow2", "diskimg.qcow2.bitmaps", "diskimg.qcow2.cache", "diskimg.qcow2.cluster",
    "diskimg.qcow2.compressed", "diskimg.qcow2.compressed_write", "diskimg.qcow2.crypt",
    "diskimg.qcow2.entries", "diskimg.qcow2.flush", "diskimg.qcow2.header_io",
    "diskimg.qcow2.image", "diskimg.qcow2.layout", "diskimg.qcow2.mapper",
    "diskimg.qcow2.reader", "diskimg.qcow2.refcount", "diskimg.qcow2.resize",
    "diskimg.qcow2.snapshot", "diskimg.qcow2.snapshot_table", "diskimg.qcow2.zero"}
QCOW2_CHECK = {f"diskimg.qcow2.check.{m}" for m in
               ("copied", "overlap", "refcounts", "report", "snapshots", "state", "stored",
                "walk")} | {"diskimg.qcow2.check", "diskimg.check_report"}

#: never loaded by a command that only reads metadata (prefixes: a package and its parts)
NOT_FOR_READING = ("diskimg.ops", "diskimg.operations", "diskimg.pool", "diskimg.vmdk",
                   "diskimg.raw", "diskimg.crypto", "diskimg.secrets", "diskimg.cli.progress",
                   "concurrent", "queue", "zstandard", "cryptography", "multiprocessing",
                   "xml", "subprocess", "tempfile")
#: nothing at all beyond the lines above: no argparse, no typing machinery, no regexes
NOT_FOR_VERSION = ("argparse", "re", "typing", "dataclasses", "inspect", "enum", "pathlib",
                   "collections", "functools", "gettext", "locale", "struct")


def _probe(*args: str) -> tuple[int, list[str], str]:
    """Exit code, the modules loaded (in the order of their names) and stdout of
    ``diskimg ARGS`` (``("import",)``: of ``import diskimg``) in a fresh ``-S`` interpreter."""
    r = subprocess.run([sys.executable, "-S", "-c", PROBE, SRC, *args], capture_output=True,
                       text=True, check=False)
    assert "\n@@" in r.stderr, r.stderr
    code, new = json.loads(r.stderr.rsplit("\n@@", 1)[1])
    return code, new, r.stdout


def _unexpected(loaded: list[str], allowed: set[str]) -> list[str]:
    return [m for m in loaded if m.startswith("diskimg") and m not in allowed]


def _denied(loaded: list[str], denied: tuple[str, ...]) -> list[str]:
    return [m for m in loaded for bad in denied if m == bad or m.startswith(bad + ".")]


def test_import_diskimg_loads_only_the_package_and_its_errors() -> None:
    code, loaded, _ = _probe("import")
    assert code == 0
    extra = [m for m in loaded if m not in IMPORT_ONLY and m != "__future__"]
    assert extra == [], (f"`import diskimg` now also imports {extra}: make the import lazy "
                         "(diskimg/__init__.py _LAZY) or widen IMPORT_ONLY on purpose")


def test_version_loads_no_parser_and_no_format(image: Path) -> None:
    code, loaded, out = _probe("--version")
    # the first line is the one scripts parse as qemu-img's; our name is in both
    first, second = out.splitlines()
    assert (code, first) == (0, f"qemu-img version 7.2.0 (diskimg {diskimg.__version__})")
    assert second.startswith(f"diskimg {diskimg.__version__}: ")
    assert _unexpected(loaded, VERSION) == [], "diskimg --version imports more than before"
    assert _denied(loaded, NOT_FOR_VERSION) == []


@pytest.mark.parametrize("args, allowed, first_line", [
    (["info"], QCOW2_READ | {"diskimg.cli.commands.info"}, "image: {path}"),
    (["check"], QCOW2_READ | QCOW2_CHECK | {"diskimg.cli.commands.check"},
     "No errors were found on the image."),
    (["map"], QCOW2_READ | {"diskimg.cli.commands.map"},
     "Offset          Length          Mapped to       File"),
])
def test_reading_commands_load_only_their_allow_list(image: Path, args: list[str],
                                                     allowed: set[str],
                                                     first_line: str) -> None:
    code, loaded, out = _probe(*args, str(image))
    assert code == 0
    assert out.splitlines()[0] == first_line.format(path=image)
    if args == ["info"]:
        assert "virtual size: 1 GiB (1073741824 bytes)" in out.splitlines()
    if args == ["map"]:  # the one written cluster, at its host offset
        assert out.splitlines()[1].split()[:2] == ["0x100000", "0x10000"]
    extra = _unexpected(loaded, allowed)
    assert extra == [], (f"`diskimg {args[0]}` on a qcow2 now also imports {extra}: import "
                         "them where they are used, or add them to the allow-list on purpose")
    assert _denied(loaded, NOT_FOR_READING) == []
    assert "json" not in loaded  # human output; the probe imports json after the command
