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
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg
from diskimg.units import size_to_str

SRC = str(Path(diskimg.__file__).resolve().parents[1])
ROOT = Path(__file__).resolve().parents[2]

PROBE = """\
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
who = {}


class Who:
    \"\"\"Records, for each module imported, the first frame outside importlib.\"\"\"

    def find_spec(self, name, path=None, target=None):
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith("<frozen")
                                 or "importlib" in f.f_code.co_filename):
            f = f.f_back
        if name not in sys.modules and f is not None:
            who.setdefault(name, f"{f.f_code.co_filename.rsplit('/src/', 1)[-1]}:{f.f_lineno}")
        return None


sys.meta_path.insert(0, Who())
if sys.argv[2] == "import":
    import diskimg
    code = 0
elif sys.argv[2] == "script":  # the installed ``diskimg`` command: run as __main__
    sys.argv = sys.argv[3:]
    import os

    def _exit(code):  # the command's quick exit (cli.main._leave), made to return here
        raise SystemExit(code)

    os._exit = _exit
    with open(sys.argv[0], encoding="utf-8") as f:
        script = compile(f.read(), sys.argv[0], "exec")
    try:
        exec(script, {"__name__": "__main__"})
    except SystemExit as e:
        code = e.code
else:
    from diskimg.cli.main import main
    code = main(sys.argv[2:])
sys.stdout.flush()
new = sorted(set(sys.modules) - before)
sys.meta_path.pop(0)
import json
sys.stderr.write("\\n@@" + json.dumps([code, new, who]))
"""

#: what ``import diskimg`` may load: the package and its exception classes, nothing else
IMPORT_ONLY = {"diskimg", "diskimg.errors"}
#: ``diskimg --version``: the entry point and the error wording, no argparse, no formats
VERSION = IMPORT_ONLY | {"diskimg.cli", "diskimg.cli.errors", "diskimg.cli.main",
                        "diskimg.progname"}
#: what opening any image and reading its metadata takes, for info, check and map alike: a
#: plain command line is read by diskimg.cli.quickparse, so no diskimg.cli.parser (argparse)
#: (no -o parser, diskimg.options, no storage-pool entry, diskimg.cli.commands.pool, no file
#: object over an image, diskimg.device_io, no SEEK_DATA/hole punching, diskimg.hostio.sparse)
OPEN_READ = VERSION | {
    "diskimg.api", "diskimg.cli.commands", "diskimg.cli.quickparse",
    "diskimg.cli.commands._shared", "diskimg.cli.output",
    "diskimg.device", "diskimg.hostio", "diskimg.hostio.file",
    "diskimg.info_text",
    "diskimg.plan", "diskimg.policy", "diskimg.probe",
    "diskimg.records", "diskimg.slotted", "diskimg.units"}
#: ... and of a qcow2 in particular: without a bitmaps extension no bitmap module, and no
#: refcounts
QCOW2_READ = OPEN_READ | {
    "diskimg.qcow2", "diskimg.qcow2.cache", "diskimg.qcow2.cluster",
    "diskimg.qcow2.compressed", "diskimg.qcow2.crypt", "diskimg.qcow2.entries",
    "diskimg.qcow2.flush", "diskimg.qcow2.header_io", "diskimg.qcow2.image",
    "diskimg.qcow2.layout", "diskimg.qcow2.mapper", "diskimg.qcow2.reader",
    "diskimg.qcow2.snapshot_table"}
#: ``info`` of a qcow2 reads the header (and a snapshot table, if it has one: not the
#: test image) only: not the tables
#: (cache, entries, mapper), the reader, the write side (cluster, header_io), compressed
#: clusters or encryption (qcow2/image.py imports them on first use)
QCOW2_INFO = OPEN_READ | {"diskimg.qcow2", "diskimg.qcow2.flush", "diskimg.qcow2.image",
                          "diskimg.qcow2.layout"}  # (no snapshot table: no table module)
#: ``map`` walks the tables; it reads no data, and no refcounts where the host file has
#: too few clusters for a metadata-preallocated image (qcow2/flush.py)
QCOW2_MAP = QCOW2_INFO | {"diskimg.cli.commands.map", "diskimg.qcow2.cache",
                          "diskimg.qcow2.entries", "diskimg.qcow2.mapper"}
