"""Declared capabilities of BlockDevice (issue 16 item 3): ``check()`` is a method of every
device returning the format-neutral CheckReport; a format without a checker (raw) raises
UnsupportedFeatureError from the base method, and ``supports_check`` /
``supports_check_repair`` say which formats check and repair, so no caller probes with
getattr.  A refusal leaves every byte of the image as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.check_report import CheckReport
from diskimg.errors import UnsupportedFeatureError
from diskimg.qcow2.check import CheckResult
from diskimg.qcow2.image import Qcow2Image
from diskimg.raw import RawImage
from diskimg.vmdk.image import VmdkImage

SIZE = 1 << 20


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cli_check_refused(*args: str) -> None:
    """``diskimg check ARGS`` ends as qemu-img's does for a format it cannot check: 63."""
    r = subprocess.run([sys.executable, "-m", "diskimg", "check", *args],
                       capture_output=True, text=True)
    assert r.returncode == 63 and "does not support checks" in r.stderr


def test_declared_check_capabilities() -> None:
    assert (RawImage.supports_check, RawImage.supports_check_repair) == (False, False)
    assert (VmdkImage.supports_check, VmdkImage.supports_check_repair) == (True, False)
    assert (Qcow2Image.supports_check, Qcow2Image.supports_check_repair) == (True, True)
    assert CheckResult is CheckReport  # the old name is kept


def test_raw_check_raises_from_the_base_method_and_changes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    p.write_bytes(os.urandom(SIZE))
    before = _sha(p)
    with diskimg.open(p, format="raw") as img:
        with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
            img.check()
    with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
        diskimg.check(p, format="raw")
    _cli_check_refused("-f", "raw", str(p))
    assert _sha(p) == before


