"""The per-feature fixture images (fixtures/README.md) read by diskimg exactly as qemu reads
them: every guest byte equal to ``qemu-img convert -O raw``, ``map`` and ``info
--output=json`` equal to qemu-img's, and ``diskimg check`` clean.  The bytes are also pinned
to what fixtures/make_fixtures.sh wrote, so a fixture cannot silently change meaning."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg
from diskimg.cli.main import main

pytestmark = pytest.mark.qemu

K = 1024
SECRET_OBJ = "secret,id=s0,data=fixture-secret"
LUKS_OPTS = "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0"


def _image(size: int, *writes: tuple[int, int, int]) -> bytes:
    """``size`` zero bytes with (offset, length, pattern) writes applied in order."""
    buf = bytearray(size)
    for off, n, pat in writes:
        buf[off : off + n] = bytes([pat]) * n
    return bytes(buf)


# name -> the guest bytes make_fixtures.sh wrote (virtual sizes are not cluster multiples)
EXPECTED = {
    "extl2.qcow2": _image(1051136, (0, 3 * K, 0x11), (500 * K, 10 * K, 0x22),
                          (502 * K, K, 0), (1049088, 2048, 0x33)),
    "compressed-zlib.qcow2": _image(263680, (0, 8 * K, 0x41), (130 * K, 6 * K, 0x42),
                                    (262144, 1536, 0x43), (200 * K, 4 * K, 0x44)),
    "snapshots.qcow2": _image(524800, (0, 8 * K, 0x51), (4 * K, 4 * K, 0x53), (0, K, 0x55),
                              (524288, 512, 0x54)),
    "luks.qcow2": _image(66048, (0, 4 * K, 0x61), (32 * K, 4 * K, 0x62), (65536, 512, 0x63)),
}
EXPECTED["compressed-zstd.qcow2"] = EXPECTED["compressed-zlib.qcow2"]
SNAPSHOTS = {
    "s1": _image(524800, (0, 8 * K, 0x51), (256 * K, 4 * K, 0x52)),
    "s2": _image(524800, (0, 8 * K, 0x51), (4 * K, 4 * K, 0x53), (256 * K, 4 * K, 0x52),
                 (524288, 512, 0x54)),
}
NAMES = sorted(EXPECTED)


def _qemu_source(name: str) -> list[str]:
    """How qemu-img (and diskimg's CLI) name the image: LUKS needs the secret."""
    return ["--object", SECRET_OBJ, "--image-opts", LUKS_OPTS] if name == "luks.qcow2" \
        else [name]


def _open_kw(name: str) -> dict[str, object]:
    return ({"secrets": {"s0": b"fixture-secret"}, "options": {"encrypt.key-secret": "s0"}}
            if name == "luks.qcow2" else {})


@pytest.fixture
def di(capsys: pytest.CaptureFixture[str],
       monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str]]:
    """``diskimg ARGS`` in-process in ``cwd``: (exit code, stdout)."""

    def run(*args: str, cwd: Path) -> tuple[int, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        rc = main(list(args))
        return rc, capsys.readouterr().out

    return run


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reads_maps_and_checks_like_qemu(
        name: str, fixture_file: Callable[[str], Path], qemu: Qemu,
        di: Callable[..., tuple[int, str]]) -> None:
    img = fixture_file(name)
    d = img.parent
    src = _qemu_source(name)
    want = qemu.raw_bytes(src[-1], None, *src[:-1], cwd=d)
    assert want == EXPECTED[name], "the fixture is not what make_fixtures.sh documents"
    with diskimg.open(img, **_open_kw(name)) as dev:  # type: ignore[arg-type]
        assert dev.size == len(want)
        assert dev.read(0, dev.size) == want

    rc, out = di("map", "--output=json", *src, cwd=d)
    assert rc == 0 and json.loads(out) == qemu.json("map", *src, cwd=d)
    rc, out = di("info", "--output=json", name, cwd=d)  # without the key, as qemu-img info
    assert rc == 0 and json.loads(out) == qemu.info(name, cwd=d)
    rc, out = di("check", *src, cwd=d)
    assert rc == 0 and "No errors were found on the image." in out, out
    qemu.check_clean(src[-1], *src[:-1], cwd=d)


@pytest.mark.parametrize("snap", sorted(SNAPSHOTS))
def test_snapshot_fixture_snapshots_read_like_qemu(
        snap: str, fixture_file: Callable[[str], Path], qemu: Qemu,
        di: Callable[..., tuple[int, str]]) -> None:
    img = fixture_file("snapshots.qcow2")
    want = qemu.raw_bytes(img, "qcow2", "-l", f"snapshot.name={snap}")
    assert want == SNAPSHOTS[snap]
    rc, _ = di("convert", "-l", snap, "-O", "raw", img.name, "mine.raw", cwd=img.parent)
    assert rc == 0
    assert (img.parent / "mine.raw").read_bytes() == want
    listed = qemu.info(img)["snapshots"]
    assert [s["name"] for s in listed] == ["s1", "s2"]
