"""qcow2 metadata operations that must never half-happen (issue 15, bugs 9, 10, 11).

- Snapshot create/apply on narrow refcounts: either the operation succeeds and
  ``qemu-img check`` is clean, or it is refused before a byte changes (sha256).  The
  refusal counts every reference the operation adds: a host cluster packing k
  compressed clusters gains k (bug 11).
- ``amend -o compat=1.1`` of a v2 image whose snapshot entries carry short extra data
  rewrites the table as qemu-img does (byte-identical result); ``compat=0.10`` keeps the
  data of a snapshot that shares a zero-allocated cluster (bug 9).
- Unknown autoclear feature bits are cleared by every write-mode path, as qemu-img does;
  known bits (bitmaps) are kept; read-only use and refusals leave the file as it was
  (bug 10).  Snapshot apply refuses an image with persistent bitmaps, as qemu-img does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import example, given, settings

import diskimg
from diskimg.qcow2.amend import amend
from diskimg.qcow2.snapshot import pack_table_exact, read_entries

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io absent")]


def sh(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          check=check, stdin=subprocess.DEVNULL)


def diskimg_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "diskimg", *args, check=check)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_clean(p: Path) -> None:
    """qemu-img check finds nothing (no errors, no leaks) and diskimg's check agrees."""
    res = sh(QEMU_IMG, "check", "--output=json", p, check=False)
    out = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not out.get("leaks") and not out.get("corruptions"), out
    with diskimg.open(p) as img:
        assert img.check().exit_code == 0  # type: ignore[attr-defined]


# --- bug 11: snapshot create/apply refused up-front, exactly ---------------------------

REPRO_11 = (
    "w 65536 32768 78; w 10027008 65536 68; w 7405568 4096 12; w 196608 65536 163; "
    "w 28377088 32768 125; c 3342336 4096 95; w 983040 65536 172; w 20512768 65536 91; "
    "w 14745600 65536 167; c 5570560 4096 142; c 28180480 4096 60; w 5767168 32768 93; "
    "w 21757952 32768 67; c 8454144 4096 82; w 786432 32768 200; w 1179648 4096 45; "
    "w 24379392 32768 7; c 2293760 4096 29; w 14483456 32768 176; w 9109504 4096 208; "
    "w 8650752 65536 65; w 19070976 32768 42; c 26476544 4096 126; s s22; "
    "c 13959168 4096 111; w 6815744 32768 215; w 31522816 4096 28; w 30343168 65536 127; "
    "w 26148864 65536 186; s s27")


def test_issue15_bug11_snapshot_create_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """The issue's sequence: cluster 58 packs 6 compressed clusters at refcount 12; the
    second snapshot would raise it to 18 > 15.  The old check only asked whether one
    more reference fit, then failed half-way with CorruptImageError and leaked."""
    p = tmp_path / "r.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
       "refcount_bits=4,cluster_size=4096,compression_type=zstd", p, "32M")
    model = bytearray(32 << 20)
    with diskimg.open(p, "r+") as img:
        for step in REPRO_11.split(";"):
            op, *args = step.split()
            if op == "s":
                if args[0] == "s27":
                    before = sha(p)
                    with pytest.raises(diskimg.UsageError,
                                       match=r"Refcount of cluster 58 would exceed the "
                                             r"maximum of 15 \(12 \+ 6 references"):
                        img.snapshots.create(args[0])  # type: ignore[attr-defined]
                    assert sha(p) == before
                else:
                    img.snapshots.create(args[0])  # type: ignore[attr-defined]
            else:
                off, n, pat = map(int, args)
                data = bytes([pat]) * n
                (img.write if op == "w" else img.write_compressed)(  # type: ignore
                    off, data)
                model[off : off + n] = data
            img.flush()
        assert [s.name for s in img.snapshots.list()] == ["s22"]  # type: ignore
        assert img.read(0, len(model)) == model
    assert_clean(p)