#: ... of a vmdk (the read side of a monolithic sparse file: not the creation or write
#: side, the descriptor-file opener, flat extents, extent lines or check; the extent
#: protocol is for the type checker; no qcow2) and of a raw file
VMDK_READ = OPEN_READ | {f"diskimg.vmdk.{m}" for m in (
    "descriptor", "image", "sparse", "sparse_extent")} | {
    "diskimg.vmdk"}  # (not seSparse, the stream writer or the compressed-grain reader)
RAW_READ = OPEN_READ | {"diskimg.raw", "diskimg.options"}  # raw's offset/size options
#: ``check`` of a qcow2 without snapshots or bitmaps that finds nothing: the counting
#: passes only (no overlap protection, written for repairs, no snapshot-table reader)
QCOW2_CHECK = {f"diskimg.qcow2.check.{m}" for m in
               ("refcounts", "state", "walk")} | {
    "diskimg.qcow2.check", "diskimg.check_report", "diskimg.qcow2.refblock"}
#: ... and what a plain check must not load: repair and snapshot code, the bitmap modules,
#: the JSON/--output writer (the human lines are the report's own), the allocator (only
#: the refcount-block codec, diskimg.qcow2.refblock), the header writer (the snapshot
#: fields are read by layout.read_fields) and array
NOT_FOR_PLAIN_CHECK = ("diskimg.qcow2.check.overlap", "diskimg.qcow2.check.snapshots",
                       "diskimg.qcow2.check.rebuild",
                       "diskimg.qcow2.snapshot", "diskimg.qcow2.snapshot_table",
                       "diskimg.qcow2.bitmaps",
                       "diskimg.qcow2.bitmap_table", "diskimg.cli.output", "diskimg.crypto",
                       "diskimg.qcow2.refcount", "diskimg.qcow2.header_io", "array",
                       "collections")

#: never loaded by a command that only reads metadata (prefixes: a package and its parts):
#: the write and copy layers, other formats, and the standard library's heavy modules
#: (dataclasses and the inspect/ast/tokenize it brings, argparse and its gettext/locale,
#: typing, threading, pathlib and its urllib.parse/ipaddress/fnmatch, re, and enum,
#: functools, contextlib, types, importlib and warnings, which diskimg replaces by plain
#: classes, ``__import__`` and ``_warnings``): records are
#: diskimg.slotted classes, plain command lines are read by diskimg.cli.quickparse, typing
#: is imported for the type checker only, and a HostFile's name is diskimg.hostio.path_name
#: (its pathlib ``path`` is made when first asked for)
NOT_FOR_READING = ("diskimg.ops", "diskimg.operations", "diskimg.pool", "diskimg.vmdk",
                   "diskimg.raw", "diskimg.crypto", "diskimg.secrets", "diskimg.cli.progress",
                   "diskimg.cli.parser", "concurrent", "queue", "zstandard", "cryptography",
                   "multiprocessing", "xml", "subprocess", "tempfile", "dataclasses",
                   "inspect", "ast", "dis", "tokenize", "argparse", "gettext", "locale",
                   "typing", "threading", "json", "shlex", "textwrap", "shutil", "copy",
                   "pathlib", "urllib", "ipaddress", "fnmatch", "re", "enum", "functools",
                   "contextlib", "types", "importlib", "warnings")
#: ... nor, for ``info``, ``map`` and ``check`` of a small qcow2, ``array`` (whose
#: initialisation imports the collections package): info decodes no table, map and check
#: a few without it (cache.PURE_SWAPS)
NOT_FOR_QCOW2_INFO = ("array", "collections")
#: not for human ``info`` (diskimg.info_text writes it): the JSON/--output writer
INFO_HUMAN_NOT = ("diskimg.cli.output",)
#: ... nor, for a qcow2 without bitmaps, the typed plans (info maps nothing) or the
#: bitmaps' interface (made on first use: slotted.made_from)
QCOW2_INFO_NOT = ("diskimg.plan", "diskimg.persistent_bitmaps")
#: nothing at all beyond the lines above: no argparse, no typing machinery, no regexes
NOT_FOR_VERSION = ("argparse", "re", "typing", "dataclasses", "inspect", "enum", "pathlib",
                   "collections", "functools", "gettext", "locale", "struct")


