"""Pool and volume behaviour through the Python API; images checked with qemu-img."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import ImageLockedError, PoolError
from diskimg.pool import Permissions, Pool, PoolDef, PoolRegistry, VolumeDef

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


@pytest.fixture
def reg(tmp_path: Path) -> PoolRegistry:
    return PoolRegistry(tmp_path / "cfg", tmp_path / "state")


@pytest.fixture
def pool(reg: PoolRegistry, tmp_path: Path) -> Pool:
    p = reg.define("p1", tmp_path / "images")
    p.build()
    p.start()
    return p


# --- pools ----------------------------------------------------------------------------------

def test_define_build_start_lifecycle(reg: PoolRegistry, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "images"
    p = reg.define("p1", target)
    cfg = tmp_path / "cfg" / "p1.xml"
    assert cfg.exists() and stat.S_IMODE(cfg.stat().st_mode) == 0o600
    text = cfg.read_text()
    assert text.startswith("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.")
    d = PoolDef.from_xml(text)
    assert d.name == "p1" and d.target_path == str(target) and d.uuid == p.uuid
    assert not p.is_active() and p.is_persistent() and not p.autostart
    assert p.info().state == "inactive"
    with pytest.raises(PoolError, match="cannot open directory"):
        p.start()
    p.build()
    assert stat.S_IMODE(target.stat().st_mode) == 0o711
    p.start()
    assert reg.lookup("p1").is_active() and reg.lookup(p.uuid or "").name == "p1"
    with pytest.raises(PoolError, match="already active"):
        p.start()
    i = p.info()
    sv = os.statvfs(target)
    assert i.state == "running" and i.capacity == sv.f_frsize * sv.f_blocks
    xml = p.to_xml()
    assert f"<capacity unit='bytes'>{i.capacity}</capacity>" in xml
    assert "<mode>0711</mode>" in xml and f"<owner>{os.getuid()}</owner>" in xml
    p.set_autostart(True)
    link = tmp_path / "cfg" / "autostart" / "p1.xml"
    assert link.is_symlink() and os.readlink(link) == str(cfg) and p.autostart
    (target / "f").write_bytes(b"x")
    with pytest.raises(PoolError, match="still active"):
        p.delete()
    with pytest.raises(PoolError, match="still active"):
        p.undefine()
    p.destroy()
    with pytest.raises(PoolError, match="not active"):
        p.volumes()
    with pytest.raises(PoolError, match="Directory not empty"):
        p.delete()
    (target / "f").unlink()
    p.delete()
    assert not target.exists()
    p.undefine()
    assert not cfg.exists() and not os.path.lexists(link)
    assert reg.pools() == []


def test_build_with_permissions_and_existing_file(reg: PoolRegistry, tmp_path: Path) -> None:
    p = reg.define_xml(f"<pool type='dir'><name>p</name><target><path>{tmp_path}/x</path>"
                       "<permissions><mode>0750</mode></permissions></target></pool>")
    p.build()
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o750
    (tmp_path / "file").write_text("")
    q = reg.define("q", tmp_path / "file")
    with pytest.raises(PoolError, match="Not a directory"):
        q.build()


def test_define_conflicts(reg: PoolRegistry, tmp_path: Path) -> None:
    p = reg.define("p1", tmp_path / "a")
    # same name again keeps the uuid (an update)
    assert reg.define("p1", tmp_path / "a2").uuid == p.uuid
    with pytest.raises(PoolError, match="already exists with uuid"):
        reg.define("p1", tmp_path / "a3", uuid="0f4c2e57-55e6-4e8a-8a27-9b0f0e7b6c15")
    with pytest.raises(PoolError, match="Storage source conflict"):
        reg.define("p2", tmp_path / "a2")
    with pytest.raises(PoolError, match="already defined with uuid"):
        reg.define("p3", tmp_path / "b", uuid=p.uuid)
    with pytest.raises(PoolError, match="not found"):
        reg.lookup("nosuch")


def test_reads_libvirt_config_dir_and_skips_bad_files(tmp_path: Path) -> None:
    cfg = tmp_path / "etc-libvirt-storage"
    cfg.mkdir()
    (cfg / "default.xml").write_text(
        "<!-- libvirt's warning -->\n<pool type='dir'><name>default</name>"
        "<uuid>3ea8e2e7-ad8b-4c63-9a3e-0f4c54b3f6a2</uuid>"
        f"<target><path>{tmp_path}/images</path></target></pool>\n")
    (cfg / "evil.xml").write_text("<!DOCTYPE x [<!ENTITY a 'b'>]><pool type='dir'/>")
    (cfg / "lvm.xml").write_text("<pool type='logical'><name>lvm</name><source><name>vg"
                                 "</name></source><target><path>/dev/vg</path></target></pool>")
    (cfg / "autostart").mkdir()
    os.symlink(cfg / "default.xml", cfg / "autostart" / "default.xml")
    reg = PoolRegistry(cfg, tmp_path / "state")
    pools = {p.name: p for p in reg.pools()}
    assert set(pools) == {"default", "lvm"}
    assert pools["default"].autostart
    assert [str(p) for p, _ in reg.errors] == [str(cfg / "evil.xml")]
    with pytest.raises(PoolError, match="dir"):
        pools["lvm"].build()
    # starting writes only into the state directory
    (tmp_path / "images").mkdir()
    before = sorted(os.listdir(cfg))
    pools["default"].start()
    assert sorted(os.listdir(cfg)) == before
    assert (tmp_path / "state" / "default.xml").exists()


def test_transient_pool_and_open_dir(reg: PoolRegistry, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    p = reg.create_xml(f"<pool type='dir'><name>t</name><target><path>{tmp_path}/t</path>"
                       "</target></pool>")
    assert p.is_active() and not p.is_persistent()
    with pytest.raises(PoolError, match="transient"):
        p.set_autostart(True)
    p.destroy()
    assert reg.pools() == []
    d = Pool.open_dir(tmp_path / "t")
    assert d.is_active() and d.volumes() == []
    with pytest.raises(PoolError, match="cannot open directory"):
        Pool.open_dir(tmp_path / "missing")


# --- volumes: create ------------------------------------------------------------------------

@needs_qemu
def test_create_raw_and_qcow2(pool: Pool) -> None:
    r = pool.create_volume("r.raw", "10M")
    st = os.stat(r.path)
    assert st.st_size == 10 << 20 and st.st_blocks * 512 >= 10 << 20
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    s = pool.create_volume("s.raw", 1000, allocation=0)
    assert os.stat(s.path).st_size == 1000 and os.stat(s.path).st_blocks == 0
    assert QEMU.json("info", "-U", s.path)["format"] == "raw"
    q = pool.create_volume("a.qcow2", "1G", "qcow2")
    info = QEMU.json("info", "-U", q.path)
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
    assert info["format-specific"]["data"]["compat"] == "0.10"  # libvirt's default
    o = pool.create_volume("b.qcow2", "2G", "qcow2", backing="a.qcow2")
    info = QEMU.json("info", "-U", o.path)
    assert info["backing-filename"] == q.path and info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 2 << 30
    assert [v.name for v in pool.volumes()] == ["a.qcow2", "b.qcow2", "r.raw", "s.raw"]
    assert q.key == q.path == os.path.join(pool.path, "a.qcow2")


@needs_qemu
def test_create_from_volume_xml(pool: Pool) -> None:
    v = pool.create_volume_xml(
        "<volume><name>c.qcow2</name><capacity unit='MiB'>10</capacity><target>"
        "<format type='qcow2'/><permissions><mode>0640</mode></permissions>"
        "<features><lazy_refcounts/></features><clusterSize unit='KiB'>128</clusterSize>"
        "</target></volume>")
    info = QEMU.json("info", "-U", v.path)
    data = info["format-specific"]["data"]
    assert info["cluster-size"] == 128 << 10 and info["virtual-size"] == 10 << 20
    assert data["compat"] == "1.1" and data["lazy-refcounts"] is True  # <features> → 1.1
    assert stat.S_IMODE(os.stat(v.path).st_mode) == 0o640
    w = pool.create_volume_xml("<volume><name>d.qcow2</name><capacity>1048576</capacity>"
                               "<target><format type='qcow2'/><compat>1.1</compat></target>"
                               "<backingStore><path>" + v.path + "</path><format type='qcow2'/>"
                               "</backingStore></volume>")
    info = QEMU.json("info", "-U", w.path)
    assert info["backing-filename"] == v.path
    assert info["format-specific"]["data"]["compat"] == "1.1"
    r = pool.create_volume_xml("<volume><name>r.img</name><capacity unit='KB'>4</capacity>"
                               "</volume>")
    assert os.stat(r.path).st_size == 4000 and r.format == "raw"


@needs_qemu
def test_create_encrypted_luks(pool: Pool) -> None:
    uuid = "6c1ee3a6-3a6c-4b0e-8d7e-7b8b0cbb0a11"
    xml = ("<volume><name>enc.qcow2</name><capacity unit='MiB'>4</capacity><target>"
           "<format type='qcow2'/><encryption format='luks'><secret type='passphrase' "
           f"uuid='{uuid}'/></encryption></target></volume>")
    with pytest.raises(PoolError, match="Secret not found"):
        pool.create_volume_xml(xml)
    assert not os.path.exists(os.path.join(pool.path, "enc.qcow2"))
    try:
        v = pool.create_volume_xml(xml, secrets={uuid: b"password"})
    except diskimg.UnsupportedFeatureError as e:  # qcow2 encryption still being written
        assert os.listdir(pool.path) == []
        pytest.skip(str(e))
    info = QEMU.json("info", "-U", v.path)
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert "<encryption format='luks'>" in v.to_xml()


@pytest.mark.parametrize("name", ["../x.raw", "a/b", ".", "..", ""])
def test_bad_volume_names_leave_nothing(pool: Pool, name: str, tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PoolError):
        pool.create_volume(name, 1024)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(pool.path) == []


def test_create_twice_and_failed_create(pool: Pool) -> None:
    v = pool.create_volume("a.raw", 4096)
    with open(v.path, "r+b") as f:
        f.write(b"keep")
    with pytest.raises(PoolError, match="exists already"):
        pool.create_volume("a.raw", 8192)
    assert Path(v.path).read_bytes()[:4] == b"keep"
    with pytest.raises(diskimg.DiskImgError):
        pool.create_volume("bad.qcow2", "1M", "qcow2", options={"cluster_size": 1000})
    with pytest.raises(PoolError, match="raw"):
        pool.create_volume("bad2.raw", "1M", backing="a.raw")
    with pytest.raises(PoolError, match="cannot create 'qed'"):
        pool.create_volume("bad3.qed", "1M", "qed")
    assert os.listdir(pool.path) == ["a.raw"]


# --- volumes: what a refresh sees -----------------------------------------------------------

@needs_qemu
def test_listing_like_libvirt(pool: Pool) -> None:
    d = Path(pool.path)
    subprocess.run([QEMU_IMG or "", "create", "-q", "-f", "qcow2", str(d / "q3.qcow2"), "1M"],
                   check=True)
    (d / "notes.txt").write_text("hello")
    (d / "subdir").mkdir()
    os.mkfifo(d / "fifo")
    os.symlink("/nonexistent", d / "dangling")
    os.symlink(d / "q3.qcow2", d / "link.qcow2")
    vols = {v.name: v for v in pool.volumes()}
    assert sorted(vols) == ["link.qcow2", "notes.txt", "q3.qcow2", "subdir"]
    assert vols["notes.txt"].format == "raw" and vols["notes.txt"].info().capacity == 5
    assert vols["subdir"].info().type == "dir"
    assert vols["link.qcow2"].format == "qcow2"
    xml = vols["q3.qcow2"].to_xml()
    assert "<compat>1.1</compat>\n    <clusterSize unit='B'>65536</clusterSize>\n" \
           "    <features/>\n" in xml
    sub = vols["subdir"].to_xml()
    assert sub.startswith("<volume type='dir'>") and "<format type='dir'/>" in sub
    assert "<physical" not in sub


@needs_qemu
def test_volume_xml_fields(pool: Pool) -> None:
    a = pool.create_volume("a.qcow2", "1G", "qcow2")
    b = pool.create_volume("b.qcow2", "1G", "qcow2", backing=a, backing_format="qcow2")
    xml = b.to_xml()
    st = os.stat(b.path)
    lines = xml.splitlines()
    assert lines[0] == "<volume type='file'>"
    assert lines[1:6] == [
        "  <name>b.qcow2</name>",
        f"  <key>{b.path}</key>",
        "  <capacity unit='bytes'>1073741824</capacity>",
        f"  <allocation unit='bytes'>{st.st_blocks * 512}</allocation>",
        f"  <physical unit='bytes'>{st.st_size}</physical>",
    ]
    assert lines[6:14] == [
        "  <target>", f"    <path>{b.path}</path>", "    <format type='qcow2'/>",
        "    <permissions>", "      <mode>0600</mode>", f"      <owner>{os.getuid()}</owner>",
        f"      <group>{os.getgid()}</group>", "    </permissions>"]
    assert re.search(r"<atime>\d+(\.\d{9})?</atime>\n\s+<mtime>\d+(\.\d{9})?</mtime>\n"
                     r"\s+<ctime>\d+(\.\d{9})?</ctime>\n\s+<btime>0</btime>", xml)
    assert f"<mtime>{st.st_mtime_ns // 10**9}." in xml
    assert "<clusterSize unit='B'>65536</clusterSize>" in xml and "<compat>" not in xml
    bs = xml[xml.index("<backingStore>"):]
    assert f"<path>{a.path}</path>" in bs and "<format type='qcow2'/>" in bs
    assert "<timestamps>" in bs
    v = VolumeDef.from_xml(xml)
    assert v.key == b.path and v.capacity == 1 << 30 and v.backing is not None
    i = b.info()
    assert (i.type, i.capacity, i.allocation, i.physical) == (
        "file", 1 << 30, st.st_blocks * 512, st.st_size)


# --- volumes: clone, resize, wipe, upload/download, delete ----------------------------------

def _fill(path: str, fmt: str, chunks: dict[int, bytes]) -> None:
    with diskimg.open(path, "r+", fmt) as dev:
        for off, data in chunks.items():
            dev.write(off, data)


@needs_qemu
@pytest.mark.parametrize(("src_fmt", "dst_fmt"), [("qcow2", "qcow2"), ("qcow2", "raw"),
                                                  ("raw", "qcow2"), ("raw", "raw")])
def test_clone_and_create_from(pool: Pool, src_fmt: str, dst_fmt: str) -> None:
    src = pool.create_volume(f"src.{src_fmt}", "4M", src_fmt, allocation=0)
    _fill(src.path, src_fmt, {0: b"boot" * 128, 3 << 20: b"\xaa" * 65536})
    if src_fmt == dst_fmt:
        new = src.clone("copy")
    else:
        new = pool.create_volume_from(
            f"<volume><name>copy</name><capacity>1024</capacity><target>"
            f"<format type='{dst_fmt}'/></target></volume>", src)
    assert new.format == dst_fmt
    assert new.info().capacity == 4 << 20  # at least the source's capacity
    r = subprocess.run([QEMU_IMG or "", "compare", "-U", "-f", src_fmt, "-F", dst_fmt,
                        src.path, new.path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    if dst_fmt == "qcow2":
        assert QEMU.img("check", "-U", new.path, ok=None).returncode == 0
    with pytest.raises(PoolError, match="exists already"):
        src.clone("copy")


@needs_qemu
def test_resize(pool: Pool) -> None:
    r = pool.create_volume("r.raw", "1M", allocation=0)
    assert r.resize(2 << 20) == 2 << 20 and os.path.getsize(r.path) == 2 << 20
    assert r.resize(1 << 20, delta=True) == 3 << 20
    with pytest.raises(PoolError, match="shrink flag"):
        r.resize(1 << 20)
    assert r.resize(1 << 20, shrink=True) == 1 << 20
    assert r.resize(512 << 10, delta=True, shrink=True) == 512 << 10
    r.resize(1 << 20, allocate=True)
    assert os.stat(r.path).st_blocks * 512 >= 512 << 10
    with pytest.raises(PoolError, match="below existing allocation"):
        r.resize(4096, shrink=True)
    q = pool.create_volume("q.qcow2", "1G", "qcow2")
    q.resize(2 << 30)
    assert QEMU.json("info", "-U", q.path)["virtual-size"] == 2 << 30
    assert QEMU.img("check", "-U", q.path, ok=None).returncode == 0
    with pytest.raises(PoolError, match="only supported for raw"):
        q.resize(3 << 30, allocate=True)


@needs_qemu
def test_wipe_algorithms(pool: Pool) -> None:
    r = pool.create_volume("r.raw", 3 * 65536)
    _fill(r.path, "raw", {0: b"secret" * 1000})
    r.wipe()
    assert Path(r.path).read_bytes() == bytes(3 * 65536)
    assert os.stat(r.path).st_blocks * 512 >= 3 * 65536  # zeros were written, not holes
    s = pool.create_volume("s.raw", 65536, allocation=0)
    _fill(s.path, "raw", {4096: b"secret"})
    os.truncate(s.path, 1 << 20)  # now sparse: libvirt's truncate trick applies
    s.wipe("zero")
    assert Path(s.path).read_bytes() == bytes(1 << 20)
    r.wipe("bsi")
    assert Path(r.path).read_bytes() == b"\x7f" * (3 * 65536)
    r.wipe("schneier")
    data = Path(r.path).read_bytes()
    assert len(data) == 3 * 65536 and data.count(0) < len(data) // 2  # ends with random
    r.wipe("nnsa")  # random, random, zeros, verified
    assert Path(r.path).read_bytes() == bytes(3 * 65536)
    r.wipe("dod")
    assert Path(r.path).read_bytes() == b"\xff" * (3 * 65536)
    r.wipe("gutmann")
    r.wipe("trim")
    assert Path(r.path).read_bytes() == bytes(3 * 65536)
    assert os.path.getsize(r.path) == 3 * 65536
    with pytest.raises(PoolError, match="Unsupported wipe algorithm"):
        r.wipe("magic")
    q = pool.create_volume_xml("<volume><name>q.qcow2</name><capacity unit='M'>8</capacity>"
                               "<target><format type='qcow2'/><compat>1.1</compat>"
                               "<clusterSize unit='K'>128</clusterSize></target></volume>")
    _fill(q.path, "qcow2", {0: b"topsecret" * 100, 5 << 20: b"x" * 4096})
    q.wipe("random")
    info = QEMU.json("info", "-U", q.path)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 << 20
    assert info["cluster-size"] == 128 << 10
    assert QEMU.img("check", "-U", q.path, ok=None).returncode == 0
    with diskimg.open(q.path) as dev:
        assert dev.read(0, 1 << 20) == bytes(1 << 20)
    assert b"topsecret" not in Path(q.path).read_bytes()


def test_upload_download(pool: Pool, tmp_path: Path) -> None:
    v = pool.create_volume("v.raw", 64, allocation=0)
    assert v.upload(io.BytesIO(b"hello world"), offset=10, length=5) == 5
    data = Path(v.path).read_bytes()
    assert data[10:15] == b"hello" and data[:10] == bytes(10) and len(data) == 64
    out = io.BytesIO()
    assert v.download(out, offset=8, length=10) == 10
    assert out.getvalue() == b"\0\0hello\0\0\0"
    out = io.BytesIO()
    assert v.download(out) == 64 and out.getvalue() == data
    # upload past the end grows the file, like writing the host file does in libvirt
    v.upload(io.BytesIO(b"tail"), offset=100)
    assert os.path.getsize(v.path) == 104
    # sparse download
    big = pool.create_volume("big.raw", 4 << 20, allocation=0)
    big.upload(io.BytesIO(b"end"), offset=(4 << 20) - 3)
    dst = tmp_path / "dl.img"
    with open(dst, "wb") as f:
        big.download(f, sparse=True)
    assert dst.stat().st_size == 4 << 20 and dst.read_bytes()[-3:] == b"end"
    assert dst.stat().st_blocks * 512 < 4 << 20
    with pytest.raises(PoolError, match="negative"):
        v.upload(io.BytesIO(b"x"), offset=-1)


@needs_qemu
def test_delete_respects_qemu_locks(pool: Pool) -> None:
    v = pool.create_volume("busy.qcow2", "1M", "qcow2")
    with diskimg.open(v.path, "r+"):  # stands in for a running QEMU holding the image
        with pytest.raises(ImageLockedError):
            v.delete()
        with pytest.raises(ImageLockedError):
            v.wipe()
        with pytest.raises((ImageLockedError, diskimg.DiskImgError)):
            v.resize(2 << 20)
        assert os.path.exists(v.path)
        v.delete(force=True)
    assert not os.path.exists(v.path)
    with pytest.raises(PoolError, match="not found"):
        v.delete()
    with pytest.raises(PoolError, match="not found"):
        pool.volume("busy.qcow2")


def test_find_volume_by_path(reg: PoolRegistry, pool: Pool) -> None:
    v = pool.create_volume("x.raw", 512)
    found = reg.find_volume(v.path)
    assert found.name == "x.raw" and found.pool.name == "p1"
    with pytest.raises(PoolError, match="matching path"):
        reg.find_volume("/nonexistent/x.raw")


def test_permissions_dataclass_used_on_create(pool: Pool) -> None:
    v = pool.create_volume("m.raw", 512, permissions=Permissions(mode=0o644))
    assert stat.S_IMODE(os.stat(v.path).st_mode) == 0o644
