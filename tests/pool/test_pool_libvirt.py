"""Optional interop with real libvirt: schema validation with ``virt-xml-validate`` and, when
a session libvirtd can be started, virsh's own output for the same commands as an oracle.

Everything here is skipped when libvirt's tools are absent (Debian: libvirt-clients,
libvirt-daemon, libxml2-utils).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from diskimg.pool import PoolRegistry
from diskimg.pool.cli import main

VALIDATE = shutil.which("virt-xml-validate")
VIRSH = shutil.which("virsh")
QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.skipif(VALIDATE is None or QEMU_IMG is None,
                    reason="virt-xml-validate/qemu-img not installed")
def test_written_xml_validates_against_libvirt_schemas(tmp_path: Path) -> None:
    reg = PoolRegistry(tmp_path / "cfg", tmp_path / "state")
    pool = reg.define("p1", tmp_path / "images")
    pool.build()
    pool.start()
    pool.create_volume("r.raw", "1M")
    a = pool.create_volume("a.qcow2", "1G", "qcow2")
    pool.create_volume("b.qcow2", "1G", "qcow2", backing=a)
    pool.create_volume_xml("<volume><name>c.qcow2</name><capacity unit='M'>8</capacity>"
                           "<target><format type='qcow2'/><features><lazy_refcounts/>"
                           "</features></target></volume>")
    (Path(pool.path) / "dir").mkdir()
    docs = {"pool-config.xml": ((tmp_path / "cfg" / "p1.xml").read_text(), "storagepool"),
            "pool-live.xml": (pool.to_xml(), "storagepool")}
    for v in pool.volumes():
        docs[f"vol-{v.name}.xml"] = (v.to_xml(), "storagevol")
    for name, (text, schema) in docs.items():
        f = tmp_path / name
        f.write_text(text)
        r = subprocess.run([VALIDATE or "", str(f), schema], capture_output=True, text=True)
        assert r.returncode == 0, (name, text, r.stdout, r.stderr)


def _virsh_runner(work: Path) -> list[str] | None:
    """Command prefix running virsh against a private session libvirtd, or None."""
    if VIRSH is None:
        return None
    env = [f"HOME={work}/home", f"XDG_RUNTIME_DIR={work}/home/run",
           f"XDG_CONFIG_HOME={work}/home/.config", f"XDG_CACHE_HOME={work}/home/.cache"]
    prefix = ["env", *env, VIRSH, "-c", "qemu:///session"]
    if os.getuid() == 0:  # a session daemon must not run as root
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *prefix]
    try:
        r = subprocess.run([*prefix, "pool-list", "--all"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if r.returncode == 0 else None


def _normalise(text: str, work: Path) -> str:
    text = text.replace(str(work), "W")
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "UUID", text)
    text = re.sub(r"<([amcb]time)>[0-9.]+</", r"<\1>T</", text)
    text = re.sub(r"<(owner|group)>\d+</", r"<\1>ID</", text)
    # pool sizes move while the test runs; libvirt's in-memory volume XML lacks the
    # clusterSize a refresh would add
    text = re.sub(r"( unit='bytes'>)\d+(</(capacity|allocation|available)>)", r"\1N\2",
                  text) if "<pool" in text else text
    text = re.sub(r"\d+\.\d\d GiB", "X GiB", text)
    return "\n".join(ln for ln in text.splitlines() if "clusterSize" not in ln)


@pytest.mark.skipif(VIRSH is None or QEMU_IMG is None, reason="virsh/qemu-img not installed")
def test_same_output_as_virsh() -> None:
    work = Path(tempfile.mkdtemp(prefix="diskimg-virsh-"))
    try:
        os.chmod(work, 0o777)
        (work / "home").mkdir(mode=0o777)
        os.chmod(work / "home", 0o777)
        prefix = _virsh_runner(work)
        if prefix is None:
            pytest.skip("cannot start a session libvirtd here")
        cmds = [
            ["pool-define-as", "p1", "dir", "--target", f"{work}/pool"],
            ["pool-list", "--all"], ["pool-info", "p1"], ["pool-build", "p1"],
            ["pool-start", "p1"], ["pool-list", "--all"], ["pool-list", "--all", "--details"],
            ["vol-create-as", "p1", "a.qcow2", "1G", "--format", "qcow2"],
            ["vol-create-as", "p1", "b.qcow2", "1G", "--format", "qcow2", "--backing-vol",
             "a.qcow2", "--backing-vol-format", "qcow2"],
            ["vol-create-as", "p1", "r.raw", "10M"],
            ["vol-create-as", "p1", "s.raw", "10M", "--allocation", "0"],
            ["vol-create-as", "p1", "a.qcow2", "1G"], ["vol-create-as", "p1", "x", "1X"],
            ["vol-list", "p1"], ["vol-list", "p1", "--details"], ["vol-info", "a.qcow2", "p1"],
            ["vol-info", "r.raw", "--pool", "p1", "--bytes"], ["vol-dumpxml", "b.qcow2", "p1"],
            ["vol-key", "a.qcow2", "p1"], ["vol-info", "nosuch", "p1"],
            ["vol-resize", "s.raw", "20M", "--pool", "p1"],
            ["vol-resize", "s.raw", "1M", "--pool", "p1"],
            ["vol-wipe", "s.raw", "--pool", "p1"], ["vol-info", "s.raw", "p1", "--bytes"],
            ["vol-delete", "r.raw", "p1"], ["pool-autostart", "p1"], ["pool-list"],
            ["pool-destroy", "p1"], ["pool-undefine", "p1"], ["pool-list", "--all"],
        ]
        theirs, ours = [], []
        mine = work
        for c in cmds:
            r = subprocess.run([*prefix, *c], capture_output=True, text=True, timeout=60)
            theirs.append((r.returncode, _normalise(r.stdout, work),
                           _normalise(r.stderr, work)))
        # our side: same commands in a directory whose name has the same length
        mine = Path(tempfile.mkdtemp(prefix="diskimg-virsh-"))
        assert len(str(mine)) == len(str(work))
        for c in cmds:
            c2 = [a.replace(f"{work}/pool", f"{mine}/pool") for a in c]
            out, err = io.StringIO(), io.StringIO()
            rc = main(["--config-dir", str(mine / "cfg"), "--state-dir", str(mine / "state"),
                       *c2],
                      stdout=out, stderr=err)
            ours.append((rc, _normalise(out.getvalue().replace(str(mine), str(work)), work),
                         _normalise(err.getvalue().replace(str(mine), str(work)), work)))
        for c, t, o in zip(cmds, theirs, ours, strict=True):
            assert o == t, (c, t, o)
    finally:
        # the session libvirtd exits by itself after its idle timeout
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


def _virsh_test(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``virsh -c test:///default`` (libvirt's in-process test driver, no daemon)."""
    return subprocess.run([VIRSH or "", "-c", "test:///default", script],
                          capture_output=True, text=True, timeout=60)