def _probe(*args: str) -> tuple[int, list[str], str, dict[str, str]]:
    """Exit code, the modules loaded (in the order of their names), stdout of ``diskimg
    ARGS`` (``("import",)``: of ``import diskimg``) in a fresh ``-S`` interpreter, and for
    each module loaded the line that imported it (``diskimg/api.py:8``)."""
    r = subprocess.run([sys.executable, "-S", "-c", PROBE, SRC, *args], capture_output=True,
                       text=True, check=False)
    assert "\n@@" in r.stderr, r.stderr
    code, new, who = json.loads(r.stderr.rsplit("\n@@", 1)[1])
    return code, new, r.stdout, who


def _unexpected(loaded: list[str], allowed: set[str]) -> list[str]:
    return [m for m in loaded if m.startswith("diskimg") and m not in allowed]


def _denied(loaded: list[str], denied: tuple[str, ...]) -> list[str]:
    return [m for m in loaded for bad in denied if m == bad or m.startswith(bad + ".")]


def _named(mods: list[str], who: dict[str, str]) -> str:
    """``mod (imported by file:line)``, for a failure message."""
    return ", ".join(f"{m} (imported by {who.get(m, '?')})" for m in mods)


def test_import_diskimg_loads_only_the_package_and_its_errors() -> None:
    code, loaded, _, who = _probe("import")
    assert code == 0
    extra = [m for m in loaded if m not in IMPORT_ONLY and m != "__future__"]
    assert extra == [], (f"`import diskimg` now also imports {_named(extra, who)}: make the "
                         "import lazy (diskimg/__init__.py _LAZY) or widen IMPORT_ONLY on "
                         "purpose")


def test_version_loads_no_parser_and_no_format(image: Path) -> None:
    code, loaded, out, who = _probe("--version")
    # the first line is the one scripts parse as qemu-img's; our name is in both
    first, second = out.splitlines()
    assert (code, first) == (0, f"qemu-img version 7.2.0 (diskimg {diskimg.__version__})")
    assert second.startswith(f"diskimg {diskimg.__version__}: ")
    extra = _unexpected(loaded, VERSION) + _denied(loaded, NOT_FOR_VERSION)
    assert extra == [], f"diskimg --version now also imports {_named(extra, who)}"


