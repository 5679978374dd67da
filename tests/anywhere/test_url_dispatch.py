"""URL dispatch in one place (issue 18 item 1): ``diskimg.open`` and the CLI's sources
open ``scheme://`` names through :mod:`diskimg.hostio.urls`.

A test scheme (``memtest://``) is registered with an opener serving qemu-made images
from a dict, so the dispatch, the CLI's printing of URLs (both slashes) and the backing
rules (same store by default; another store or a local file only when the OpenPolicy
says so) are checked against qemu's bytes without any server.  The real HTTP and fsspec
hosts have their own tests; here their absence gives a clear error naming the scheme.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import BackingChainError, DiskImgError, RemoteError, UnsupportedFeatureError
from diskimg.hostio import urls
from diskimg.hostio.fileobj import FileObjectHost
from diskimg.policy import OpenPolicy
from qemukit import Qemu

SIZE = 1 << 20
STORE: dict[str, bytes] = {}
OPENED: list[tuple[str, bool]] = []


def _memtest(url: str, policy: OpenPolicy,
               writable: bool = False) -> FileObjectHost:
    OPENED.append((url, writable))
    if url not in STORE:
        raise DiskImgError(f"No such object: '{url}'", path=url)
    return FileObjectHost(io.BytesIO(STORE[url]), name=url, writable=False)


@pytest.fixture
def store(qemu: Qemu, tmp_path: Path) -> Iterator[dict[str, bytes]]:
    """memtest://h/d/base.qcow2 and top.qcow2 (backing file ``base.qcow2``), and the
    same chain in tmp_path."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu.io(base, "write -P 0x61 0 256k")
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
             cwd=tmp_path)
    qemu.io(top, "write -P 0x62 64k 4k", f"write -P 0x63 {SIZE - 4096} 4096")
    STORE.clear()
    OPENED.clear()
    STORE["memtest://h/d/base.qcow2"] = base.read_bytes()
    STORE["memtest://h/d/top.qcow2"] = top.read_bytes()
    urls.register("memtest", _memtest)
    yield STORE
    urls._OPENERS.pop("memtest", None)


@pytest.mark.qemu
def test_a_url_opens_through_its_registered_opener_with_its_backing_in_the_store(
        store: dict[str, bytes], qemu: Qemu, tmp_path: Path) -> None:
    want = qemu.raw_bytes(tmp_path / "top.qcow2", "qcow2")
    with diskimg.open("memtest://h/d/top.qcow2") as img:
        assert img.filename == "memtest://h/d/top.qcow2"
        assert img.read(0, SIZE) == want
        assert img.backing is not None and img.backing.filename == "memtest://h/d/base.qcow2"
        assert img.info().full_backing_filename == "memtest://h/d/base.qcow2"
    assert OPENED == [("memtest://h/d/top.qcow2", False), ("memtest://h/d/base.qcow2", False)]