def test_vmdk_check_reports_but_refuses_repair(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    diskimg.create(p, "vmdk", SIZE)
    with diskimg.open(p, "r+") as img:
        img.write(4096, b"\xa5" * 65536)
    before = _sha(p)
    res = diskimg.check(p)
    assert isinstance(res, CheckReport) and res.format == "vmdk"
    assert res.exit_code == 0 and res.summary_lines() == ["No errors were found on the image."]
    with pytest.raises(UnsupportedFeatureError, match="does not support checks"):
        diskimg.check(p, repair="leaks")
    _cli_check_refused("-r", "all", str(p))
    assert _sha(p) == before


def test_qcow2_check_returns_a_check_report(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    diskimg.create(p, "qcow2", SIZE)
    before = _sha(p)
    with diskimg.open(p) as img:
        res = img.check()
    assert isinstance(res, CheckReport) and res.format == "qcow2" and res.exit_code == 0
    assert _sha(p) == before


def test_backing_name_is_declared_on_every_device(tmp_path: Path) -> None:
    """api's opener and the commit/rebase chain read ``backing_file_name()`` of any device;
    raw declares none, qcow2 and vmdk return the name they store."""
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(SIZE))
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", SIZE, backing_file="d.raw", backing_fmt="raw")
    before = (_sha(p), _sha(top))
    with diskimg.open(p, format="raw") as img:
        assert img.backing_file_name() == (None, None)
        img.backing_attached()  # the default hook does nothing
    with diskimg.open(top) as img:
        assert img.backing_file_name() == ("d.raw", "raw")
        assert img.backing is not None and img.backing.backing_file_name() == (None, None)
    assert (_sha(p), _sha(top)) == before


# --- compressed writes, cluster size, L2 span, host files, snapshots (declared) ---------

#: qemu-img create -o subformat=... for each vmdk subformat diskimg writes
VMDK_SUBFORMATS = ("monolithicSparse", "streamOptimized", "monolithicFlat",
                   "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
_GRAINED = {"monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"}


def _tree_sha(d: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(d.iterdir()) if p.is_file()}


def test_declared_compressed_write_capability() -> None:
    assert RawImage.supports_compressed_write is False
    assert Qcow2Image.supports_compressed_write is True
    assert VmdkImage.supports_compressed_write is True  # taken as ordinary writes, as qemu


def test_raw_refuses_every_compressed_write_and_changes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    p.write_bytes(os.urandom(SIZE))
    before = _sha(p)
    data = os.urandom(65536)
    with diskimg.open(p, "r+", format="raw") as img:
        assert img.cluster_size is None and img.l2_span is None
        calls = [img.compressed_cluster_size, lambda: img.compress_cluster(data),
                 lambda: img.write_compressed(0, data),
                 lambda: img.write_compressed_clusters(0, [(data, None)])]
        for call in calls:
            with pytest.raises(UnsupportedFeatureError) as ei:
                call()
            assert "'raw'" in str(ei.value) and "compressed writes" in str(ei.value)
            assert "Compression not supported for this file format" in str(ei.value)
        img.align_compressed_end()  # the default does nothing
    assert _sha(p) == before


@pytest.mark.qemu
@pytest.mark.parametrize("sub", VMDK_SUBFORMATS)
def test_vmdk_subformats_declare_cluster_size_and_host_files(
        tmp_path: Path, sub: str, qemu_img: str, run: Any) -> None:
    """cluster_size is what qemu-img info reports (the first extent's grain; none for a
    flat vmdk), host_files() the descriptor then every extent file; a flat vmdk refuses
    compressed writes with qemu-img's "invalid cluster size"."""
    p = tmp_path / "d.vmdk"
    run([qemu_img, "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", p, str(SIZE)])
    q = json.loads(run([qemu_img, "info", "--output=json", p]).stdout)
    before = _tree_sha(tmp_path)
    with diskimg.open(p) as img:
        assert img.cluster_size == q.get("cluster-size")
        assert img.cluster_size == (65536 if sub in _GRAINED else None)
        assert img.l2_span is None
        assert img.snapshots is None
        files = [Path(h.path).name for h in img.host_files()]
        extents = [Path(e["filename"]).name
                   for e in q["format-specific"]["data"]["extents"]]
        assert files == (["d.vmdk"] if sub in ("monolithicSparse", "streamOptimized")
                         else ["d.vmdk", *extents])
        assert len(set(files)) == len(files) == len(set(tmp_path.iterdir()))
        if sub in _GRAINED:
            assert img.compressed_cluster_size() == 65536
            assert img.compress_cluster(bytes(65536)) is None  # stored as it is
        else:
            with pytest.raises(UnsupportedFeatureError, match="invalid cluster size"):
                img.compressed_cluster_size()
        with pytest.raises(UnsupportedFeatureError,
                           match="Block format 'vmdk' .* not support temporarily loading "
                                 "internal snapshots"):
            img.snapshot_view(name="s1")
    assert _tree_sha(tmp_path) == before


def test_vmdk_write_compressed_is_an_ordinary_write(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    diskimg.create(p, "vmdk", SIZE, options={"subformat": "streamOptimized"})
    a, b = os.urandom(65536), os.urandom(65536)
    with diskimg.open(p, "r+") as img:
        img.write_compressed(0, a)
        img.write_compressed_clusters(65536, [(b, None), (a, None)])
        img.align_compressed_end()
    with diskimg.open(p) as img:
        assert img.read(0, 3 * 65536) == a + b + a
        assert img.read(3 * 65536, SIZE - 3 * 65536) == bytes(SIZE - 3 * 65536)


@pytest.mark.parametrize("extended", [False, True])
def test_qcow2_declares_cluster_size_l2_span_and_compressed_writes(
        tmp_path: Path, extended: bool) -> None:
    p = tmp_path / "d.qcow2"
    cs = 16384  # extended L2 needs at least 16 KiB clusters
    diskimg.create(p, "qcow2", SIZE, options={"cluster_size": cs,
                                               "extended_l2": "on" if extended else "off"})
    data = b"diskimg" * (cs // 7) + b"\0" * (cs % 7)
    with diskimg.open(p, "r+") as img:
        assert img.cluster_size == img.compressed_cluster_size() == cs
        assert img.l2_span == cs * (cs // (16 if extended else 8))
        assert [Path(h.path).name for h in img.host_files()] == ["d.qcow2"]
        packed = img.compress_cluster(data)
        assert packed is not None and len(packed) < cs
        img.write_compressed_clusters(0, [(data, packed), (data, None)])
        img.align_compressed_end()
    with diskimg.open(p) as img:
        assert img.read(0, 2 * cs) == data + data
        assert img.check().exit_code == 0
    assert p.stat().st_size % 512 == 0


def test_qcow2_host_files_lists_its_data_file(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    diskimg.create(p, "qcow2", SIZE, options={"data_file": "d.data"})
    with diskimg.open(p) as img:
        assert [Path(h.path).name for h in img.host_files()] == ["d.qcow2", "d.data"]


def test_snapshots_are_declared(tmp_path: Path) -> None:
    """raw and vmdk declare no internal snapshots: the library refuses every action but
    list, naming the format and the feature, and changes nothing; qcow2 has its table."""
    raw = tmp_path / "d.raw"
    raw.write_bytes(os.urandom(SIZE))
    vm = tmp_path / "d.vmdk"
    diskimg.create(vm, "vmdk", SIZE)
    before = _tree_sha(tmp_path)
    for path, fmt in ((raw, "raw"), (vm, "vmdk")):
        with diskimg.open(path, format=fmt) as img:
            assert img.snapshots is None
            with pytest.raises(UnsupportedFeatureError, match=f"'{fmt}'.*internal snapshots"):
                img.snapshot_view(snapshot_id="1")
        assert diskimg.snapshot(path, format=fmt) == []
        for action in ("create", "apply", "delete"):
            with pytest.raises(UnsupportedFeatureError,
                               match=f"Block format '{fmt}' does not support internal "
                                     "snapshots"):
                diskimg.snapshot(path, action, "s1", format=fmt)
    assert _tree_sha(tmp_path) == before
    q = tmp_path / "d.qcow2"
    diskimg.create(q, "qcow2", SIZE)
    assert [s.name for s in diskimg.snapshot(q, "create", "s1")] == ["s1"]
    with diskimg.open(q) as img:
        assert img.snapshots is not None and [s.name for s in img.snapshots.list()] == ["s1"]


def test_probed_and_options_are_declared(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(SIZE))
    q = tmp_path / "d.qcow2"
    diskimg.create(q, "qcow2", SIZE)
    with diskimg.open(p) as img:
        assert img.probed is True and dict(img.options) == {}
    with diskimg.open(p, format="raw") as img:
        assert img.probed is False
    with diskimg.open(q, options={"encrypt.key-secret": "k"}) as img:
        assert img.probed is False and img.options["encrypt.key-secret"] == "k"


@pytest.mark.qemu
@pytest.mark.parametrize("args", [
    ["convert", "-c", "-O", "raw", "{src}", "{dst}.raw"],
    ["convert", "-c", "-O", "vmdk", "-o", "subformat=monolithicFlat", "{src}", "{dst}.vmdk"],
    ["convert", "-l", "s1", "-O", "raw", "{src}", "{dst}.raw"],
    ["convert", "-l", "s1", "-f", "vmdk", "-O", "raw", "{vmdk}", "{dst}.raw"],
    ["snapshot", "-c", "s1", "{src}"],
    ["snapshot", "-a", "s1", "{vmdk}"],
    ["snapshot", "-d", "s1", "{vmdk}"],
])
def test_refusals_match_qemu_img(tmp_path: Path, args: list[str], qemu_img: str,
                                 run: Any) -> None:
    """The refusals of the declared capabilities keep qemu-img's words and exit code, and
    leave every file as it was (a refused convert: qemu-img leaves the target it created,
    diskimg removes all of it)."""
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    vm = tmp_path / "v.vmdk"
    run([qemu_img, "create", "-q", "-f", "vmdk", vm, str(SIZE)])

    def argv(tag: str) -> list[str]:
        return [a.format(src=src, vmdk=vm, dst=tmp_path / tag) for a in args]

    before = _tree_sha(tmp_path)
    rq = run([qemu_img, *argv("q")], check=False)
    after_q = {k: v for k, v in _tree_sha(tmp_path).items() if not k.startswith("q")}
    rd = run([sys.executable, "-m", "diskimg", *argv("d")], check=False)
    after_d = {k: v for k, v in _tree_sha(tmp_path).items()
               if not k.startswith(("q", "d"))}
    assert rd.returncode == rq.returncode == 1
    assert rd.stderr.replace("diskimg:", "qemu-img:") == rq.stderr
    assert after_q == after_d == before
    made = sorted(p.name for p in tmp_path.iterdir())
    ours = [n[1:] for n in made if n.startswith("d")]
    if args[0] == "convert":
        # qemu-img leaves the target files a failed convert created (monolithicFlat: both);
        # diskimg removes every file it created (issue 17; docs/compatibility.md)
        assert ours == []
    else:
        assert ours == [n[1:] for n in made if n.startswith("q")]


# --- no capability probes in src/ (AST scan) ---------------------------------------------

SRC = Path(__file__).resolve().parents[2] / "src" / "diskimg"

#: the getattr/hasattr calls in src/ that are not device capability probes, by module and
#: attribute name ("*": a name computed at run time).  docs/architecture.md says why.
NOT_PROBES: dict[str, set[str]] = {
    "params.py": {"__index__"},                      # the int protocol (operator.index)
    "__init__.py": {"*"},                            # module __getattr__: lazy exports
    "crypto/__init__.py": {"*"},                     # module __getattr__: lazy kernels
    "vmdk/__init__.py": {"*"},                       # module __getattr__: lazy create side
    "crypto/luks/kdf.py": {"derive_into"},           # cryptography version, decided once
    "hostio/file.py": {"sysconf", "O_CLOEXEC", "O_NONBLOCK",  # os
                       "F_OFD_SETLK", "F_OFD_GETLK"},  # fcntl constants by platform
    "qcow2/compress.py": {"zd"},                     # thread-local decompressor
    "cli/main.py": {"reconfigure", "encoding", "object",  # std streams, argparse namespace
                    # the process's exit looks at the interpreter's objects, not devices
                    "_ncallbacks", "__del__", "closed", "gi_frame"},
    "cli/commands/snapshot.py": {"*"},               # argparse Action: its namespace dest
    "slotted.py": {"*"},                             # a record's fields, by slot name
}
def _attribute_lookups() -> dict[str, set[str]]:
    """Every ``getattr(obj, name)``/``hasattr(obj, name)`` call in src/: module -> names."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
                arg = node.args[1]
                name = arg.value if (isinstance(arg, ast.Constant)
                                     and isinstance(arg.value, str)) else "*"
                found.setdefault(path.relative_to(SRC).as_posix(), set()).add(name)
    return found


def test_src_has_no_capability_probes() -> None:
    found = _attribute_lookups()
    assert found, "the scan found nothing: it would pass vacuously"
    extra = {m: names - NOT_PROBES.get(m, set())
             for m, names in found.items()}
    extra = {m: n for m, n in extra.items() if n}
    assert not extra, f"getattr/hasattr probes (declare the feature on BlockDevice): {extra}"
    # the allow-list names only what is there (a stale entry would hide a new probe)
    stale = {m: names - found.get(m, set()) for m, names in NOT_PROBES.items()}
    assert not {m: n for m, n in stale.items() if n}, stale