def test_the_diskimg_command_is_a_plain_script_that_imports_no_re(image: Path) -> None:
    """The installed ``diskimg`` is scripts/diskimg (the wheel's shared-scripts, its first
    line pointed at the interpreter by the installer), not pip's console-script launcher,
    which imports ``re`` and runs a regex on argv[0] before diskimg: about 6 ms of every
    command (benchmarks/results-startup.md)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "scripts" not in meta["project"]  # no console-script entry point beside it
    wheel = meta["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["shared-scripts"] == {"scripts/diskimg": "diskimg"}
    assert meta["build-system"]["requires"] == ["hatchling>=1.24.1"]  # keeps the x bit
    script = ROOT / "scripts" / "diskimg"
    assert os.access(script, os.X_OK)
    first = script.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#!") and first.endswith("python3")  # rewritten on install
    code, loaded, out, who = _probe("script", str(script), "--version")
    assert (code, out.splitlines()[0]) == (0, f"qemu-img version 7.2.0 (diskimg "
                                              f"{diskimg.__version__})")
    extra = _unexpected(loaded, VERSION) + _denied(loaded, NOT_FOR_VERSION)
    assert extra == [], f"the diskimg script's --version now imports {_named(extra, who)}"
    code, loaded, out, who = _probe("script", str(script), "info", str(image))
    assert (code, out.splitlines()[0]) == (0, f"image: {image}")
    assert "virtual size: 1 GiB (1073741824 bytes)" in out.splitlines()
    assert _denied(loaded, ("re",)) == [], _named(_denied(loaded, ("re",)), who)


@pytest.mark.parametrize("args, allowed, first_line", [
    (["info"], QCOW2_INFO | {"diskimg.cli.commands.info"}, "image: {path}"),
    (["check", "-f", "qcow2"], QCOW2_READ | QCOW2_CHECK | {"diskimg.cli.commands.check"},
     "No errors were found on the image."),
    (["map"], QCOW2_MAP, "Offset          Length          Mapped to       File"),
    (["map", "-f", "qcow2", "-U"], QCOW2_MAP,
     "Offset          Length          Mapped to       File"),
])
def test_reading_commands_load_only_their_allow_list(image: Path, args: list[str],
                                                     allowed: set[str],
                                                     first_line: str) -> None:
    code, loaded, out, who = _probe(*args, str(image))
    assert code == 0
    assert out.splitlines()[0] == first_line.format(path=image)
    if args == ["info"]:
        assert "virtual size: 1 GiB (1073741824 bytes)" in out.splitlines()
        # the human text is diskimg.info_text's: the JSON writer is for --output=json
        not_here = _denied(loaded, INFO_HUMAN_NOT + QCOW2_INFO_NOT)
        assert not_here == [], _named(not_here, who)
    if args[0] == "map":  # the one written cluster, at its host offset
        assert out.splitlines()[1].split()[:2] == ["0x100000", "0x10000"]
    extra = _unexpected(loaded, allowed)
    assert extra == [], (f"`diskimg {' '.join(args)}` on a qcow2 now also imports "
                         f"{_named(extra, who)}: import them where they are used, or add "
                         "them to the allow-list on purpose")
    # info reads no L2 table: the L1 table is decoded, and the table caches made, on
    # first use; map and check decode their few tables without ``array`` (cache.be_table)
    # and map makes its LRU from _collections: none loads array or the collections package
    denied = _denied(loaded, NOT_FOR_READING + NOT_FOR_QCOW2_INFO)
    assert denied == [], (f"`diskimg {' '.join(args)}` on a qcow2 now imports "
                          f"{_named(denied, who)}, which reading metadata must not load")


@pytest.mark.parametrize("backing", ["base.qcow2", "./sub/../base.qcow2"])
def test_info_of_an_overlay_loads_no_more_than_a_plain_image(image: Path, tmp_path: Path,
                                                            qemu: Qemu, backing: str) -> None:
    """An overlay (the image of nearly every VM: a template as its backing file) costs
    info no more than a plain image: the backing name is shown without pathlib or re (the
    host declares it is local: ``Host.local``; the protocol test is
    :func:`diskimg.hostio.names.protocol`).  The text is qemu-img's, byte for byte."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.qcow2").write_bytes(image.read_bytes())
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", top)
    code, loaded, out, who = _probe("info", str(top))
    assert code == 0
    ref = qemu.img("info", top).stdout
    assert f"(actual path: {tmp_path}/{backing})" in ref or backing == "base.qcow2"
    assert out == ref
    # what a plain image's info loads, and the names' grammar (hostio.names: a leaf)
    extra = _unexpected(loaded, QCOW2_INFO | {"diskimg.cli.commands.info",
                                              "diskimg.hostio.names"})
    assert extra == [], _named(extra, who)
    denied = _denied(loaded, ("pathlib", "re", "fnmatch", "urllib", "diskimg.backing_open"))
    assert denied == [], _named(denied, who)
    # map opens the backing chain (policy.resolve_name: still no pathlib, no re)
    code, loaded, out, who = _probe("map", str(top))
    assert code == 0
    assert out == qemu.img("map", top).stdout
    denied = _denied(loaded, ("pathlib", "re", "fnmatch", "urllib"))
    assert denied == [], _named(denied, who)
    assert "diskimg.backing_open" in loaded  # (the chain was followed)


@pytest.mark.qemu
def test_map_reads_refcounts_only_for_a_file_that_may_be_preallocated(tmp_path: Path,
                                                                      qemu: Qemu) -> None:
    """qemu's metadata-preallocation guess counts the clusters with a refcount: a file
    with fewer clusters than the threshold answers no without them (the plain image of
    the test above), a sparse preallocated one still reads them, and both map as qemu."""
    path = tmp_path / "p.qcow2"
    qemu.img("create", "-f", "qcow2", "-o", "preallocation=metadata", path, "8M")
    qemu.io(path, "write -P 7 64k 64k")
    code, loaded, out, who = _probe("map", "--output=json", str(path))
    assert code == 0
    assert json.loads(out) == qemu.map(path)
    assert "diskimg.qcow2.refcount" in loaded
    assert any(e["data"] and e["zero"] for e in json.loads(out))  # a hole read as zeros


