"""``diskimg bench`` against qemu-img 7.2's: the same output (but the time), the same
errors and exit codes, the same bytes written (``qemu-img compare`` of the two images,
``qemu-img check`` clean), the bytes a raw reference built here predicts, the flush
schedule of ``--flush-interval``, and refusals (bad arguments, locks, a request past the
end) that leave the file byte-identical."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg

from .conftest import Result, make_raw, needs_qemu, qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

SIZE = 1 << 20
DATA = [(0, b"\x5a" * 8192), (300 << 10, b"\x01" * 70000), (SIZE - 4096, b"\xee" * 4096)]
TIME = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$", re.M)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.qcow2 (1 MiB, 64k clusters, some data), r.raw (1 MiB sparse, the same data),
    o.qcow2 (an empty overlay of r.raw), v.vmdk (1 MiB, empty) and z.raw (empty)."""
    d = tmp_path_factory.mktemp("bench-templates")
    make_raw(d / "r.raw", SIZE, DATA)
    QEMU.img("convert", "-f", "raw", "-O", "qcow2", d / "r.raw", d / "a.qcow2")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", d / "o.qcow2", cwd=d)
    QEMU.img("create", "-q", "-f", "vmdk", d / "v.vmdk", "1M")
    QEMU.img("create", "-q", "-f", "raw", d / "z.raw", "0")
    return d


IMAGES = {"a.qcow2": "qcow2", "r.raw": "raw", "o.qcow2": "qcow2", "v.vmdk": "vmdk"}