OPS = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 63), st.integers(1, 3), st.integers(1, 255)),
    st.tuples(st.just("c"), st.integers(0, 63), st.integers(1, 8), st.integers(1, 255)),
    st.tuples(st.just("s"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("a"), st.integers(0, 7), st.just(0), st.just(0)),
    st.tuples(st.just("d"), st.integers(0, 7), st.just(0), st.just(0)),
)


@settings(max_examples=10)
@example(bits=2, cluster_bits=9, zstd=False, ops=[("c", 0, 2, 1), ("s", 0, 0, 0)])
@example(bits=4, cluster_bits=12, zstd=True, ops=[("c", 3, 8, 7), ("s", 0, 0, 0),
                                                   ("w", 3, 1, 9), ("s", 0, 0, 0)])
@given(bits=st.sampled_from([1, 2, 4]), cluster_bits=st.sampled_from([9, 12]),
       zstd=st.booleans(), ops=st.lists(OPS, min_size=1, max_size=16))
def test_snapshot_ops_on_narrow_refcounts_succeed_cleanly_or_change_nothing(
        bits: int, cluster_bits: int, zstd: bool, ops: list[tuple[str, int, int, int]]
) -> None:
    """Random writes, runs of compressed writes (packed many to a host cluster) and snapshot
    create/apply/delete with refcount_bits 1, 2, 4.  A snapshot operation either
    succeeds or raises UsageError with the file byte-identical; at the end qemu-img
    check is clean and the image and every snapshot read as the model says."""
    cs = 1 << cluster_bits
    size = 64 * cs
    with tempfile.TemporaryDirectory(prefix="diskimg-meta-") as d:
        p = Path(d) / "m.qcow2"
        opts = {"refcount_bits": str(bits), "cluster_size": str(cs)}
        if zstd:
            opts["compression_type"] = "zstd"
        diskimg.create(p, "qcow2", size, options=opts)
        model = bytearray(size)
        snaps: dict[str, bytes] = {}
        with diskimg.open(p, "r+") as img:
            for n, (op, a, b, pat) in enumerate(ops):
                if op in "wc":
                    off, data = a * cs, bytes([pat]) * (b * cs)
                    data = data[: size - off]
                    if op == "w":
                        img.write(off, data)
                    else:  # b clusters one by one: their data packs into host clusters
                        for k in range(0, len(data), cs):
                            img.write_compressed(  # type: ignore[attr-defined]
                                off + k, data[k : k + cs])
                    model[off : off + len(data)] = data
                    img.flush()
                    continue
                names = [s.name for s in img.snapshots.list()]  # type: ignore
                if op != "s" and not names:
                    continue
                before = sha(p)
                try:
                    if op == "s":
                        img.snapshots.create(f"s{n}")  # type: ignore[attr-defined]
                        snaps[f"s{n}"] = bytes(model)
                    elif op == "a":
                        name = names[a % len(names)]
                        img.snapshots.apply(name)  # type: ignore[attr-defined]
                        model[:] = snaps[name]
                    else:
                        name = names[a % len(names)]
                        img.snapshots.delete(name)  # type: ignore[attr-defined]
                        del snaps[name]
                except diskimg.UsageError:  # refused: nothing written
                    assert sha(p) == before, f"refused {op} changed the file"
            assert img.read(0, size) == model
            for s in img.snapshots.list():  # type: ignore[attr-defined]
                assert img.snapshot_view(s.id).read(0, size) == snaps[s.name]  # type: ignore
        raw = Path(d) / "model.raw"
        raw.write_bytes(model)
        sh(QEMU_IMG, "compare", "-q", "-f", "raw", "-F", "qcow2", raw, p)
        assert_clean(p)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_compressed_writes_at_the_refcount_maximum_match_qemu(tmp_path: Path,
                                                              bits: int) -> None:
    """Compressed clusters pack into a host cluster until its refcount reaches the
    maximum, then move on to a new one: the file is byte-identical to qemu-io's."""
    ours, theirs = tmp_path / "d.qcow2", tmp_path / "q.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
       f"refcount_bits={bits},cluster_size=4096", theirs, "128k")
    shutil.copyfile(theirs, ours)
    sh(QEMU_IO, *[a for i in range(18) for a in ("-c", f"write -c -P {i + 1} {i * 4}k 4k")],
       theirs)
    with diskimg.open(ours, "r+") as img:
        for i in range(18):
            img.write_compressed(i * 4096, bytes([i + 1]) * 4096)  # type: ignore
    assert ours.read_bytes() == theirs.read_bytes()
    assert_clean(ours)


