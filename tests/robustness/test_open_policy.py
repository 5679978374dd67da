"""The open policy for files an image names (CONTRACT.md "Files an image names",
MALICIOUS-INPUTS.md Q17-Q19, §1 rules 5 and 6).

Every refusal must be a DiskImgError naming the refused file, and no file outside what the
policy allows may be opened: each test records the paths diskimg passes to ``os.open`` /
``open`` (the only ways it opens host files) and checks them, and checks that no file
descriptor is left open after a refusal.  Read-only commands (info, check, map, convert
source, compare) are checked not to change the image's bytes or mtime.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import robustlib

import diskimg
from diskimg.cli.main import main as cli_main
from diskimg.errors import BackingChainError, DiskImgError

pytestmark = pytest.mark.qemu

PASSWD = "/etc/passwd"


# --- helpers ------------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_opens() -> Iterator[list[str]]:
    """Record the real path of every file opened through os.open / open / io.open."""
    seen: list[str] = []
    real_os_open, real_open, real_io_open = os.open, builtins.open, io.open

    def note(p: Any) -> None:
        if isinstance(p, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(os.fsdecode(p)))

    def os_open(path: Any, *a: Any, **k: Any) -> int:
        note(path)
        return real_os_open(path, *a, **k)

    def b_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    os.open = os_open  # type: ignore[assignment]
    builtins.open = b_open  # type: ignore[assignment]
    io.open = b_open  # type: ignore[assignment]
    try:
        yield seen
    finally:
        os.open = real_os_open  # type: ignore[assignment]
        builtins.open = real_open  # type: ignore[assignment]
        io.open = real_io_open  # type: ignore[assignment]


def open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def boom(*_: object) -> None:
        raise TimeoutError(f"took more than {seconds} s (blocked or hanging)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def overlay(d: Path, backing_name: str, fmt: str = "raw", name: str = "top.qcow2") -> Path:
    """A qcow2 whose backing file name is ``backing_name`` (not opened when creating)."""
    p = d / name
    diskimg.create(p, "qcow2", 1 << 20, backing_file=backing_name, backing_fmt=fmt,
                   unsafe=True)
    return p


def refused(fn: Callable[[], Any], names: list[str], allowed: set[str],
            forbidden: list[str]) -> DiskImgError:
    """``fn`` raises a DiskImgError mentioning every one of ``names``; only ``allowed``
    files were opened (and none of ``forbidden``); no descriptor is left open."""
    before = open_fds()
    with recorded_opens() as seen, time_limit(5), pytest.raises(DiskImgError) as ei:
        fn()
    msg = str(ei.value)
    for n in names:
        assert n in msg, f"error does not name {n!r}: {msg}"
    bad = [p for p in seen if p not in allowed]
    assert not bad, f"opened outside the policy: {bad} (message: {msg})"
    for f in forbidden:
        assert os.path.realpath(f) not in seen, f"{f} was opened"
    assert not open_fds() - before, "file descriptors leaked by the refused open"
    return ei.value


def real(*ps: Path | str) -> set[str]:
    return {os.path.realpath(p) for p in ps}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(args))
    return rc, out.getvalue(), err.getvalue()


# --- protocol and json: names -------------------------------------------------------------
PROTOCOL_NAMES = [
    'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
    "json:{\"file.filename\":\"/etc/passwd\"}",
    "nbd:localhost:10809",
    "nbd+unix:///export?socket=/tmp/nbd.sock",
    "http://127.0.0.1:1/disk.img",
    "ssh://root@127.0.0.1/etc/passwd",
]


@pytest.mark.parametrize("untrusted", [False, True])
@pytest.mark.parametrize("name", PROTOCOL_NAMES)
def test_protocol_and_json_backing_names_are_never_followed(name: str, untrusted: bool,
                                                            tmp_path: Path) -> None:
    top = overlay(tmp_path, name)
    refused(lambda: diskimg.open(top, untrusted=untrusted), [name], real(top), [PASSWD])


# --- absolute paths and escapes -------------------------------------------------------------
def test_absolute_backing_is_followed_by_default_like_qemu(tmp_path: Path) -> None:
    top = overlay(tmp_path, PASSWD)
    with recorded_opens() as seen, diskimg.open(top) as d:
        assert d.read(0, 5) == Path(PASSWD).read_bytes()[:5]
    assert os.path.realpath(PASSWD) in seen


def test_absolute_backing_is_refused_when_untrusted(tmp_path: Path) -> None:
    top = overlay(tmp_path, PASSWD)
    refused(lambda: diskimg.open(top, untrusted=True), [PASSWD], real(top), [PASSWD])
    pol = diskimg.OpenPolicy(untrusted=True, allowed_dirs=[tmp_path])
    refused(lambda: diskimg.open(top, policy=pol), [PASSWD], real(top), [PASSWD])


@pytest.mark.parametrize("name", ["../outside.raw", "sub/../../outside.raw",
                                  "link-to-outside.raw", "file:../outside.raw"])
def test_escapes_from_the_image_directory(name: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"O" * 4096)
    d = tmp_path / "upload"
    (d / "sub").mkdir(parents=True)
    (d / "link-to-outside.raw").symlink_to(outside)
    top = overlay(d, name)
    # trusted (qemu-img semantics): relative to the image's directory, followed
    with diskimg.open(top) as img:
        assert img.read(0, 1) == b"O"
    refused(lambda: diskimg.open(top, untrusted=True), [name.removeprefix("file:")],
            real(top), [outside])
    # an explicit policy listing the parent directory allows it
    pol = diskimg.OpenPolicy(untrusted=True, allowed_dirs=[tmp_path.resolve()])
    with diskimg.open(top, policy=pol) as img:
        assert img.read(0, 1) == b"O"


def test_untrusted_allows_backing_in_the_same_directory(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * 4096)
    top = overlay(tmp_path, "base.raw")
    with recorded_opens() as seen, diskimg.open(top, untrusted=True) as img:
        assert img.read(0, 1) == b"B"
    assert set(seen) <= real(top, base)


# --- special files --------------------------------------------------------------------------
@pytest.mark.parametrize("untrusted", [False, True])
@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero", "dev-null", "socket"])
def test_special_files_are_never_opened_as_backing(kind: str, untrusted: bool,
                                                   tmp_path: Path) -> None:
    import socket

    s: socket.socket | None = None
    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
        name = "fifo"
    elif kind == "directory":
        target = tmp_path / "adir"
        target.mkdir()
        name = "adir"
    elif kind == "socket":
        target = tmp_path / "sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        name = "sock"
    else:
        target = Path("/dev/zero" if kind == "dev-zero" else "/dev/null")
        name = str(target)
    top = overlay(tmp_path, name)
    try:
        refused(lambda: diskimg.open(top, untrusted=untrusted), [name], real(top),
                [str(target)])
    finally:
        if s is not None:
            s.close()


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
def test_special_files_are_refused_as_the_image_itself(kind: str, tmp_path: Path) -> None:
    """Opening a FIFO must not block waiting for a writer, a directory or a character
    device is not an image (MALICIOUS-INPUTS G4, rule 5)."""
    if kind == "fifo":
        p = tmp_path / "fifo"
        os.mkfifo(p)
    elif kind == "directory":
        p = tmp_path
    else:
        p = Path("/dev/zero")
    before = open_fds()
    with time_limit(5), pytest.raises(DiskImgError) as ei:
        diskimg.open(p)
    assert str(p) in str(ei.value)
    assert not open_fds() - before
    rc, _, err = cli("info", str(p))
    assert rc == 1 and err.startswith("diskimg: ") and len(err.splitlines()) <= 2


# --- loops and depth --------------------------------------------------------------------
def test_self_loop(tmp_path: Path) -> None:
    top = overlay(tmp_path, "top.qcow2", fmt="qcow2")
    e = refused(lambda: diskimg.open(top), ["top.qcow2"], real(top), [])
    assert isinstance(e, BackingChainError) and "loop" in str(e).lower()


def test_two_image_loop(tmp_path: Path) -> None:
    a = overlay(tmp_path, "b.qcow2", fmt="qcow2", name="a.qcow2")
    b = overlay(tmp_path, "a.qcow2", fmt="qcow2", name="b.qcow2")
    e = refused(lambda: diskimg.open(a), ["a.qcow2"], real(a, b), [])
    assert isinstance(e, BackingChainError) and "loop" in str(e).lower()
    # the same file reached through a symlink is the same file
    (tmp_path / "alias.qcow2").symlink_to(a)
    c = overlay(tmp_path, "alias.qcow2", fmt="qcow2", name="c.qcow2")
    with pytest.raises(BackingChainError, match=r"(?i)loop"):
        diskimg.open(c)


def test_300_deep_chain_errors_quickly(tmp_path: Path) -> None:
    n = 300
    prev = tmp_path / "c0.qcow2"
    diskimg.create(prev, "qcow2", 65536)
    for i in range(1, n + 1):
        cur = tmp_path / f"c{i}.qcow2"
        diskimg.create(cur, "qcow2", 65536, backing_file=prev.name, backing_fmt="qcow2",
                       unsafe=True)
        prev = cur
    before = open_fds()
    t0 = time.monotonic()
    with time_limit(10), pytest.raises(BackingChainError) as ei:
        diskimg.open(prev)
    took = time.monotonic() - t0
    assert took < 2.0, f"refusing a {n}-deep chain took {took:.1f} s"
    assert "deeper" in str(ei.value), ei.value
    assert not open_fds() - before, "descriptors of the chain leaked"
    t0 = time.monotonic()
    rc, _, err = cli("info", "--backing-chain", str(prev))
    assert rc == 1 and len(err.splitlines()) <= 2 and time.monotonic() - t0 < 2.0, err


# --- recorded backing formats ---------------------------------------------------------------
def test_raw_backing_is_not_probed_into_a_qcow2_naming_a_host_file(tmp_path: Path) -> None:
    """A file recorded as raw stays raw even when its bytes are a qcow2 header naming
    /etc/passwd (CVE-2024-4467 / CVE-2026-24708 class): nothing outside gets opened."""
    inner = tmp_path / "disk.raw"
    diskimg.create(inner, "qcow2", 1 << 20, backing_file=PASSWD, backing_fmt="raw",
                   unsafe=True)
    top = overlay(tmp_path, "disk.raw", fmt="raw")
    with recorded_opens() as seen, diskimg.open(top) as d:
        assert d.backing is not None and d.backing.format == "raw"
        assert d.read(0, 4) == b"QFI\xfb"  # the raw bytes, not the passwd contents
    assert set(seen) <= real(top, inner)


# --- external data files --------------------------------------------------------------------
def data_file_image(d: Path, name: str) -> Path:
    """qcow2 with an external data file (qemu-img create -o data_file=...), then the name in
    the data-file header extension (0x44415441) patched to ``name``."""
    assert robustlib.QEMU_IMG
    p = d / "df.qcow2"
    subprocess.run([robustlib.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                    "data_file=df.data", p.name, "1M"], cwd=d, check=True,
                   capture_output=True)
    raw = bytearray(p.read_bytes())
    off = raw.find(struct.pack(">I", 0x44415441), 104, 65536)
    assert off > 0
    old_len = struct.unpack_from(">I", raw, off + 4)[0]
    new = name.encode()
    ext = struct.pack(">II", 0x44415441, len(new)) + new + bytes(-len(new) % 8)
    old = 8 + old_len + (-old_len % 8)
    cs = 1 << struct.unpack_from(">I", raw, 20)[0]
    head = bytearray(raw[:cs])
    head[off : off + old] = ext  # later extensions move with it; cluster 0 is re-padded
    p.write_bytes(bytes(head[:cs]).ljust(cs, b"\0") + bytes(raw[cs:]))
    return p


@pytest.mark.parametrize("name", [PASSWD, "../outside.data", "/dev/zero",
                                  'json:{"driver":"file","filename":"/etc/passwd"}'])
def test_data_file_naming_a_host_file_is_refused_when_untrusted(name: str,
                                                                tmp_path: Path) -> None:
    d = tmp_path / "upload"
    d.mkdir()
    (tmp_path / "outside.data").write_bytes(bytes(1 << 20))
    p = data_file_image(d, name)
    forbidden = [PASSWD, str(tmp_path / "outside.data")]
    refused(lambda: diskimg.open(p, untrusted=True), [name], real(p), forbidden)
    rc, _out, err = cli("--untrusted", "convert", "-O", "raw", str(p), str(d / "o.raw"))
    assert rc == 1 and name in err and len(err.splitlines()) <= 2, err


def test_data_file_in_the_same_directory_is_allowed_when_untrusted(tmp_path: Path) -> None:
    p = data_file_image(tmp_path, "df.data")
    with recorded_opens() as seen, diskimg.open(p, untrusted=True) as d:
        assert d.read(0, 512) == bytes(512)
    assert set(seen) <= real(p, tmp_path / "df.data")


# --- the CLI --------------------------------------------------------------------------------
def test_cli_untrusted_convert_refuses_and_copies_nothing(tmp_path: Path) -> None:
    top = overlay(tmp_path, PASSWD)
    out = tmp_path / "out.raw"
    with recorded_opens() as seen:
        rc, _, err = cli("--untrusted", "convert", "-O", "raw", str(top), str(out))
    assert rc == 1 and PASSWD in err and len(err.splitlines()) <= 2, err
    assert os.path.realpath(PASSWD) not in seen
    if out.exists():
        assert Path(PASSWD).read_bytes()[:16] not in out.read_bytes()


def test_cli_untrusted_info_does_not_open_the_backing_file(tmp_path: Path) -> None:
    top = overlay(tmp_path, PASSWD)
    with recorded_opens() as seen:
        rc, _out, err = cli("--untrusted", "info", "--output=json", str(top))
    assert os.path.realpath(PASSWD) not in seen
    assert rc == 0 or (rc == 1 and PASSWD in err), err


def test_info_works_when_the_backing_file_is_missing(tmp_path: Path) -> None:
    top = overlay(tmp_path, "missing.qcow2", fmt="qcow2")
    rc, _out, err = cli("info", "--output=json", str(top))
    assert rc == 0, err


# --- read-only commands never write ---------------------------------------------------------
def fingerprint(p: Path) -> tuple[str, int]:
    return hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns


@pytest.fixture
def ro_images(tmp_path: Path) -> dict[str, Path]:
    assert robustlib.QEMU_IMG and robustlib.QEMU_IO
    q, io_ = robustlib.QEMU_IMG, robustlib.QEMU_IO

    def run(*a: str) -> None:
        subprocess.run(list(a), cwd=tmp_path, check=True, capture_output=True)

    run(q, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "v3.qcow2", "2M")
    run(io_, "-c", "write -P 0x11 0 100k", "-c", "write -z 1M 64k", "v3.qcow2")
    run(q, "snapshot", "-c", "s1", "v3.qcow2")
    run(q, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "2M")
    run(io_, "-c", "write -P 0x22 0 64k", "dirty.qcow2")
    d = tmp_path / "dirty.qcow2"
    with d.open("r+b") as f:  # dirty bit (incompatible bit 0): as left by a crash
        f.seek(72)
        feat = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", feat | 1))
    run(q, "create", "-q", "-f", "qcow2", "corrupt.qcow2", "1M")
    run(io_, "-c", "write -P 0x33 0 64k", "corrupt.qcow2")
    c = tmp_path / "corrupt.qcow2"
    with c.open("r+b") as f:  # corrupt bit plus a leaked refcount
        f.seek(72)
        feat = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", feat | 2))
    run(q, "create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "overlay.qcow2")
    (tmp_path / "disk.raw").write_bytes(b"\x44" * 65536 + bytes(65536))
    run(q, "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
        "disk.raw", "stream.vmdk")
    run(q, "convert", "-q", "-f", "raw", "-O", "vmdk", "disk.raw", "sparse.vmdk")
    return {p.name: p for p in tmp_path.iterdir()}


RO_COMMANDS: list[list[str]] = [
    ["info", "{}"], ["info", "--output=json", "--backing-chain", "{}"],
    ["check", "{}"], ["check", "--output=json", "{}"],
    ["map", "{}"], ["map", "--output=json", "{}"],
    ["convert", "-O", "raw", "{}", "{out}"], ["convert", "-O", "qcow2", "-c", "{}", "{out}"],
    ["compare", "{}", "{other}"], ["snapshot", "-l", "{}"], ["measure", "-O", "qcow2", "{}"],
]


@pytest.mark.parametrize("image", ["v3.qcow2", "dirty.qcow2", "corrupt.qcow2",
                                   "overlay.qcow2", "disk.raw", "stream.vmdk", "sparse.vmdk"])
def test_read_only_commands_never_write(image: str, ro_images: dict[str, Path],
                                        tmp_path: Path) -> None:
    p = ro_images[image]
    watched = [q for q in ro_images.values() if q.suffix in (".qcow2", ".raw", ".vmdk")]
    before = {q: fingerprint(q) for q in watched}
    other = ro_images["v3.qcow2"] if image != "v3.qcow2" else ro_images["disk.raw"]
    results = []
    for cmd in RO_COMMANDS:
        if image.endswith((".raw", ".vmdk")) and cmd[0] == "snapshot":
            continue
        out = tmp_path / "ro-out.img"
        argv = [a.format(str(p), out=str(out), other=str(other)) for a in cmd]
        rc, _, err = cli(*argv)
        results.append((argv[0], rc))
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        after = {q: fingerprint(q) for q in watched}
        changed = [str(q.name) for q in watched if after[q] != before[q]]
        assert not changed, f"'diskimg {' '.join(argv)}' (exit {rc}) changed {changed}"
    # and the API's read-only paths
    with diskimg.open(p) as d:
        d.info()
        d.read(0, d.size)
        list(d.map())
        if d.supports_check:  # declared (raw has no checker)
            d.check()
    assert {q: fingerprint(q) for q in watched} == before
    assert results