@pytest.fixture
def twins(templates: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two directories with fresh copies of the templates: qemu-img's and diskimg's."""
    out = []
    for name in ("qemu", "diskimg"):
        d = tmp_path / name
        shutil.copytree(templates, d)
        out.append(d)
    return out[0], out[1]


def normalised(r: Result) -> tuple[int, str, str]:
    return r.rc, TIME.sub("Run completed in T seconds.", r.out), r.err


def both(di, twins: tuple[Path, Path], args: list[str]) -> tuple[Result, Result]:
    qd, dd = twins
    ref = qemu("bench", *args, cwd=qd)
    mine = di("bench", *args, cwd=dd)
    return ref, mine


# --- runs: output, and the bytes left behind, equal qemu-img's --------------------------

RUNS = [
    ["-c", "50", "a.qcow2"],
    ["-c", "300", "-s", "3k", "-S", "5k", "-o", "100k", "a.qcow2"],  # wraps at the end
    ["-w", "-c", "400", "-s", "3k", "-S", "7k", "-o", "1000k", "--pattern", "0xa5", "a.qcow2"],
    ["-w", "-c", "40", "-d", "4", "--flush-interval=8", "--pattern=7", "a.qcow2"],
    ["-w", "-c", "40", "-d", "4", "--flush-interval=8", "--no-drain", "-S", "64k",
     "--pattern", "0", "a.qcow2"],
    ["-w", "-c", "20", "-s", "1k", "-S", "0", "--pattern", "011", "a.qcow2"],
    ["-f", "raw", "-w", "-c", "30", "-s", "64k", "-S", "192k", "--pattern", "255", "r.raw"],
    ["-w", "-c", "2", "-s", "512", "--pattern", "3", "r.raw"],  # probed raw: the warning
    ["-w", "-c", "5", "--pattern", "9", "--image-opts", "driver=qcow2,file.filename=a.qcow2"],
    ["-q", "-c", "3", "-t", "none", "-n", "a.qcow2"],
    ["-c", "3", "-t", "off", "-i", "native", "-i", "threads", "a.qcow2"],
    ["-c", "3", "-i", "threads", "-t", "writeback", "-U", "a.qcow2"],
    ["-c", "0", "-d", "0", "a.qcow2"],
    ["-s", "0", "-c", "3", "-o", "1M", "a.qcow2"],
    ["-c", "0", "z.raw"],
    ["-c", "+5", "-d", " 0x10", "--no-drain", "a.qcow2"],
    ["-w", "-c", "2", "-s", "2k", "a.qcow2"],  # the default pattern: zeros over data
    ["-c", "40", "-s", "5k", "-S", "29k", "o.qcow2"],  # through the backing file
    ["-w", "-c", "30", "-s", "5k", "-S", "33k", "--pattern", "0x61", "o.qcow2"],  # COW
    ["-w", "-c", "50", "-s", "3k", "-S", "5k", "--pattern", "0x42", "v.vmdk"],
]


@pytest.mark.parametrize("args", RUNS, ids=lambda a: " ".join(a))
def test_run_matches_qemu(di, templates: Path, twins: tuple[Path, Path],
                          args: list[str]) -> None:
    ref, mine = both(di, twins, args)
    assert normalised(mine) == normalised(ref)
    assert mine.rc == 0 and TIME.search(mine.out), mine
    qd, dd = twins
    changed = [n for n in IMAGES if sha(dd / n) != sha(templates / n)]
    assert len(changed) == ("-w" in args)  # a read bench changes no byte of the file
    for name in changed:  # the bytes qemu-img bench wrote, and a clean image
        fmt = IMAGES[name]
        assert QEMU.compare("-f", fmt, "-F", fmt, qd / name, dd / name, cwd=dd) == 0, name
        if fmt != "raw":
            QEMU.check_clean(dd / name)


# --- errors: the same words and exit codes, nothing changed ---------------------------

ERRORS = [
    ["-c", "abc", "a.qcow2"], ["-c", "-1", "a.qcow2"], ["-c", "2147483648", "a.qcow2"],
    ["-c", "5k", "a.qcow2"], ["-c", "5 ", "a.qcow2"], ["-c", "08", "a.qcow2"],
    ["-c", "", "a.qcow2"], ["-c", "0x", "a.qcow2"],
    ["-s", "abc", "a.qcow2"], ["-s", "2G", "a.qcow2"], ["-s", "-1", "a.qcow2"],
    ["-S", "x", "a.qcow2"], ["-S", "3G", "a.qcow2"],
    ["-d", "abc", "a.qcow2"], ["-d", "2147483648", "a.qcow2"],
    ["--pattern", "300", "-w", "a.qcow2"], ["--pattern=abc", "a.qcow2"],
    ["--flush-interval=4", "a.qcow2"], ["-w", "--flush-interval=4", "a.qcow2"],
    ["-w", "-d", "2", "--flush-interval=1", "a.qcow2"], ["-w", "--flush-interval=x", "a.qcow2"],
    ["-o", "abc", "a.qcow2"], ["-o", "-1", "a.qcow2"], ["-o", "9E", "a.qcow2"],
    ["-t", "foo", "-w", "a.qcow2"], ["-i", "foo", "a.qcow2"],
    ["-n", "-w", "a.qcow2"], ["-i", "native", "-t", "writeback", "a.qcow2"],
    ["-n", "-i", "threads", "-t", "unsafe", "a.qcow2"],
    ["-U", "-w", "a.qcow2"], ["-f", "foo", "-w", "a.qcow2"], ["-f", "vmdk", "-w", "a.qcow2"],
    ["-f", "raw", "--image-opts", "driver=qcow2,file.filename=a.qcow2"],
    ["-x", "a.qcow2"], ["--bogus", "a.qcow2"], ["-T", "none", "a.qcow2"],
    ["a.qcow2", "-c"], ["a.qcow2", "--pattern"], ["-w"], ["a.qcow2", "r.raw"],
    ["-c", "1", "nonexist.qcow2"],
    ["-w", "-o", "2M", "-c", "1", "a.qcow2"],  # a request past the end: after the line
    ["-w", "-o", "1022k", "-c", "1", "--pattern", "1", "a.qcow2"],
    ["-q", "-o", "1022k", "-s", "4k", "-c", "3", "a.qcow2"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a))
def test_error_matches_qemu(di, twins: tuple[Path, Path], args: list[str]) -> None:
    qd, dd = twins
    before = {n: sha(dd / n) for n in ("a.qcow2", "r.raw")}
    ref, mine = both(di, twins, args)
    assert normalised(mine) == normalised(ref)
    assert mine.rc == 1 and mine.err.startswith("diskimg: "), mine
    assert {n: sha(dd / n) for n in before} == before  # a refusal changes nothing


def test_failing_write_bench_writes_nothing(di, twins: tuple[Path, Path]) -> None:
    """Request 342 (offset 1023k) ends past the 1 MiB end: qemu-img writes the 341 before
    it, then fails; diskimg checks every request first and writes nothing."""
    args = ["-w", "-c", "400", "-s", "4k", "-S", "3k", "--pattern", "0x77", "a.qcow2"]
    qd, dd = twins
    before = sha(dd / "a.qcow2")
    ref, mine = both(di, twins, args)
    assert normalised(mine) == normalised(ref)
    assert mine.rc == 1 and mine.err == "diskimg: Failed request: Input/output error\n"
    assert sha(dd / "a.qcow2") == before


@pytest.mark.parametrize(("args", "err"), [
    # qemu-img waits forever for the requests it never submits
    (["-c", "3", "-d", "0", "-w", "a.qcow2"], "diskimg: Invalid queue depth specified\n"),
    # qemu-img crashes (SIGFPE: the offset modulo the size 0)
    (["-c", "1", "-w", "-f", "raw", "z.raw"], "diskimg: Failed request: Input/output error\n"),
    (["-c", "2", "-s", "0", "-S", "1", "-f", "raw", "-w", "z.raw"],
     "diskimg: Failed request: Input/output error\n"),
])
def test_where_qemu_hangs_or_crashes(di, twins: tuple[Path, Path], args: list[str],
                                     err: str) -> None:
    d = twins[1]
    before = {n: sha(d / n) for n in ("a.qcow2", "z.raw")}
    mine = di("bench", *args, cwd=d)
    assert (mine.rc, mine.err) == (1, err)
    assert {n: sha(d / n) for n in before} == before


# --- the bytes a write bench leaves, from a reference built here ------------------------


def expected(base: bytes, count: int, bs: int, step: int, offset: int, pattern: int) -> bytes:
    """qemu-img bench's request offsets (the first as given, then + step modulo the
    size), each request writing ``bs`` pattern bytes."""
    ref = bytearray(base)
    pos = offset
    for _ in range(count):
        ref[pos : pos + bs] = bytes([pattern]) * bs
        pos = (pos + step) % len(ref)
    return bytes(ref)


def test_write_bench_bytes(di, templates: Path, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    shutil.copyfile(templates / "a.qcow2", img)
    args = ["-w", "-c", "300", "-s", "2k", "-S", "9k", "-o", "700k", "--pattern", "0xa5",
            "-d", "8", "--flush-interval", "16"]
    res = di("bench", *args, "a.qcow2", cwd=tmp_path)
    assert res.rc == 0 and res.err == ""
    assert res.out.splitlines()[:2] == [
        "Sending 300 write requests, 2048 bytes each, 8 in parallel (starting at offset "
        "716800, step size 9216)", "Sending flush every 16 requests"]
    base = (templates / "r.raw").read_bytes()
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected(base, 300, 2048, 9216, 700 << 10, 0xA5))
    assert ref.read_bytes() != base
    QEMU.check_clean(img)
    assert QEMU.compare("-f", "qcow2", "-F", "raw", img, ref) == 0
    assert QEMU.raw_bytes(img, "qcow2") == ref.read_bytes()
    # the first request, the first one past the wrap (request 37: (700k + 36*9k) mod 1M
    # = 0), the first one past the second wrap (request 151: 114*9k mod 1M = 2k), and
    # data no request touched
    QEMU.io(img, "read -P 0xa5 716800 2048", "read -P 0xa5 0 2048", "read -P 0xa5 2048 2048",
            "read -P 0x5a 6144 2048", "read -P 0x01 310272 2048", read_only=True)


def test_api_result_and_bytes(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    diskimg.create(img, "qcow2", SIZE)
    res = diskimg.bench(img, write=True, count=50, buffer_size=4096, step=8192,
                        offset=4096, pattern=0x3C, depth=5, flush_interval=10)
    assert (res.requests, res.write, res.buffer_size, res.depth, res.offset, res.step,
            res.flush_interval, res.flushes) == (50, True, 4096, 5, 4096, 8192, 10, 5)
    assert res.seconds >= 0
    QEMU.check_clean(img)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected(bytes(SIZE), 50, 4096, 8192, 4096, 0x3C))
    assert QEMU.compare("-f", "qcow2", "-F", "raw", img, ref) == 0
    before = sha(img)
    read = diskimg.bench(img, count=200, buffer_size=1000, step=3333)  # a read bench
    assert (read.requests, read.write, read.step, read.flushes) == (200, False, 3333, 0)
    assert sha(img) == before


# --- the flush schedule ---------------------------------------------------------------


@pytest.mark.parametrize(("count", "depth", "interval", "drain", "trace"), [
    # drained: a flush once the requests not yet submitted are a multiple of the interval
    # and the queue is empty (the numbers of flushes here are the fdatasync calls
    # ``strace -f qemu-img bench -f raw -w`` shows for the same arguments)
    (10, 2, 4, True, "WW F WWWW F WWWW F"),
    (10, 3, 3, True, "WWWW F WWW F WWW F"),
    (12, 1, 5, True, "WW F WWWWW F WWWWW F"),
    (7, 7, 7, True, "WWWWWWW F"),
    (10, 1, 0, True, "WWWWWWWWWW"),
    # --no-drain: the flush at every completion where it is due
    (10, 2, 4, False, "W F WWWW F WWWW F W F"),
])
def test_flush_schedule(tmp_path: Path, count: int, depth: int, interval: int, drain: bool,
                        trace: str) -> None:
    img = tmp_path / "r.raw"
    diskimg.create(img, "raw", SIZE)
    events: list[str] = []
    with diskimg.open(img, "r+", "raw") as dev:
        write, flush = dev.write, dev.flush
        dev.write = lambda off, buf: (events.append("W"), write(off, buf))[1]  # type: ignore[method-assign]
        dev.flush = lambda: (events.append(" F "), flush())[1]  # type: ignore[method-assign]
        res = diskimg.bench(dev, write=True, count=count, depth=depth,
                            flush_interval=interval, drain=drain, pattern=1)
    assert "".join(events).strip().replace("  ", " ") == trace
    assert res.flushes == trace.count("F")
    assert img.read_bytes() == b"\x01" * (count * 4096) + bytes(SIZE - count * 4096)


# --- locks and API refusals --------------------------------------------------------------


@pytest.mark.parametrize("args", [["-w", "-c", "3"], ["-c", "3"], ["-c", "3", "-U"]])
def test_locked_image(di, twins: tuple[Path, Path], args: list[str]) -> None:
    qd, dd = twins
    # both images held read-write (QEMU's lock bytes), as by a running VM
    with diskimg.open(qd / "a.qcow2", "r+", "qcow2"), \
            diskimg.open(dd / "a.qcow2", "r+", "qcow2"):
        before = sha(dd / "a.qcow2")
        ref, mine = both(di, twins, [*args, "a.qcow2"])
        assert normalised(mine) == normalised(ref)
        assert sha(dd / "a.qcow2") == before
    assert mine.rc == (0 if "-U" in args else 1)
    if mine.rc:
        assert "Is another process using the image [a.qcow2]?" in mine.err


def test_api_refusals_change_nothing(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    diskimg.create(img, "qcow2", SIZE)
    before = sha(img)
    cases = [dict(flush_interval=4), dict(write=True, flush_interval=4),
             dict(write=True, pattern=256), dict(write=True, count=-1),
             dict(write=True, force_share=True), dict(write=True, count=3, depth=0)]
    for kw in cases:
        with pytest.raises(diskimg.UsageError):
            diskimg.bench(img, **kw)  # type: ignore[arg-type]
    with pytest.raises(diskimg.DiskImgError, match="Failed request") as e:
        diskimg.bench(img, write=True, count=2, offset=SIZE - 2048)
    assert e.value.field == "offset"
    with diskimg.open(img, "r", "qcow2") as dev, pytest.raises(diskimg.UsageError):
        diskimg.bench(dev, write=True, count=1)
    assert sha(img) == before


def test_first_failing_request_is_found_as_a_loop_finds_it() -> None:
    """The pre-check (no loop when no request can fail, one period at most otherwise)
    against every request made in turn, on a small exhaustive grid."""
    from diskimg.ops.bench import first_failing

    def brute(count: int, offset: int, step: int, size: int, length: int) -> int | None:
        pos = offset
        for _ in range(count):
            if pos + length > size:
                return pos
            pos = (pos + step) % size if size else pos + step
        return None

    for size in range(7):
        for step in range(8):
            for length in range(8):
                for offset in range(9):
                    for count in (0, 1, 2, 3, 7, 15):
                        assert first_failing(count, offset, step, size, length) == \
                            brute(count, offset, step, size, length), \
                            (count, offset, step, size, length)


def test_encrypted_write_bench(di, fixture_file, tmp_path: Path) -> None:
    """``--object`` (which qemu-img 7.2's bench lacks) with an image key: the data is
    encrypted as qemu reads it, the data the run did not touch is kept, and the image
    checks clean.  luks.qcow2: 64 KiB + 512, 0x61 at [0, 4K), 0x62 at [32K, 36K)."""
    img = fixture_file("luks.qcow2")
    sec = "secret,id=s0,data=fixture-secret"
    spec = "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0"
    before = sha(img)
    res = di("bench", "-w", "-c", "10", "luks.qcow2", cwd=tmp_path)  # no key: refused
    assert (res.rc, res.err) == (1, "diskimg: Could not open 'luks.qcow2': Parameter "
                                    "'encrypt.key-secret' is required for cipher\n")
    assert sha(img) == before
    res = di("bench", "-w", "-c", "3", "-s", "2k", "-S", "8k", "-o", "2k", "--pattern",
             "0x33", "--object", sec, "--image-opts", spec, cwd=tmp_path)
    assert res.rc == 0 and res.err == ""
    QEMU.io(spec, "read -P 0x61 0 2048", "read -P 0x33 2048 2048", "read -P 0 4096 6144",
            "read -P 0x33 10240 2048", "read -P 0 12288 6144", "read -P 0x33 18432 2048",
            "read -P 0 20480 12288", "read -P 0x62 32768 4096", image_opts=True,
            objects=[sec], cwd=tmp_path)
    QEMU.check_clean(spec, "--object", sec, "--image-opts", cwd=tmp_path)