def test_a_command_line_argparse_must_read_still_works(image: Path) -> None:
    """``-fqcow2`` is not a plain command line: argparse reads it (and is then loaded)."""
    code, loaded, out, _ = _probe("info", "-fqcow2", str(image))
    assert (code, out.splitlines()[0]) == (0, f"image: {image}")
    assert "diskimg.cli.parser" in loaded and "argparse" in loaded


@pytest.mark.qemu
def test_a_plain_check_loads_only_the_counting_passes(image: Path, tmp_path: Path,
                                                      qemu: Qemu) -> None:
    """``check`` of a clean qcow2 without snapshots prints what qemu-img check prints and
    loads neither the repair side nor the snapshot reader nor the JSON writer; with a
    snapshot, and with ``--output=json``, those load and the report is still qemu's."""
    code, loaded, out, who = _probe("check", str(image))
    want = qemu.img("check", image).stdout
    assert (code, out) == (0, want)
    assert "No errors were found on the image." in out.splitlines()
    extra = _unexpected(loaded, QCOW2_READ | QCOW2_CHECK | {"diskimg.cli.commands.check"})
    extra += _denied(loaded, NOT_FOR_PLAIN_CHECK)
    assert extra == [], f"a plain `diskimg check` now also imports {_named(extra, who)}"
    snap = tmp_path / "s.qcow2"
    snap.write_bytes(image.read_bytes())
    qemu.img("snapshot", "-c", "s1", snap)
    qemu.io(snap, "write -P 0x79 0 64k")
    code, loaded, out, _ = _probe("check", "--output=json", str(snap))
    got = json.loads(out)
    assert got.pop("findings") == []
    ref = qemu.check(snap)
    assert (code, ref.pop("_returncode")) == (0, 0)
    assert got == ref
    assert {"diskimg.qcow2.check.snapshots", "diskimg.cli.output"} <= set(loaded)
    assert "diskimg.qcow2.check.overlap" not in loaded  # (nothing was written)


@pytest.mark.parametrize("fmt, allowed, denied", [
    # a monolithic sparse vmdk names no other file (no pathlib); its descriptor is read
    # without re, its header without struct; no typing, no threading
    ("vmdk", VMDK_READ, ("struct", "diskimg.qcow2", "diskimg.raw", "diskimg.ops",
                         "diskimg.operations",
                         "diskimg.pool", "diskimg.cli.parser", "diskimg.cli.progress",
                         "dataclasses", "inspect", "ast", "argparse", "concurrent", "queue",
                         "subprocess", "tempfile", "json", "re", "pathlib", "typing",
                         "threading", "enum", "functools", "contextlib", "importlib",
                         "warnings")),
    # raw: not even array and the collections package it loads, nor struct (the lock bytes
    # and the probe decode their few integers with int.from_bytes)
    ("raw", RAW_READ, ("struct", "diskimg.qcow2", "diskimg.vmdk", "diskimg.ops",
                       "diskimg.operations",
                       "diskimg.pool", "diskimg.cli.parser", "diskimg.cli.progress",
                       "dataclasses", "inspect", "ast", "argparse", "concurrent", "queue",
                       "subprocess", "tempfile", "json", "typing", "threading", "re",
                       "pathlib", "array", "collections", "enum", "functools", "contextlib",
                       "types", "importlib", "warnings")),
])
def test_info_of_vmdk_and_raw_loads_only_their_allow_list(vmdk: Path, tmp_path: Path,
                                                          fmt: str, allowed: set[str],
                                                          denied: tuple[str, ...]) -> None:
    path = vmdk if fmt == "vmdk" else tmp_path / "a.raw"
    if fmt == "raw":
        path.write_bytes(b"r" * 4096)
    code, loaded, out, who = _probe("info", str(path))
    lines = out.splitlines()
    assert code == 0
    assert lines[:2] == [f"image: {path}", f"file format: {fmt}"]
    size = 64 << 20 if fmt == "vmdk" else 4096
    assert f"virtual size: {size_to_str(size)} ({size} bytes)" in lines
    extra = _unexpected(loaded, allowed | {"diskimg.cli.commands.info"})
    extra += _denied(loaded, denied + INFO_HUMAN_NOT)
    assert extra == [], f"`diskimg info` of a {fmt} now also imports {_named(extra, who)}"