# --- bug 9: amend compat=1.1 / 0.10 with snapshots -------------------------------------

class _File:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()

    def pread(self, off: int, n: int) -> bytes:
        return self.data[off : off + n]

    def size(self) -> int:
        return len(self.data)


def _v2_with_short_extra_data(p: Path) -> None:
    """A v2 image whose snapshot entries have 0 and 16 bytes of extra data, as older
    writers made them (rewritten with the project's own codec)."""
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1M")
    sh(QEMU_IO, "-c", "write -P 1 0 64k", p)
    sh(QEMU_IMG, "snapshot", "-c", "s1", p)
    sh(QEMU_IO, "-c", "write -P 2 0 64k", p)
    sh(QEMU_IMG, "snapshot", "-c", "s2", p)
    sh(QEMU_IO, "-c", "write -P 3 64k 64k", p)
    count, off = struct.unpack(">IQ", p.read_bytes()[60:72])
    snaps = read_entries(_File(p), off, count, 1 << 20)  # type: ignore[arg-type]
    snaps[0].extra_data_size, snaps[1].extra_data_size = 0, 16
    with p.open("r+b") as f:
        f.seek(off)
        f.write(pack_table_exact(snaps))


@pytest.mark.parametrize("more", ["", ",refcount_bits=4"])
def test_issue15_bug9_amend_to_v3_rewrites_short_snapshot_extra_data(
        tmp_path: Path, more: str) -> None:
    """The later amend steps (a new refcount width) see the moved table."""
    src = tmp_path / "v2.qcow2"
    _v2_with_short_extra_data(src)
    ours, theirs = tmp_path / "d.qcow2", tmp_path / "q.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    sh(QEMU_IMG, "amend", "-o", f"compat=1.1{more}", theirs)
    amend(ours, dict(kv.split("=") for kv in f"compat=1.1{more}".split(",")))
    if "refcount_bits" not in more:  # diskimg lays out a new refcount width its own way
        assert ours.read_bytes() == theirs.read_bytes()  # table, header, refcounts
    assert_clean(ours)
    info = json.loads(sh(QEMU_IMG, "info", "--output=json", ours).stdout)
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert [s["name"] for s in info["snapshots"]] == ["s1", "s2"]
    for name, pat in (("s1", 1), ("s2", 2)):
        sh(QEMU_IMG, "snapshot", "-a", name, ours)
        sh(QEMU_IO, "-c", f"read -P {pat} 0 64k", "-c", "read -P 0 64k 64k", ours)


def test_amend_downgrade_with_snapshots_matches_qemu(tmp_path: Path) -> None:
    src = tmp_path / "v3.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", src, "1M")
    sh(QEMU_IO, "-c", "write -P 1 0 128k", src)
    sh(QEMU_IMG, "snapshot", "-c", "s1", src)
    sh(QEMU_IO, "-c", "write -P 5 64k 64k", src)
    ours, theirs = tmp_path / "d.qcow2", tmp_path / "q.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    sh(QEMU_IMG, "amend", "-o", "compat=0.10", theirs)
    amend(ours, {"compat": "0.10"})
    assert ours.read_bytes() == theirs.read_bytes()
    assert_clean(ours)