@pytest.mark.qemu
def test_backing_files_elsewhere_only_as_far_as_the_policy_allows(
        store: dict[str, bytes], qemu: Qemu, tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    want = qemu.raw_bytes(top, "qcow2")
    for name, allow, err in (
            ("memtest://other/base.qcow2", "allow_remote_backing", "lies in another store"),
            (str(tmp_path / "base.qcow2"), "allow_local_backing", "opens no local file")):
        qemu.img("rebase", "-u", "-b", name, "-F", "qcow2", top)
        store["memtest://h/d/t2.qcow2"] = top.read_bytes()
        store["memtest://other/base.qcow2"] = store["memtest://h/d/base.qcow2"]
        with pytest.raises(BackingChainError, match=err):
            diskimg.open("memtest://h/d/t2.qcow2")
        with diskimg.open("memtest://h/d/t2.qcow2", policy=OpenPolicy(**{allow: True})) as img:
            assert img.read(0, SIZE) == want


@pytest.mark.qemu
def test_cli_sources_take_urls_and_print_them_with_both_slashes(
        store: dict[str, bytes], qemu: Qemu, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from diskimg.cli.main import main

    url = "memtest://h/d/top.qcow2"
    assert main(["info", "--output=json", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["filename"] == url and info["full-backing-filename"] == \
        "memtest://h/d/base.qcow2"
    assert main(["map", url]) == 0                   # human map: the File column
    files = {line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert files == {url, "memtest://h/d/base.qcow2"}
    assert main(["check", url]) == 0
    assert "No errors were found" in capsys.readouterr().out
    assert main(["compare", url, str(tmp_path / "top.qcow2")]) == 0
    out = tmp_path / "out.raw"
    assert main(["convert", "-O", "raw", url, str(out)]) == 0
    assert out.read_bytes() == qemu.raw_bytes(tmp_path / "top.qcow2", "qcow2")
    assert main(["info", "memtest://h/d/missing.qcow2"]) == 1
    assert "Could not open 'memtest://h/d/missing.qcow2': No such object" in \
        capsys.readouterr().err


def test_http_url_errors_name_the_url_with_both_slashes() -> None:
    """Through the real CLI: whatever opens http (or nothing yet), the URL is printed
    whole (a Path() once folded it into ``http:/127.0.0.1:9/x.qcow2``)."""
    url = "http://127.0.0.1:9/x.qcow2"
    r = subprocess.run([sys.executable, "-m", "diskimg", "info", url], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"Could not open '{url}'" in r.stderr
    assert "http:/1" not in r.stderr and not r.stdout


def test_builtin_schemes_dispatch_to_their_module_or_say_what_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []
    fake = types.ModuleType("diskimg_test_fake_http")

    def open_http(url: str, policy: OpenPolicy,
               writable: bool = False) -> FileObjectHost:
        calls.append((url, writable))
        return FileObjectHost(io.BytesIO(bytes(4096)), name=url)

    fake.open_http = open_http  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "diskimg_test_fake_http", fake)
    monkeypatch.setitem(urls._BUILTIN, "https", ("diskimg_test_fake_http", "open_http"))
    with diskimg.open("https://h/x.img", format="raw") as img:
        assert img.read(0, 4096) == bytes(4096) and img.filename == "https://h/x.img"
    assert calls == [("https://h/x.img", False)]

    monkeypatch.setitem(urls._BUILTIN, "http", ("diskimg_no_such_module", "open_http"))
    with pytest.raises(UnsupportedFeatureError, match="Unsupported protocol 'http' in "
                       "'http://h/x': this diskimg has no HTTP host yet"):
        diskimg.open("http://h/x")
    monkeypatch.setattr(urls, "_find_spec", lambda name: None)
    with pytest.raises(UnsupportedFeatureError, match=r"Unsupported protocol 's3' in "
                       r"'s3://b/k': it needs fsspec; install diskimg\[remote\]"):
        diskimg.open("s3://b/k")
    monkeypatch.setattr(urls, "_find_spec", lambda name: object())
    monkeypatch.setattr(urls, "_FSSPEC", ("diskimg_no_such_module", "open_fsspec"))
    with pytest.raises(UnsupportedFeatureError, match="'gs' in 'gs://b/k': this diskimg "
                       "has no fsspec host yet"):
        diskimg.open("gs://b/k")
    with pytest.raises(UnsupportedFeatureError, match="Unsupported protocol"):
        diskimg.open("file:///etc/passwd")
    # NBD URLs go to the NBD client (tests/nbd/test_client*.py)
    with pytest.raises(RemoteError, match="could not connect: No such file"):
        diskimg.open("NBD+unix:///x?socket=/nonexistent/s")


def test_join_keeps_the_store_and_never_climbs_above_its_root() -> None:
    assert urls.join("memtest://h/d/t.qcow2", "b.qcow2") == "memtest://h/d/b.qcow2"
    assert urls.join("s3://bkt/a/b/t", "../../../../x") == "s3://bkt/x"
    assert urls.join("https://h:8443/t?sig=1#f", "sub/b") == "https://h:8443/sub/b"
    assert urls.is_url("s3://b/k") and not urls.is_url("dir/s3:x") and \
        not urls.is_url("/tmp/a://b")


@pytest.mark.qemu
def test_a_vmdk_delta_finds_its_parent_in_the_store(store: dict[str, bytes], qemu: Qemu,
                                                    tmp_path: Path) -> None:
    base, top = tmp_path / "vbase.vmdk", tmp_path / "vtop.vmdk"
    qemu.img("create", "-q", "-f", "vmdk", base, SIZE)
    qemu.io(base, "write -P 0x71 0 128k", fmt="vmdk")
    qemu.img("create", "-q", "-f", "vmdk", "-b", "vbase.vmdk", "-F", "vmdk", top,
             cwd=tmp_path)
    qemu.io(top, "write -P 0x72 64k 512", fmt="vmdk")
    store["memtest://h/v/vbase.vmdk"] = base.read_bytes()
    store["memtest://h/v/vtop.vmdk"] = top.read_bytes()
    with diskimg.open("memtest://h/v/vtop.vmdk") as img:
        assert img.info().full_backing_filename == "memtest://h/v/vbase.vmdk"
        assert img.read(0, SIZE) == qemu.raw_bytes(top, "vmdk", cwd=tmp_path)