def _text(xml: str, path: str) -> str | None:
    import xml.etree.ElementTree as ET

    el = ET.fromstring(xml).find(path)
    return None if el is None else (el.text or "").strip()


@pytest.mark.skipif(VIRSH is None or QEMU_IMG is None, reason="virsh/qemu-img not installed")
def test_libvirt_test_driver_accepts_our_xml(tmp_path: Path) -> None:
    """Pool and volume XML diskimg writes is defined by libvirt itself (its test driver),
    and libvirt reads back the same name, uuid, target path, permissions, capacity and
    format."""
    reg = PoolRegistry(tmp_path / "cfg", tmp_path / "state")
    pool = reg.define("p1", tmp_path / "images")
    pool.build()
    pool.start()
    vols = [pool.create_volume("r.raw", "3M"),
            pool.create_volume("a.qcow2", "1G", "qcow2"),
            pool.create_volume("v.vmdk", "64M", "vmdk")]
    vols.append(pool.create_volume("b.qcow2", "1G", "qcow2", backing=vols[1]))
    ours = (tmp_path / "cfg" / "p1.xml").read_text()
    (tmp_path / "pool.xml").write_text(ours)
    r = _virsh_test(f"pool-define {tmp_path / 'pool.xml'}; pool-dumpxml p1")
    assert r.returncode == 0 and "Pool p1 defined" in r.stdout, r.stdout + r.stderr
    theirs = r.stdout[r.stdout.index("<pool"):]
    for path in ("name", "uuid", "target/path", "target/permissions/mode"):
        assert _text(theirs, path) == _text(ours, path), path
    for v in vols:
        f = tmp_path / f"{v.name}.xml"
        f.write_text(v.to_xml())
        r = _virsh_test(f"vol-create default-pool {f}; vol-dumpxml {v.name} default-pool")
        assert r.returncode == 0 and f"Vol {v.name} created" in r.stdout, \
            (v.to_xml(), r.stdout, r.stderr)
        theirs = r.stdout[r.stdout.index("<volume"):]
        assert _text(theirs, "name") == v.name
        assert _text(theirs, "capacity") == _text(v.to_xml(), "capacity")
        assert _attr(theirs, "target/format", "type") == v.format
        assert _attr(v.to_xml(), "target/format", "type") == v.format


def _attr(xml: str, path: str, attr: str) -> str | None:
    import xml.etree.ElementTree as ET

    el = ET.fromstring(xml).find(path)
    return None if el is None else el.get(attr)


@pytest.mark.skipif(VIRSH is None, reason="virsh not installed")
@pytest.mark.parametrize("name", ["a/b", "..", "."])
def test_print_xml_prints_a_name_define_refuses_as_virsh_does(tmp_path: Path,
                                                              name: str) -> None:
    """virsh builds ``pool-define-as --print-xml``'s XML without asking libvirt, so it
    prints a pool name that define refuses (a '/', '.' or '..': the name becomes a file
    name); diskimg refused it as define does.  The same stdout and exit code as virsh's;
    the define itself is still refused and stores nothing."""
    import io

    from diskimg.pool.cli import main

    args = ["pool-define-as", "--print-xml", name, "dir", "--target", "/srv/x"]
    theirs = subprocess.run([VIRSH or "", "-c", "test:///default", *args],
                            capture_output=True, text=True, timeout=60)
    cfg = tmp_path / "cfg"
    out, err = io.StringIO(), io.StringIO()
    rc = main(["--config-dir", str(cfg), "--state-dir", str(tmp_path / "st"), *args],
              stdout=out, stderr=err)
    assert (rc, out.getvalue()) == (theirs.returncode, theirs.stdout), err.getvalue()
    assert rc == 0 and f"<name>{name}</name>" in out.getvalue()
    rc = main(["--config-dir", str(cfg), "--state-dir", str(tmp_path / "st"), *args[:1],
               *args[2:]], stdout=io.StringIO(), stderr=err)
    assert rc == 1 and f"Failed to define pool {name}" in err.getvalue()
    assert not cfg.exists() or not list(cfg.iterdir())