def test_amend_downgrade_keeps_data_of_a_snapshot_sharing_a_zeroed_cluster(
        tmp_path: Path) -> None:
    """After a snapshot, write_zeroes on a shared cluster leaves it zero-allocated in the
    active table while the snapshot still reads its data; expanding it for v2 must not
    write zeros over it (qemu-img 7.2 does, and the snapshot reads zeros)."""
    p = tmp_path / "z.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", p, "1M")
    sh(QEMU_IO, "-c", "write -P 1 0 128k", "-c", "write -z 192k 64k", p)
    sh(QEMU_IMG, "snapshot", "-c", "s1", p)
    sh(QEMU_IO, "-c", "write -z 0 64k", "-c", "write -P 5 64k 64k", p)
    amend(p, {"compat": "0.10"})
    assert_clean(p)
    sh(QEMU_IO, "-c", "read -P 0 0 64k", "-c", "read -P 5 64k 64k", "-c",
       "read -P 0 128k 896k", p)
    sh(QEMU_IMG, "snapshot", "-a", "s1", p)
    sh(QEMU_IO, "-c", "read -P 1 0 128k", "-c", "read -P 0 128k 896k", p)
    assert_clean(p)


# --- bug 10: unknown autoclear bits ----------------------------------------------------

UNKNOWN = (1 << 63) | (1 << 5)


def _autoclear(p: Path) -> int:
    return int(struct.unpack(">Q", p.read_bytes()[88:96])[0])


def _set_autoclear(p: Path, bits: int) -> None:
    with p.open("r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", bits))


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """top.qcow2 over base.qcow2 (relative name), with data in both, with and without
    snapshot s1 in the top; made once, copied by :func:`_image`."""
    out = {}
    for snapshot in (False, True):
        d = tmp_path_factory.mktemp("autoclear")
        base, top = d / "base.qcow2", d / "top.qcow2"
        sh(QEMU_IMG, "create", "-q", "-f", "qcow2", base, "1M")
        sh(QEMU_IO, "-c", "write -P 1 0 1M", base)
        sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
           "1M")
        sh(QEMU_IO, "-c", "write -P 2 64k 64k", top)
        if snapshot:
            sh(QEMU_IMG, "snapshot", "-c", "s1", top)
        out[snapshot] = d
    return out


def _image(d: Path, template: Path) -> Path:
    """A copy of a template pair in ``d``, autoclear bits 63 and 5 set in the top."""
    shutil.copytree(template, d)
    top = d / "top.qcow2"
    _set_autoclear(top, UNKNOWN)
    return top


def _api_write(p: Path) -> None:
    with diskimg.open(p, "r+") as img:
        img.write(0, b"\x09" * 512)


def _api_write_zeroes(p: Path) -> None:
    with diskimg.open(p, "r+") as img:
        img.write_zeroes(0, 65536)


def _api_compressed(p: Path) -> None:
    with diskimg.open(p, "r+") as img:
        img.write_compressed(0, b"\x09" * 65536)  # type: ignore[attr-defined]


def _cli_op(name: str, snapshot: bool, tool: str, *args: str
            ) -> tuple[str, bool, list[str], Callable[[Path], object]]:
    """The same qemu-img and diskimg command line, the image path last."""
    return (name, snapshot, [tool, *args],
            lambda p: diskimg_cli(*[a for a in args if a != "-q"], p))


# (name, needs a snapshot, qemu command, diskimg action)
WRITE_OPS: list[tuple[str, bool, list[str], Callable[[Path], object]]] = [
    ("write", False, ["qemu-io", "-c", "write -P 9 0 512"], _api_write),
    ("write_zeroes", False, ["qemu-io", "-c", "write -z 0 64k"], _api_write_zeroes),
    ("write_compressed", False, ["qemu-io", "-c", "write -c -P 9 0 64k"], _api_compressed),
    ("resize", False, ["qemu-img", "resize", "-q"],
     lambda p: diskimg_cli("resize", "-q", p, "2M")),
    _cli_op("snapshot-c", True, "qemu-img", "snapshot", "-c", "s2"),
    _cli_op("snapshot-a", True, "qemu-img", "snapshot", "-a", "s1"),
    _cli_op("snapshot-d", True, "qemu-img", "snapshot", "-d", "s1"),
    _cli_op("amend", True, "qemu-img", "amend", "-o", "lazy_refcounts=on"),
    _cli_op("check-r-leaks", True, "qemu-img", "check", "-r", "leaks"),
    _cli_op("check-r-all", True, "qemu-img", "check", "-r", "all"),
    _cli_op("commit", True, "qemu-img", "commit"),
    _cli_op("rebase-u", True, "qemu-img", "rebase", "-u", "-b", ""),
    _cli_op("rebase", True, "qemu-img", "rebase", "-b", ""),
]


