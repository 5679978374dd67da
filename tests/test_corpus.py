"""Third-party sample and malformed images (``../shared/corpus``, see its README.md).

For every file: ``diskimg.open`` (auto-probing) either succeeds or raises a
:class:`DiskImgError` -- never another exception, never a hang.  raw/qcow2 inputs must open
with qemu-img 7.2's format and virtual size (taken from the corpus README's table); formats
diskimg does not implement must be refused with an error naming the format.

The corpus lives beside the repository (CI clones the repo next to a copy of ``shared/``);
the whole module is skipped when it is absent.
"""

from __future__ import annotations

import bz2
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.errors import DiskImgError

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
TIMEOUT_S = 30

if not CORPUS.is_dir():
    pytest.skip(f"corpus not found at {CORPUS}", allow_module_level=True)

# Formats diskimg does not implement; qemu-img's name for each, as diskimg must report it.
FOREIGN = {"vpc", "vhdx", "bochs", "parallels", "dmg", "cloop"}

# What qemu-img 7.2 says each file is (the README's `info` column): name -> (format, size|None)
_ROW = re.compile(r"^\| (\S+) \| (\d+) \| .*? \| (exit \d[^|]*) \|", re.M)
_INFO_OK = re.compile(r"exit 0, \**(\w+)\**, (?:virtual size )?(\d+)")


def _readme_table() -> dict[str, tuple[str | None, int | None, int]]:
    out: dict[str, tuple[str | None, int | None, int]] = {}
    for name, size, info in _ROW.findall((CORPUS / "README.md").read_text()):
        m = _INFO_OK.match(info)
        out[name] = (m.group(1), int(m.group(2)), int(size)) if m else (None, None, int(size))
    return out


TABLE = _readme_table()

# Files qemu fails to open, and vmdk files: what diskimg must do.  qemu's format guess for
# the files it refuses, from the README's description column.
QEMU_REFUSES = {
    "qemu-iotests/afl5.img.bz2": "vpc",  # malformed VHD
    "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2": "vhdx",
    "qemu-iotests/afl9.vmdk.bz2": "vmdk",  # malformed: "L1 size too big"
    "libvmdk/descriptor_file.1": "vmdk",  # stand-alone monolithicSparse descriptor
}



# Known gaps, reported to the owner of probe.py.  strict: delete the entry once fixed.
KNOWN_GAPS = {
}


def _all_files() -> list[str]:
    return sorted(
        str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
        if p.is_file() and p.name != "README.md"
    )


def _params() -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n]))
        if n in KNOWN_GAPS else n
        for n in _all_files()
    ]


def test_readme_table_lists_every_corpus_file() -> None:
    assert sorted(TABLE) == _all_files()


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"diskimg took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _materialise(name: str, tmp_path: Path) -> Path:
    """A writable copy of the corpus file; .bz2 streamed to a sparse file (up to 270 MB)."""
    src = CORPUS / name
    if not name.endswith(".bz2"):
        dst = tmp_path / src.name
        shutil.copyfile(src, dst)
        return dst
    dst = tmp_path / src.name.removesuffix(".bz2")
    chunk = 1 << 20
    zero = bytes(chunk)
    with bz2.open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            if block == zero[: len(block)]:
                fout.seek(len(block), 1)  # keep zero runs as holes
            else:
                fout.write(block)
        fout.truncate()
    return dst


def _exercise(img: diskimg.BlockDevice) -> None:
    """Touch the whole read surface: first/last sector, map, info."""
    img.read(0, min(512, img.size))
    if img.size >= 512:
        img.read(img.size - 512, 512)
    for n, _ in enumerate(img.map()):
        if n > 10_000:
            break
    img.info()


@pytest.mark.parametrize("name", _params())
def test_corpus_file(name: str, tmp_path: Path) -> None:
    qfmt, qsize, file_size = TABLE[name]
    path = _materialise(name, tmp_path)
    assert path.stat().st_size == file_size
    outcome: BaseException | None = None
    fmt = size = None
    with _time_limit(TIMEOUT_S):
        try:
            with diskimg.open(path) as img:
                fmt, size = img.format, img.size
                _exercise(img)
        except Exception as e:  # classified below
            outcome = e
    if outcome is not None and not isinstance(outcome, DiskImgError):
        raise AssertionError(f"{name}: not a DiskImgError") from outcome
    msg = str(outcome) if outcome else ""
    if outcome is not None:
        assert msg.strip(), "an error must say what is wrong"
        assert len(msg.splitlines()) <= 2, msg

    expected = QEMU_REFUSES.get(name, qfmt)
    if expected in FOREIGN:
        assert outcome is not None, f"{name}: a {expected} image was opened as {fmt}"
        assert expected in msg, msg
    elif expected == "vmdk":
        if name in QEMU_REFUSES:
            assert outcome is not None, f"{name}: qemu-img refuses this file"
        else:
            assert outcome is None, msg
            assert (fmt, size) == ("vmdk", qsize)
    else:
        assert expected in ("raw", "qcow2"), expected
        assert outcome is None, f"{name}: qemu-img opens this as {expected}: {msg}"
        assert (fmt, size) == (expected, qsize)


_CONVERTIBLE = [n for n in _all_files()
                if TABLE[n][0] in ("raw", "qcow2", "vmdk") and n not in QEMU_REFUSES]


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img absent")
@pytest.mark.parametrize("name", _CONVERTIBLE)
def test_corpus_convert_to_raw_matches_qemu(name: str, tmp_path: Path) -> None:
    """``diskimg convert -O raw`` of every file qemu-img opens gives the same guest bytes
    (qemu-img compare, which reads holes as zeros) and exactly the virtual size."""
    path = _materialise(name, tmp_path)
    out = tmp_path / "out.raw"
    with _time_limit(TIMEOUT_S):
        diskimg.convert(path, out, "raw")
    assert out.stat().st_size == TABLE[name][1]
    fmt = TABLE[name][0]
    cmp = QEMU.img("compare", "-f", fmt, "-F", "raw", path, out, ok=None)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