#: what every plain ``convert`` loads, whatever the formats: the CLI, the open layer and
#: the copy engine (diskimg.ops.convert and what it uses), not the other commands of
#: diskimg.ops nor diskimg.operations' re-exports
CONVERT = VERSION | {
    "diskimg.api", "diskimg.cli.commands", "diskimg.cli.commands._shared",
    "diskimg.cli.commands.convert", "diskimg.cli.quickparse",
    "diskimg.device", "diskimg.hostio", "diskimg.hostio.file",
    "diskimg.hostio.urls", "diskimg.image_create",  # (the target's file, made by create)
    "diskimg.info_text", "diskimg.ops",
    "diskimg.ops.convert", "diskimg.ops.copier",
    "diskimg.options", "diskimg.params",
    "diskimg.persistent_bitmaps", "diskimg.plan", "diskimg.policy", "diskimg.probe",
    "diskimg.records", "diskimg.slotted", "diskimg.units"}
#: ... with a qcow2 on either side (the writer: create, refcounts; the bitmap modules
#: because every qcow2 write asks ``img.bitmaps``, see the report of session 9)
CONVERT_QCOW2 = QCOW2_READ | {"diskimg.qcow2.create", "diskimg.qcow2.refcount",
                              "diskimg.qcow2.refblock", "diskimg.qcow2.bitmaps",
                              "diskimg.qcow2.bitmap_table"}
#: the standard library a plain convert does without: argparse (cli/quickparse.py reads
#: the command line), typing, dataclasses, importlib, signal (SIGTERM handling is for URL
#: targets only), the ctypes package (hostio.file's alignment test uses the extension
#: module _ctypes alone), pathlib (and the re, enum, urllib and ipaddress it loads: a new
#: target's files are named by ``HostFile.name``), queue and threading (a small image is
#: copied without the read-ahead thread), contextlib, and the code of streamed targets,
#: of ``--bitmaps`` and of NBD URLs (diskimg.ops.stream_convert, diskimg.hostio.sink,
#: select, diskimg.ops.bitmap_copy, diskimg.nbd); nor, for an image without compressed
#: clusters or encryption, the qcow2 modules that read those; nor, without ``-p``, the
#: progress code (diskimg.cli.progress); nor array (its initialisation imports the
#: collections package: about 2.7 ms of CPU; a new qcow2's tables are native memoryviews)
#: nor itertools, nor the URL parser (no URL here), nor the read-ahead thread's module;
#: nor modules for what the ops package itself holds (diskimg.ops.common and .zero: the
#: names every copy shares and its zero detection, by their old modules), nor the C
#: OrderedDict's module (the table caches are plain dicts)
NOT_FOR_CONVERT = ("array", "collections", "_collections", "diskimg.ops.common",
                   "diskimg.ops.zero",
                   "diskimg.qcow2.reader",  # (the read plan is executed by the mapper)
                   "diskimg.qcow2.cache",  # (the table codec and cache are in entries)
                   "itertools", "diskimg.hostio.urls",
                   "diskimg.ops.readahead",  # (a small image is copied inline)
                   "diskimg.qcow2.crypt", "diskimg.qcow2.compressed",  # (none here)
                   "diskimg.cli.progress",  # (no -p)
                   "pathlib", "re", "enum", "urllib", "ipaddress", "queue", "threading",
                   "contextlib", "select", "diskimg.ops.stream_convert",
                   "diskimg.hostio.sink", "diskimg.ops.bitmap_copy", "diskimg.nbd",
                   "dataclasses", "inspect", "ast", "dis", "tokenize", "argparse", "gettext",
                   "locale", "typing", "importlib", "signal", "ctypes", "json", "shlex",
                   "textwrap",
                   "subprocess", "tempfile", "concurrent", "multiprocessing", "zstandard",
                   "cryptography", "diskimg.operations", "diskimg.ops.chain",
                   "diskimg.ops.compare", "diskimg.ops.dd", "diskimg.ops.commands",
                   "diskimg.pool", "diskimg.cli.parser", "diskimg.crypto", "diskimg.secrets")