@pytest.mark.parametrize("name,snapshot,qemu_cmd,action", WRITE_OPS,
                         ids=[o[0] for o in WRITE_OPS])
def test_issue15_bug10_write_paths_clear_unknown_autoclear_bits_like_qemu(
        tmp_path: Path, templates: dict[bool, Path], name: str, snapshot: bool,
        qemu_cmd: list[str], action: Callable[[Path], object]) -> None:
    theirs = _image(tmp_path / "q", templates[snapshot])
    ours = _image(tmp_path / "d", templates[snapshot])
    tool = QEMU_IMG if qemu_cmd[0] == "qemu-img" else QEMU_IO
    args = [tool, *qemu_cmd[1:], theirs]
    if name == "resize":
        args.append("2M")
    sh(*args)
    action(ours)
    assert _autoclear(theirs) == 0
    assert _autoclear(ours) == _autoclear(theirs)
    assert_clean(ours)


def _refused(p: Path, call: Callable[[diskimg.BlockDevice], object]) -> None:
    with diskimg.open(p, "r+") as img, pytest.raises(diskimg.UsageError):
        call(img)


@pytest.mark.parametrize("action", [
    lambda p: diskimg_cli("info", p),
    lambda p: diskimg_cli("check", p),
    lambda p: diskimg_cli("map", "--output=json", p),
    lambda p: diskimg_cli("snapshot", "-l", p),
    lambda p: diskimg.open(p).close(),
    # refusals: qemu clears the bits when it opens, before it refuses; diskimg clears
    # them only before a change, so a refused command leaves the file byte-identical
    lambda p: diskimg_cli("snapshot", "-a", "nope", p, check=False),
    # (qemu 7.2 shrinks an image with snapshots: the refusal is a shrink without --shrink)
    lambda p: diskimg_cli("resize", "-q", p, "64k", check=False),
    lambda p: diskimg.open(p, "r+").close(),
    lambda p: _refused(p, lambda img: img.snapshots.apply("nope")),
    lambda p: _refused(p, lambda img: img.snapshots.delete("nope")),
], ids=["info", "check", "map", "snapshot-l", "open-r", "refused-apply",
        "refused-shrink", "open-r+-unchanged", "api-refused-apply", "api-refused-delete"])
def test_read_only_use_and_refusals_leave_autoclear_bits(
        tmp_path: Path, templates: dict[bool, Path], action: Callable[[Path], object]
) -> None:
    p = _image(tmp_path / "d", templates[True])
    before = sha(p)
    action(p)
    assert sha(p) == before
    assert _autoclear(p) == UNKNOWN


def test_known_autoclear_bit_bitmaps_is_kept_and_bitmaps_stay_true(
        tmp_path: Path, templates: dict[bool, Path]) -> None:
    """Bit 0 stays set after a diskimg write (diskimg keeps bitmaps true: the written
    range is marked dirty), exactly as after qemu-io's write."""
    results = []
    for who in ("q", "d"):
        p = _image(tmp_path / who, templates[False])
        _set_autoclear(p, 0)
        sh(QEMU_IMG, "bitmap", "--add", p, "b0")
        _set_autoclear(p, _autoclear(p) | UNKNOWN)
        if who == "q":
            sh(QEMU_IO, "-c", "write -P 9 0 512", p)
        else:
            _api_write(p)
        info = json.loads(sh(QEMU_IMG, "info", "--output=json", p).stdout)
        results.append((_autoclear(p), info["format-specific"]["data"]["bitmaps"]))
        assert_clean(p)
    assert results[0] == results[1] == (1, [{"flags": ["auto"], "name": "b0",
                                             "granularity": 65536}])


