"""Names no file can have, from a Python caller: a NUL byte, or a surrogate that stands for
no byte (``os.fsencode`` refuses it; a command line can pass neither).

Every API call refuses such a name with :class:`UsageError` -- not the ``ValueError`` or
``UnicodeEncodeError`` the ``os`` functions raise -- before it makes, changes or removes
any file.  A name diskimg would store in an image for QEMU to read as a C string (a backing
or data file name, a backing format, a vmdk parent or extent) is refused for a NUL byte
too: stored, it would end early, and name (or make) another file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg import PoolError, PoolRegistry, UsageError
from diskimg.pool.xml import PoolDef

NUL = "a\0b.img"
SURROGATE = "a\ud800b.img"


def _tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` with the hash of its bytes."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _setup(d: Path) -> None:
    """An image, and one with an external data file."""
    diskimg.create(d / "ok.qcow2", "qcow2", 1 << 20)
    diskimg.create(d / "ext.qcow2", "qcow2", 1 << 20, options={"data_file": str(d / "ext.raw")})
    for name in ("ok.qcow2", "ext.qcow2"):
        with diskimg.open(d / name, "r+") as img:
            img.write(0, b"\x5a" * 65536)


#: API calls with the bad name in one argument (the others name usable files)
CALLS: dict[str, Callable[[Path, str], Any]] = {
    "open": lambda d, n: diskimg.open(d / n),
    "open r+": lambda d, n: diskimg.open(d / n, "r+", format="qcow2"),
    "info": lambda d, n: diskimg.info(d / n),
    "check": lambda d, n: diskimg.check(d / n),
    "map": lambda d, n: diskimg.map(d / n),
    "create qcow2": lambda d, n: diskimg.create(d / n, "qcow2", 1 << 20),
    "create raw": lambda d, n: diskimg.create(d / n, "raw", 1 << 20),
    "create vmdk": lambda d, n: diskimg.create(d / n, "vmdk", 1 << 20),
    "create with that backing file": lambda d, n: diskimg.create(
        d / "new.qcow2", "qcow2", 1 << 20, backing_file=n, backing_fmt="qcow2"),
    "convert from": lambda d, n: diskimg.convert(d / n, d / "out.raw", out_format="raw"),
    "convert to raw": lambda d, n: diskimg.convert(d / "ok.qcow2", d / n, out_format="raw"),
    "convert to qcow2": lambda d, n: diskimg.convert(d / "ok.qcow2", d / n,
                                                     out_format="qcow2"),
    "dd to": lambda d, n: diskimg.dd(d / "ok.qcow2", d / n, bs=65536),
    "compare": lambda d, n: diskimg.compare(d / "ok.qcow2", d / n),
    "rebase onto": lambda d, n: diskimg.rebase(d / "ok.qcow2", str(d / n), "qcow2"),
}


@pytest.mark.parametrize("name", [NUL, SURROGATE], ids=["NUL", "surrogate"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_name_no_file_can_have_is_the_callers_error_and_changes_nothing(
        call: str, name: str, tmp_path: Path) -> None:
    _setup(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(UsageError) as e:
        CALLS[call](tmp_path, name)
    why = "a NUL byte" if name == NUL else "a surrogate that stands for no byte"
    assert str(e.value).endswith(f"is not a file name: it holds {why}"), str(e.value)
    assert e.value.field == "path"
    assert _tree(tmp_path) == before


#: names stored in an image, with a NUL byte, and the message that refuses each
STORED: dict[str, tuple[Callable[[Path], Any], str]] = {
    "backing file (unsafe create)": (lambda d: diskimg.create(
        d / "ok.qcow2", "qcow2", 1 << 20, backing_file="b\0x.qcow2", backing_fmt="qcow2",
        unsafe=True), "Backing file name cannot hold a NUL byte"),
    "backing format": (lambda d: diskimg.create(
        d / "ok.qcow2", "qcow2", 1 << 20, backing_file="base.qcow2", backing_fmt="qcow\0",
        unsafe=True), "Backing format cannot hold a NUL byte"),
    "data file (create)": (lambda d: diskimg.create(
        d / "ok.qcow2", "qcow2", 1 << 20, options={"data_file": str(d / "b\0x.raw")}),
                           "Data file name cannot hold a NUL byte"),
    "data file (amend)": (lambda d: diskimg.amend(
        d / "ext.qcow2", {"data_file": "b\0x.raw"}), "Data file name cannot hold a NUL byte"),
    "backing file (unsafe rebase)": (lambda d: diskimg.rebase(
        d / "ok.qcow2", "b\0x.qcow2", "qcow2", unsafe=True),
                                     "Backing file name cannot hold a NUL byte"),
    "vmdk parent": (lambda d: diskimg.create(
        d / "ok.qcow2", "vmdk", 1 << 20, backing_file=str(d / "b\0x.vmdk"),
        backing_fmt="vmdk", unsafe=True), "'.*' is not a file name: it holds a NUL byte"),
}


@pytest.mark.parametrize("case", sorted(STORED))
def test_a_stored_name_with_a_nul_byte_is_refused_before_any_write(case: str,
                                                                  tmp_path: Path) -> None:
    """Before: the data file's name was stored whole and read back up to the NUL, so the
    create made (and the image then used) a data file named ``b``."""
    _setup(tmp_path)
    before = _tree(tmp_path)
    call, message = STORED[case]
    with pytest.raises(UsageError, match=f"^{message}$"):
        call(tmp_path)
    assert _tree(tmp_path) == before  # the image byte-identical, no file made
    assert sorted(os.listdir(tmp_path)) == ["ext.qcow2", "ext.raw", "ok.qcow2"]


#: storage pools: names and target directories are written into XML definitions, which
#: hold UTF-8 text only, and become file names
POOL_CALLS: dict[str, Callable[[Any, Path, str], Any]] = {
    "pool name": lambda reg, d, n: reg.define(n, d / "dir"),
    "pool target": lambda reg, d, n: reg.define("p", d / n),
    "transient pool target": lambda reg, d, n: reg.create_xml(
        PoolDef(name="t", type="dir", target_path=str(d / n))),
    "volume name": lambda reg, d, n: reg.lookup("good").create_volume(n, 1 << 20, "qcow2"),
}


#: (a volume name is a file name only: one that is not UTF-8 is a file's, see
#: test_a_volume_whose_name_is_not_utf8_is_listed)
POOL_CASES = [pytest.param(call, name, id=f"{call}-{label}") for call in sorted(POOL_CALLS)
              for label, name in (("NUL", NUL), ("surrogate", SURROGATE),
                                  ("not UTF-8", "a\udcffb"))
              if (call, label) != ("volume name", "not UTF-8")]


@pytest.mark.parametrize("call, name", POOL_CASES)
def test_a_pool_name_that_is_not_xml_text_is_refused_and_changes_nothing(
        call: str, name: str, tmp_path: Path) -> None:
    """Before: a NUL went into the definition, and a surrogate raised UnicodeEncodeError
    while the definition was written."""
    reg = PoolRegistry(tmp_path / "cfg", tmp_path / "state")
    pool = reg.define("good", tmp_path / "dir")
    pool.build()
    pool.start()
    before = _tree(tmp_path)
    with pytest.raises(PoolError, match="invalid (pool name|target path|volume name) '"):
        POOL_CALLS[call](reg, tmp_path, name)
    assert _tree(tmp_path) == before


def test_a_volume_whose_name_is_not_utf8_is_listed(tmp_path: Path) -> None:
    """A file in the pool directory whose name is not UTF-8 is a volume like any other (it
    was before these checks, and one odd file must not hide the others)."""
    reg = PoolRegistry(tmp_path / "cfg", tmp_path / "state")
    pool = reg.define("good", tmp_path / "dir")
    pool.build()
    pool.start()
    (tmp_path / "dir" / os.fsdecode(b"x\xffy.raw")).write_bytes(bytes(512))
    pool.create_volume("ok.qcow2", 1 << 20, "qcow2")
    assert [v.name for v in pool.volumes()] == ["ok.qcow2", "x\udcffy.raw"]
    assert pool.volume("x\udcffy.raw").info().capacity == 512


@pytest.mark.parametrize("args,said", [
    ([b"\xff", b"dir", b"--target", b"T"], "invalid pool name '\\udcff'"),
    ([b"ok", b"dir", b"--target", b"T/\xff"], "invalid target path '"),
    ([b"\xff", b"dir", b"--target", b"T", b"--print-xml"], "invalid pool name '\\udcff'"),
])
def test_virsh_pool_define_as_refuses_a_name_that_is_not_utf8_in_libvirt_words(
        args: list[bytes], said: str, tmp_path: Path) -> None:
    """From the command line (arguments are bytes): an XML error as virsh's define gives,
    exit 1, nothing stored.  Before: Python's codec message ('utf-8' codec can't encode
    character '\\udcff' ...)."""
    import subprocess
    import sys

    cfg = tmp_path / "cfg"
    argv = [os.fsencode(sys.executable), b"-m", b"diskimg", b"virsh", b"--config-dir",
            os.fsencode(cfg), b"pool-define-as",
            *[a.replace(b"T", os.fsencode(tmp_path / "t")) for a in args]]
    r = subprocess.run(argv, capture_output=True, timeout=60)
    err = r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode == 1, err
    assert err.startswith("error: Failed to define pool ") and f"error: XML error: {said}" in err
    assert "codec" not in err and "Traceback" not in err
    assert not cfg.exists() or not list(cfg.iterdir())
