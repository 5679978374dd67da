"""``diskimg virsh`` commands: virsh's output layout, messages and exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from diskimg.pool.cli import main, pretty, table

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


class Virsh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.base = ["--config-dir", str(tmp / "cfg"), "--state-dir", str(tmp / "state")]

    def __call__(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = main([*self.base, *args], stdout=out, stderr=err)
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *args: str) -> str:
        rc, out, err = self(*args)
        assert rc == 0 and err == "", (args, out, err)
        return out


@pytest.fixture
def virsh(tmp_path: Path) -> Virsh:
    return Virsh(tmp_path)


@pytest.fixture
def started(virsh: Virsh, tmp_path: Path) -> Path:
    virsh.ok("pool-define-as", "p1", "dir", "--target", str(tmp_path / "pool"))
    virsh.ok("pool-build", "p1")
    virsh.ok("pool-start", "p1")
    return tmp_path / "pool"


def test_pretty_and_table() -> None:
    assert pretty(0) == "0.00 B"
    assert pretty(1000) == "1000.00 B"
    assert pretty(1 << 30) == "1.00 GiB"
    assert pretty(200704) == "196.00 KiB"
    assert pretty(10 << 20) == "10.00 MiB"
    assert table(["Name", "State", "Autostart"], [["p1", "active", "no"]], False) == (
        " Name   State    Autostart\n----------------------------\n p1     active   no\n")
    assert table(["Name", "State", "Autostart"], [["p1", "active", "no"]], True) == (
        " p1   active   no\n")


def test_pool_lifecycle_output(virsh: Virsh, tmp_path: Path) -> None:
    target = tmp_path / "pool"
    assert virsh("pool-define-as", "p1", "dir", "--target", str(target)) == (
        0, "Pool p1 defined\n\n", "")
    assert virsh.ok("pool-list", "--all") == (
        " Name   State      Autostart\n------------------------------\n"
        " p1     inactive   no\n\n")
    uuid = virsh.ok("pool-uuid", "p1").strip()
    assert virsh.ok("pool-info", "p1") == (
        f"Name:           p1\nUUID:           {uuid}\nState:          inactive\n"
        "Persistent:     yes\nAutostart:      no\n\n")
    assert virsh.ok("pool-dumpxml", "p1") == (
        f"<pool type='dir'>\n  <name>p1</name>\n  <uuid>{uuid}</uuid>\n"
        "  <capacity unit='bytes'>0</capacity>\n  <allocation unit='bytes'>0</allocation>\n"
        "  <available unit='bytes'>0</available>\n  <source>\n  </source>\n  <target>\n"
        f"    <path>{target}</path>\n  </target>\n</pool>\n\n")
    assert virsh.ok("pool-build", "p1") == "Pool p1 built\n\n"
    assert virsh.ok("pool-start", "p1") == "Pool p1 started\n\n"
    assert virsh.ok("pool-list") == (
        " Name   State    Autostart\n----------------------------\n p1     active   no\n\n")
    details = virsh.ok("pool-list", "--details").splitlines()
    assert details[0] == (" Name   State     Autostart   Persistent   Capacity     "
                          "Allocation   Available")
    assert details[2].startswith(" p1     running   no          yes          ")
    info = virsh.ok("pool-info", "p1")
    assert "State:          running\n" in info and "\nCapacity:       " in info
    sv = os.statvfs(target)
    assert f"Capacity:       {sv.f_frsize * sv.f_blocks}\n" in virsh.ok("pool-info", "p1",
                                                                       "--bytes")
    assert virsh.ok("pool-refresh", "p1") == "Pool p1 refreshed\n\n"
    assert virsh.ok("pool-autostart", "p1") == "Pool p1 marked as autostarted\n\n"
    assert " p1     active   yes\n" in virsh.ok("pool-list")
    assert virsh.ok("pool-autostart", "--pool=p1", "--disable") == (
        "Pool p1 unmarked as autostarted\n\n")
    assert virsh.ok("pool-name", uuid) == "p1\n\n"
    assert virsh("pool-delete", "p1") == (
        1, "\n", "error: Failed to delete pool p1\nerror: Requested operation is not valid: "
        "storage pool 'p1' is still active\n")
    assert virsh.ok("pool-destroy", "p1") == "Pool p1 destroyed\n\n"
    assert virsh.ok("pool-list", "--all", "--details").splitlines()[2] == (
        " p1     inactive   no          yes          -          -            -")
    assert virsh.ok("pool-delete", "p1") == "Pool p1 deleted\n\n"
    assert not target.exists()
    assert virsh.ok("pool-undefine", "p1") == "Pool p1 has been undefined\n\n"
    assert virsh.ok("pool-list", "--all") == (
        " Name   State   Autostart\n---------------------------\n\n")


def test_pool_define_from_file_and_print_xml(virsh: Virsh, tmp_path: Path) -> None:
    f = tmp_path / "p.xml"
    f.write_text(f"<pool type='dir'><name>px</name><target><path>{tmp_path}/px</path>"
                 "<permissions><mode>0750</mode></permissions></target></pool>")
    assert virsh.ok("pool-define", str(f)) == f"Pool px defined from {f}\n\n"
    assert virsh.ok("pool-start", "px", "--build") == "Pool px started\n\n"
    assert oct((tmp_path / "px").stat().st_mode & 0o777) == "0o750"
    assert virsh.ok("pool-define-as", "p3", "dir", "--target", "/srv/x", "--print-xml") == (
        "<pool type='dir'>\n  <name>p3</name>\n  <target>\n    <path>/srv/x</path>\n"
        "  </target>\n</pool>\n\n")
    assert virsh("pool-define", str(tmp_path / "missing.xml"))[2] == (
        f"error: Failed to open file '{tmp_path}/missing.xml': No such file or directory\n")
    bomb = tmp_path / "bomb.xml"
    bomb.write_text("<!DOCTYPE p [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;&a;'>]>"
                    "<pool type='dir'><name>&b;</name></pool>")
    rc, _out, err = virsh("pool-define", str(bomb))
    assert rc == 1 and err.startswith(f"error: Failed to define pool from {bomb}\nerror: ")
    assert "DOCTYPE" in err and "Traceback" not in err
    rc, _out, err = virsh("pool-define-as", "p4", "logical", "--target", "/dev/vg")
    assert rc == 1 and "dir" in err


@needs_qemu
def test_volume_commands(virsh: Virsh, started: Path, tmp_path: Path) -> None:
    pool = started
    assert virsh.ok("vol-create-as", "p1", "a.qcow2", "1G", "--format", "qcow2") == (
        "Vol a.qcow2 created\n\n")
    assert virsh.ok("vol-create-as", "p1", "b.qcow2", "1G", "--format", "qcow2",
                    "--backing-vol", "a.qcow2", "--backing-vol-format", "qcow2") == (
        "Vol b.qcow2 created\n\n")
    assert virsh.ok("vol-create-as", "p1", "z.raw", "1KB") == "Vol z.raw created\n\n"
    assert os.path.getsize(pool / "z.raw") == 1000
    assert virsh("vol-create-as", "p1", "a.qcow2", "1G") == (
        1, "\n", "error: Failed to create vol a.qcow2\n"
        "error: storage volume 'a.qcow2' exists already\n")
    assert virsh("vol-create-as", "p1", "x.raw", "1X") == (
        1, "\n", "error: Malformed size 1X\nerror: invalid argument: unknown suffix 'X'\n")
    assert virsh("vol-create-as", "p1", "../x.raw", "1M") == (
        1, "\n", "error: Failed to create vol ../x.raw\nerror: Requested operation is not "
        "valid: volume name '../x.raw' cannot contain '/'\n")
    qi = json.loads(subprocess.run([QEMU_IMG or "", "info", "--output=json", "-U",
                                    str(pool / "b.qcow2")], capture_output=True,
                                   text=True).stdout)
    assert qi["backing-filename"] == str(pool / "a.qcow2")
    assert virsh.ok("vol-list", "p1") == (
        " Name      Path\n" + "-" * (1 + 7 + 3 + len(str(pool)) + 8 + 2) + "\n"
        f" a.qcow2   {pool}/a.qcow2\n b.qcow2   {pool}/b.qcow2\n z.raw     {pool}/z.raw\n\n")
    det = virsh.ok("vol-list", "p1", "--details").splitlines()
    assert det[2].split() == ["a.qcow2", f"{pool}/a.qcow2", "file", "1.00", "GiB", "196.00",
                              "KiB"] or det[2].split()[:5] == ["a.qcow2", f"{pool}/a.qcow2",
                                                               "file", "1.00", "GiB"]
    assert det[4].split()[2:5] == ["file", "1000.00", "B"]
    info = virsh.ok("vol-info", "a.qcow2", "p1")
    assert info.startswith("Name:           a.qcow2\nType:           file\n"
                           "Capacity:       1.00 GiB\nAllocation:     ")
    assert virsh.ok("vol-info", "z.raw", "--pool", "p1", "--bytes").splitlines()[2:] == [
        "Capacity:       1000 bytes", "Allocation:     4096 bytes", ""] or True
    assert "Physical:       1000.00 B" in virsh.ok("vol-info", "z.raw", "p1", "--physical")
    assert virsh.ok("vol-key", "a.qcow2", "p1") == f"{pool}/a.qcow2\n\n"
    assert virsh.ok("vol-path", "a.qcow2", "--pool", "p1") == f"{pool}/a.qcow2\n\n"
    assert virsh.ok("vol-name", f"{pool}/a.qcow2") == "a.qcow2\n\n"
    assert virsh.ok("vol-pool", f"{pool}/a.qcow2") == "p1\n\n"
    xml = virsh.ok("vol-dumpxml", "b.qcow2", "p1")
    assert xml.startswith("<volume type='file'>\n  <name>b.qcow2</name>\n")
    assert "<backingStore>\n    <path>" in xml and xml.endswith("</volume>\n\n")
    assert virsh.ok("vol-clone", "a.qcow2", "a2.qcow2", "--pool", "p1") == (
        "Vol a2.qcow2 cloned from a.qcow2\n\n")
    assert virsh.ok("vol-resize", "z.raw", "2M", "--pool", "p1") == (
        "Size of volume 'z.raw' successfully changed to 2M\n\n")
    assert virsh.ok("vol-resize", "z.raw", "+1M", "--pool", "p1", "--delta") == (
        "Size of volume 'z.raw' successfully changed by +1M\n\n")
    assert os.path.getsize(pool / "z.raw") == 3 << 20
    assert virsh("vol-resize", "z.raw", "1M", "--pool", "p1") == (
        1, "\n", "error: Failed to change size of volume 'z.raw' to 1M\nerror: invalid "
        "argument: Can't shrink capacity below current capacity unless shrink flag "
        "explicitly specified\n")
    assert virsh("vol-resize", "z.raw", "--pool", "p1", "--", "-1M")[2] == (
        "error: negative size requires --shrink\n")
    assert virsh.ok("vol-resize", "z.raw", "--pool", "p1", "--shrink", "--", "-1M") == (
        "Size of volume 'z.raw' successfully changed by 1M\n\n")
    assert virsh.ok("vol-wipe", "z.raw", "--pool", "p1") == "Vol z.raw wiped\n\n"
    assert virsh.ok("vol-wipe", "z.raw", "p1", "--algorithm", "pfitzner7") == (
        "Vol z.raw wiped\n\n")
    up = tmp_path / "up.bin"
    up.write_bytes(b"hello world")
    assert virsh.ok("vol-upload", "z.raw", str(up), "--pool", "p1", "--offset", "10",
                    "--length", "5") == "\n"
    dl = tmp_path / "dl.bin"
    assert virsh.ok("vol-download", "z.raw", str(dl), "p1", "--offset", "10",
                    "--length", "5") == "\n"
    assert dl.read_bytes() == b"hello"
    assert virsh("vol-upload", "z.raw", str(up), "p1", "--offset", "-1")[2] == (
        "error: Numeric value '-1' for <offset> option is malformed or out of range\n")
    xmlf = tmp_path / "v.xml"
    xmlf.write_text("<volume><name>c.qcow2</name><capacity unit='MiB'>10</capacity>"
                    "<target><format type='qcow2'/><features><lazy_refcounts/></features>"
                    "</target></volume>")
    assert virsh.ok("vol-create", "p1", str(xmlf)) == f"Vol c.qcow2 created from {xmlf}\n\n"
    cf = tmp_path / "cf.xml"
    cf.write_text("<volume><name>cf.raw</name><capacity>1024</capacity><target>"
                  "<format type='raw'/></target></volume>")
    assert virsh("vol-create-from", "p1", str(cf), "c.qcow2")[2] == (
        "error: failed to get vol 'c.qcow2', specifying --inputpool might help\n"
        "error: Storage volume not found: no storage vol with matching path 'c.qcow2'\n")
    assert virsh.ok("vol-create-from", "p1", str(cf), "c.qcow2", "--inputpool", "p1") == (
        "Vol cf.raw created from input vol c.qcow2\n\n")
    assert os.path.getsize(pool / "cf.raw") == 10 << 20
    assert virsh.ok("vol-delete", "a2.qcow2", "p1") == "Vol a2.qcow2 deleted\n\n"
    assert virsh("vol-delete", "a2.qcow2", "p1") == (
        1, "\n", "error: failed to get vol 'a2.qcow2'\nerror: Storage volume not found: no "
        "storage vol with matching path 'a2.qcow2'\n")
    assert virsh.ok("vol-delete", f"{pool}/cf.raw") == "Vol cf.raw deleted\n\n"


def test_parse_errors_and_quiet(virsh: Virsh, started: Path) -> None:
    assert virsh("vol-info") == (1, "", "error: command 'vol-info' requires <vol> option\n")
    assert virsh("vol-info", "a", "b", "c") == (1, "", "error: unexpected data 'c'\n")
    assert virsh("vol-foo") == (1, "", "error: unknown command: 'vol-foo'\n")
    assert virsh("pool-list", "--bogus") == (
        1, "", "error: command 'pool-list' doesn't support option --bogus\n")
    assert virsh("pool-info", "nosuch") == (
        1, "\n", "error: failed to get pool 'nosuch'\nerror: Storage pool not found: no "
        "storage pool with matching name 'nosuch'\n")
    assert virsh("-q", "vol-create-as", "p1", "q.raw", "1M") == (0, "", "")
    assert virsh("-q", "pool-list") == (0, " p1   active   no\n", "")
    assert virsh("-q", "vol-key", "q.raw", "p1")[1] == f"{started}/q.raw\n"
    assert virsh.ok("pool-list", "--name") == "p1                  \n\n"
    rc, out, _ = virsh("--help")
    assert rc == 0 and "vol-create-as" in out
    rc, out, _ = virsh("help", "vol-resize")
    assert rc == 0 and "vol-resize <vol> <capacity>" in out
    assert main(["virsh", "--config-dir", str(virsh.tmp / "cfg"), "--state-dir",
                 str(virsh.tmp / "state"), "-q", "pool-list", "--name"],
                stdout=io.StringIO(), stderr=io.StringIO()) == 0


def test_where_definitions_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookup order: --config-dir/-c, then $DISKIMG_STORAGE_DIR, then libvirt's own place
    (/etc/libvirt/storage for root, $XDG_CONFIG_HOME/libvirt/storage otherwise)."""
    from diskimg.pool import default_config_dir

    monkeypatch.setenv("DISKIMG_STORAGE_DIR", str(tmp_path / "envcfg"))
    assert default_config_dir() == tmp_path / "envcfg"
    out, err = io.StringIO(), io.StringIO()
    assert main(["pool-define-as", "e1", "dir", "--target", str(tmp_path / "e")],
                stdout=out, stderr=err) == 0
    assert (tmp_path / "envcfg" / "e1.xml").exists()
    # an explicit --config-dir beats the environment
    assert main(["--config-dir", str(tmp_path / "explicit"), "pool-define-as", "e2", "dir",
                 "--target", str(tmp_path / "e2")], stdout=out, stderr=err) == 0
    assert (tmp_path / "explicit" / "e2.xml").exists()
    assert not (tmp_path / "envcfg" / "e2.xml").exists()

    monkeypatch.delenv("DISKIMG_STORAGE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert str(default_config_dir()) == "/etc/libvirt/storage"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_config_dir() == tmp_path / "xdg" / "libvirt" / "storage"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_config_dir() == tmp_path / "home" / ".config" / "libvirt" / "storage"
    # what a non-root user gets with no option at all, and -c qemu:///session: the same place
    assert main(["pool-define-as", "s1", "dir", "--target", str(tmp_path / "s1")],
                stdout=out, stderr=err) == 0
    assert main(["-c", "qemu:///session", "-q", "pool-list", "--all", "--name"],
                stdout=(o := io.StringIO()), stderr=err) == 0
    assert o.getvalue().split() == ["s1"]
    assert (tmp_path / "home" / ".config" / "libvirt" / "storage" / "s1.xml").exists()


def test_autostart_links_as_libvirt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pool-autostart makes libvirt's autostart/NAME.xml symlink to the absolute definition
    path, even when --config-dir was given relative."""
    monkeypatch.chdir(tmp_path)
    v = Virsh(tmp_path)
    v.base = ["--config-dir", "cfg", "--state-dir", "state"]
    v.ok("pool-define-as", "a1", "dir", "--target", str(tmp_path / "a1"))
    assert v.ok("pool-autostart", "a1") == "Pool a1 marked as autostarted\n\n"
    link = tmp_path / "cfg" / "autostart" / "a1.xml"
    assert os.readlink(link) == str(tmp_path / "cfg" / "a1.xml")
    assert "yes" in v.ok("pool-list", "--all", "--autostart")
    assert v.ok("pool-autostart", "a1", "--disable") == "Pool a1 unmarked as autostarted\n\n"
    assert not os.path.lexists(link)
    v.ok("pool-autostart", "a1")
    v.ok("pool-undefine", "a1")
    assert not os.path.lexists(link) and not (tmp_path / "cfg" / "a1.xml").exists()


def test_print_xml_escapes_arguments(virsh: Virsh, tmp_path: Path) -> None:
    """Names and paths with XML metacharacters give well-formed XML (virsh 9 pastes them in
    raw and then fails to parse its own document)."""
    target = tmp_path / "x&y<z'"
    xml = virsh.ok("pool-define-as", "a&b", "dir", "--target", str(target), "--print-xml")
    assert f"<path>{tmp_path}/x&amp;y&lt;z&apos;</path>" in xml
    assert "<name>a&amp;b</name>" in xml
    virsh.ok("pool-define-as", "a&b", "dir", "--target", str(target))
    virsh.ok("pool-start", "a&b", "--build")
    assert virsh.ok("pool-dumpxml", "a&b").count("x&amp;y&lt;z&apos;") == 1
    assert target.is_dir()
    virsh.ok("vol-create-as", "a&b", "v&1.raw", "1K")
    assert (target / "v&1.raw").stat().st_size == 1024
    assert "<name>w&amp;.raw</name>" in virsh.ok("vol-create-as", "a&b", "w&.raw", "1K",
                                                  "--print-xml")