def test_snapshot_apply_refuses_an_image_with_bitmaps_like_qemu(
        tmp_path: Path, templates: dict[bool, Path]) -> None:
    """Reverting to a snapshot would leave a persistent bitmap claiming nothing changed;
    qemu-img refuses with these words and so does diskimg, changing nothing."""
    p = _image(tmp_path / "d", templates[True])
    _set_autoclear(p, 0)
    sh(QEMU_IMG, "bitmap", "--add", p, "b0")
    q = p.with_name("q.qcow2")
    shutil.copyfile(p, q)
    before = sha(p)
    ours = diskimg_cli("snapshot", "-a", "s1", p, check=False)
    theirs = sh(QEMU_IMG, "snapshot", "-a", "s1", q, check=False)
    assert (ours.returncode, theirs.returncode) == (1, 1)
    assert ours.stderr.replace("diskimg:", "qemu-img:") == theirs.stderr
    assert "Device has active dirty bitmaps" in ours.stderr
    assert sha(p) == before


def test_opening_a_dirty_lazy_refcounts_image_clears_unknown_autoclear_bits(
        tmp_path: Path) -> None:
    """Opening r+ repairs a dirty lazy-refcounts image, a change: the unknown bits go
    first, as when qemu-io opens the same file."""
    ours, theirs = tmp_path / "d.qcow2", tmp_path / "q.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", ours, "1M")
    img = diskimg.open(ours, "r+")
    img.write(0, b"\x07" * 65536)
    img.flush()
    dirty = ours.read_bytes()  # as a crash leaves it: dirty bit set
    img.close()
    ours.write_bytes(dirty)
    assert struct.unpack(">Q", dirty[72:80])[0] & 1
    _set_autoclear(ours, UNKNOWN)
    shutil.copyfile(ours, theirs)
    diskimg.open(ours, "r+").close()
    sh(QEMU_IO, "-c", "read -P 7 0 64k", theirs)
    assert ours.read_bytes()[72:96] == theirs.read_bytes()[72:96]
    assert _autoclear(ours) == 0
    sh(QEMU_IO, "-c", "read -P 7 0 64k", ours)
    assert_clean(ours)


def test_known_autoclear_bit_raw_data_file_is_kept(tmp_path: Path) -> None:
    results = []
    for who in ("q", "d"):
        p = tmp_path / f"{who}.qcow2"
        sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
           f"data_file={tmp_path / (who + '.raw')},data_file_raw=on", p, "1M")
        _set_autoclear(p, _autoclear(p) | UNKNOWN)
        if who == "q":
            sh(QEMU_IO, "-c", "write -P 9 0 512", p)
        else:
            _api_write(p)
        results.append(_autoclear(p))
        assert_clean(p)
        assert (tmp_path / f"{who}.raw").read_bytes()[:512] == b"\x09" * 512
    assert results == [2, 2]


def test_refused_snapshot_create_changes_nothing_with_lazy_refcounts_and_autoclear_bits(
        tmp_path: Path) -> None:
    """The refusal comes before the first change: neither the lazy-refcounts dirty bit
    nor the autoclear field is written for a create that is refused."""
    p = tmp_path / "l.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1,lazy_refcounts=on",
       p, "1M")
    sh(QEMU_IO, "-c", "write -P 3 0 64k", p)
    _set_autoclear(p, UNKNOWN)
    before = sha(p)
    _refused(p, lambda img: img.snapshots.create("s"))  # type: ignore[attr-defined]
    assert sha(p) == before


def test_refused_amend_downgrade_changes_nothing(tmp_path: Path) -> None:
    """Every reason a v2 header cannot be written is checked before amend writes
    anything, the autoclear field included."""
    p = tmp_path / "z.qcow2"
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M")
    sh(QEMU_IO, "-c", "write -c -P 3 0 64k", p)
    _set_autoclear(p, UNKNOWN)
    before = sha(p)
    with pytest.raises(diskimg.UsageError, match="incompatible features 0x8"):
        amend(p, {"compat": "0.10"})
    assert sha(p) == before