@pytest.mark.parametrize("src_fmt, out_fmt", [
    ("raw", "qcow2"), ("qcow2", "raw"), ("qcow2", "qcow2"), ("vmdk", "raw")])
def test_plain_convert_loads_only_its_allow_list(tmp_path: Path, src_fmt: str,
                                                 out_fmt: str) -> None:
    """``convert -O FMT SRC DST`` of a small image, each pair of formats the benchmark
    times: the modules loaded are pinned (issue 20: start-up is most of a small convert's
    time), and the target holds the source's bytes."""
    data = bytes(range(256)) * 256 + bytes(1 << 16) + b"z" * 65536
    raw = tmp_path / "s.raw"
    raw.write_bytes(data)
    src = raw
    if src_fmt != "raw":
        src = tmp_path / f"s.{src_fmt}"
        diskimg.convert(raw, src, src_fmt)  # (made in this process: not what is pinned)
    dst = tmp_path / f"d.{out_fmt}"
    code, loaded, out, who = _probe("convert", "-O", out_fmt, str(src), str(dst))
    assert (code, out) == (0, "")
    with diskimg.open(dst) as img:
        assert (img.format, img.size) == (out_fmt, len(data))
        assert img.read(0, len(data)) == data
    allowed = CONVERT | ({"diskimg.raw", "diskimg.hostio.sparse", "diskimg.hostio.host"}
                         if "raw" in (src_fmt, out_fmt) else set())
    if "qcow2" in (src_fmt, out_fmt):
        allowed |= CONVERT_QCOW2
    if src_fmt == "vmdk":
        allowed |= VMDK_READ
    if src_fmt != "raw":  # reads of a format's clusters: the page-skew test (_ctypes)
        allowed |= {"diskimg.hostio.cmem"}
    extra = _unexpected(loaded, allowed)
    assert extra == [], (f"`diskimg convert` {src_fmt} -> {out_fmt} now also imports "
                         f"{_named(extra, who)}: import them where they are used, or add "
                         "them to the allow-list on purpose")
    bad = _denied(loaded, NOT_FOR_CONVERT)
    if src_fmt == "raw":  # read whole into one page-aligned buffer: no address to test
        bad += _denied(loaded, ("_ctypes", "diskimg.hostio.cmem"))
    if src_fmt != "qcow2":  # a new qcow2's writes find their L2 tables without the mapper
        bad += _denied(loaded, ("diskimg.qcow2.mapper",))
    if src_fmt != "raw":  # a new raw target's first block is one pwrite of zeros: no
        bad += _denied(loaded, ("diskimg.hostio.sparse",))  # SEEK_DATA/fallocate module
    # no -o, no raw window options, a new qcow2 of qemu-img's defaults: no option parser
    bad += _denied(loaded, ("diskimg.options",))
    assert bad == [], f"`diskimg convert` {src_fmt} -> {out_fmt} now imports {_named(bad, who)}"


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_a_pipelined_convert_loads_neither_queue_nor_threading(tmp_path: Path,
                                                               out_fmt: str) -> None:
    """A source above the inline threshold is copied with the read-ahead thread: a
    ``_thread`` thread fed through ``_queue`` (C), so even then neither queue nor
    threading (nor the functools and heapq they load) is imported; the target holds the
    source's bytes."""
    from diskimg.ops.copier import _INLINE_MAX

    size = _INLINE_MAX + (4 << 20)
    head, tail = bytes(range(256)) * 4096, b"t" * 65536  # 1 MiB, 64 KiB; holes between
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(head)
        f.seek(size - len(tail))
        f.write(tail)
    dst = tmp_path / f"dst.{out_fmt}"
    code, loaded, out, who = _probe("convert", "-O", out_fmt, str(src), str(dst))
    assert (code, out) == (0, "")
    with diskimg.open(dst) as img:
        assert (img.format, img.size) == (out_fmt, size)
        assert img.read(0, len(head)) == head
        assert img.read(size - len(tail), len(tail)) == tail
        assert img.read(len(head), 1 << 20) == bytes(1 << 20)
    assert "diskimg.ops.readahead" in loaded
    bad = _denied(loaded, ("queue", "threading", "heapq"))
    assert bad == [], f"a pipelined convert now imports {_named(bad, who)}"


def test_bitmaps_of_an_image_without_them_are_made_only_when_used(tmp_path: Path) -> None:
    """The bitmap module loads on first use, not on open (above); closing a writable
    image that never used them (here at interpreter exit, unclosed, where an import may no
    longer work) neither loads it nor changes a byte."""
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 1 << 20)
    before = path.read_bytes()
    code = ("import sys, diskimg\n"
            f"img = diskimg.open({str(path)!r}, 'r+')\n"
            "assert 'diskimg.qcow2.bitmaps' not in sys.modules\n"
            "img.flush()\n"
            "assert 'diskimg.qcow2.bitmaps' not in sys.modules\n")  # no close: exit does it
    r = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-c", code],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
                       check=False)
    assert (r.returncode, r.stderr) == (0, "")
    assert path.read_bytes() == before
    with diskimg.open(path) as img:
        assert img.bitmaps.list() == []  # made on first use, from the same header


@pytest.mark.qemu
def test_writes_to_an_image_without_bitmaps_load_no_bitmap_module(tmp_path: Path,
                                                                  qemu: Qemu) -> None:
    """Every qcow2 write, zeroing and discard tells the persistent bitmaps: free for an
    image without them (no bitmap module loads), while a bitmap added in the same session
    (the image had no bitmaps extension at open) still records the writes after it."""
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 4 << 20)
    code = ("import sys, diskimg\n"
            f"with diskimg.open({str(path)!r}, 'r+') as img:\n"
            "    img.write(0, b'a' * 65536)\n"
            "    img.write_zeroes(1 << 20, 65536)\n"
            "    img.discard(2 << 20, 65536)\n"
            "    img.write(3 << 20, b'b' * 4096)\n"
            "    loaded = [m for m in sys.modules if 'bitmap' in m]\n"
            "    assert loaded == [], loaded\n"
            "    img.bitmaps.add('b1')\n"  # made now: the writes from here on are recorded
            "    img.write(2 << 20, b'c' * 512)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": SRC}, check=False)
    assert (r.returncode, r.stderr) == (0, "")
    want = bytearray(4 << 20)
    want[:65536] = b"a" * 65536
    want[2 << 20:(2 << 20) + 512] = b"c" * 512
    want[3 << 20:(3 << 20) + 4096] = b"b" * 4096
    assert qemu.raw_bytes(path) == want
    qemu.check_clean(path)
    assert [b["name"] for b in qemu.info(path)["format-specific"]["data"]["bitmaps"]] == ["b1"]
    with diskimg.open(path) as img:
        assert list(img.bitmaps.dirty_extents("b1")) == [(2 << 20, 65536)]  # one granule


def test_an_l1_table_past_the_end_still_refuses_the_open(tmp_path: Path) -> None:
    """The active L1 table is decoded on first use, but still read at open: ``info`` of
    an image whose L1 table lies past the end of the file fails as before, naming the
    table and its offset, and changes nothing."""
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 1 << 30)
    data = bytearray(path.read_bytes())
    data[40:48] = (1 << 30).to_bytes(8, "big")  # l1_table_offset: cluster aligned, past EOF
    path.write_bytes(data)
    with pytest.raises(diskimg.DiskImgError) as ei:
        diskimg.open(path).close()
    assert str(ei.value).startswith("L1 table at offset 0x40000000 (length 16) lies past "
                                    "the end of"), str(ei.value)
    r = subprocess.run([sys.executable, "-m", "diskimg", "info", str(path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
                       check=False)
    assert r.returncode == 1 and "L1 table at offset 0x40000000" in r.stderr, r.stderr
    assert path.read_bytes() == data
