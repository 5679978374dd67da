"""diskimg amend against qemu-img amend on twin images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from qemukit import QEMU

from .conftest import needs_qemu, qemu
from .lifecycle_helpers import create

pytestmark = [pytest.mark.qemu, needs_qemu]


def build(d: Path) -> None:
    create(d, "am.qcow2", "10M")
    QEMU.io("am.qcow2", "write -P 1 0 64k", "write -z 1M 128k", "write -P 2 3M 64k",
            "write -z 3M 64k", "write -c -P 5 5M 64k", fmt=None, cwd=d)
    create(d, "ov.qcow2", None, "-b", "am.qcow2", "-F", "qcow2")
    QEMU.io("ov.qcow2", "write -z 0 64k", "write -P 3 2M 64k", fmt=None, cwd=d)
    create(d, "v2.qcow2", "10M", "-o", "compat=0.10")
    QEMU.io("v2.qcow2", "write -P 1 0 64k", fmt=None, cwd=d)


# (image, options, byte-identical to qemu's result)
CASES = [
    ("am.qcow2", "compat=0.10", True), ("ov.qcow2", "compat=0.10", True),
    ("v2.qcow2", "compat=1.1", True), ("am.qcow2", "lazy_refcounts=on", True),
    ("am.qcow2", "size=20M", True), ("am.qcow2", "size=4M", False),
    ("am.qcow2", "refcount_bits=1", False), ("am.qcow2", "refcount_bits=64", False),
    ("ov.qcow2", "backing_file=am.qcow2,backing_fmt=qcow2", True),
    ("am.qcow2", "compat=0.10,refcount_bits=8", True), ("am.qcow2", "help", True),
    ("am.qcow2", "cluster_size=4k", True), ("am.qcow2", "extended_l2=on", True),
    ("am.qcow2", "compression_type=zstd", True), ("am.qcow2", "backing_fmt=raw", True),
    ("am.qcow2", "foo=bar", True), ("am.qcow2", "compat=foo", True),
    ("am.qcow2", "refcount_bits=3", True), ("am.qcow2", "data_file=x", True),
    ("am.qcow2", "data_file_raw=on", True), ("v2.qcow2", "lazy_refcounts=on", True),
]


@pytest.mark.parametrize("name,olist,identical", CASES)
def test_amend_matches_qemu(di, twin_dirs: tuple[Path, Path], name: str, olist: str,
                            identical: bool) -> None:
    q, m = twin_dirs
    build(q)
    build(m)
    ref = qemu("amend", "-o", olist, name, cwd=q)
    mine = di("amend", "-o", olist, name, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    QEMU.check_clean(name, cwd=m)
    assert QEMU.compare(q / name, m / name) == 0
    assert QEMU.img("info", name, cwd=q).stdout.split("disk size")[0] == \
        QEMU.img("info", name, cwd=m).stdout.split("disk size")[0]
    if identical:
        assert (q / name).read_bytes() == (m / name).read_bytes()


def test_amend_needs_options(di, tmp_path: Path) -> None:
    build(tmp_path)
    for args in (["amend", "am.qcow2"], ["amend", "-o", "compat=0.10"]):
        mine = di(*args, cwd=tmp_path)
        ref = qemu(*args, cwd=tmp_path)
        assert (mine.rc, mine.err) == (ref.rc, ref.err)


# --- LUKS key slots: encrypt.* amend options, qemu-img's checks and messages ----------------

SECRETS = ["--object", "secret,id=s0,data=pw0", "--object", "secret,id=s1,data=pw1",
           "--object", "secret,id=s2,data=pw2", "--object", "secret,id=bad,data=nope"]


def iopts(name: str, key: str = "s0") -> list[str]:
    return ["--image-opts", f"driver=qcow2,file.filename={name},encrypt.key-secret={key}"]


def qemu_amend(*args: str, cwd: Path):
    """qemu-img amend with every secret (tests/tools/qemu-img retries qemu's PBKDF2 flake)."""
    return qemu("amend", *SECRETS, *args, cwd=cwd)


@pytest.fixture(scope="module")
def luks_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """LUKS qcow2 images with 1, 2, 3 and 8 active slots: slot 0 opens with pw0, the others
    with pw1.  qemu-img makes slots 0 and 1 (its create and amend benchmark PBKDF2 for
    seconds, so only once per module); diskimg's API fills further slots."""
    from diskimg.qcow2.amend import luks_add_key

    d = tmp_path_factory.mktemp("luks")
    QEMU.img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw0", "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "k.qcow2", "1M",
             cwd=d)
    out = {1: (d / "k.qcow2").read_bytes()}
    res = qemu_amend(*iopts("k.qcow2"), "-o",
                     "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10", cwd=d)
    assert res.rc == 0, res.err
    out[2] = (d / "k.qcow2").read_bytes()
    for n in range(3, 9):
        luks_add_key(d / "k.qcow2", b"pw0", b"pw1", iter_time_ms=0)
        out[n] = (d / "k.qcow2").read_bytes()
    return out


def luks_image(templates: dict[int, bytes], d: Path, name: str, slots: int) -> None:
    (d / name).write_bytes(templates[slots])


def active_slots(d: Path, name: str) -> list[bool]:
    info = QEMU.json("info", name, cwd=d)
    return [s["active"] for s in info["format-specific"]["data"]["encrypt"]["slots"]]


ADD = "encrypt.state=active,encrypt.iter-time=10,"
# (slots in the image, extra arguments, -o list); every case runs in both tools
LUKS_CASES = [
    (2, [], ADD + "encrypt.new-secret=s2"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=5"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=1"),
    (2, ["--force"], ADD + "encrypt.new-secret=s2,encrypt.keyslot=1"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=8"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=-1"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=0x10"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.keyslot=x"),
    (2, [], "encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=99999999999999999999"),
    (2, [], "encrypt.state=active,encrypt.keyslot=3"),
    (2, [], ADD + "encrypt.new-secret=s2,encrypt.old-secret=s0"),
    (2, [], "encrypt.state=bogus,encrypt.new-secret=s2"),
    (2, [], "encrypt.new-secret=s2"),
    (2, [], ADD + "encrypt.new-secret=nosuch"),
    (2, [], "encrypt.format=luks"),
    (2, [], "encrypt.key-secret=s0"),
    (8, [], ADD + "encrypt.new-secret=s2"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=1"),
    (2, [], "encrypt.state=inactive,encrypt.old-secret=s1"),
    (3, [], "encrypt.state=inactive,encrypt.old-secret=s1"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=5"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=-2"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=9,encrypt.old-secret=s1"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=0,encrypt.old-secret=s1"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=s1"),
    (2, [], "encrypt.state=inactive,encrypt.old-secret=s2"),
    (2, [], "encrypt.state=inactive,encrypt.old-secret=nosuch"),
    (2, [], "encrypt.state=inactive"),
    (2, [], "encrypt.state=inactive,encrypt.new-secret=s2"),
    (2, [], "encrypt.state=inactive,encrypt.keyslot=1,encrypt.iter-time=5"),
    (1, [], "encrypt.state=inactive,encrypt.keyslot=0"),
    (1, [], "encrypt.state=inactive,encrypt.old-secret=s0"),
    (1, ["--force"], "encrypt.state=inactive,encrypt.keyslot=0"),
    (2, [], "encrypt.state=inactive,encrypt.old-secret=s1,compat=foo"),
]


@pytest.mark.parametrize("nslots,extra,olist", LUKS_CASES,
                         ids=[f"{n}-{'f-' if e else ''}{o}" for n, e, o in LUKS_CASES])
def test_amend_luks_keyslots_match_qemu(di, twin_dirs: tuple[Path, Path],
                                        luks_templates: dict[int, bytes], nslots: int,
                                        extra: list[str], olist: str) -> None:
    q, m = twin_dirs
    luks_image(luks_templates, q, "k.qcow2", nslots)
    luks_image(luks_templates, m, "k.qcow2", nslots)
    args = [*iopts("k.qcow2"), *extra, "-o", olist]
    ref = qemu_amend(*args, cwd=q)
    mine = di("amend", *SECRETS, *args, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert active_slots(m, "k.qcow2") == active_slots(q, "k.qcow2")
    for sid in ("s0", "s1", "s2"):  # the same passwords open (or not) both images
        opens = [subprocess.run(["qemu-img", "info", *SECRETS, *iopts("k.qcow2", sid)],
                                cwd=d, capture_output=True).returncode == 0 for d in (q, m)]
        assert opens[0] == opens[1], sid
    if ref.rc != 0:  # a refused amend leaves the image as it was, byte for byte
        assert (m / "k.qcow2").read_bytes() == (q / "k.qcow2").read_bytes()


@pytest.mark.parametrize("args", [
    ["-o", "encrypt.state=active,encrypt.new-secret=s1", "k.qcow2"],
    [*iopts("k.qcow2", "bad"), "-o", "encrypt.state=active,encrypt.new-secret=s1"],
    [*iopts("k.qcow2", "nosuch"), "-o", "encrypt.state=active,encrypt.new-secret=s1"],
    ["-o", "lazy_refcounts=on", "k.qcow2"],
], ids=["no-key", "wrong-key", "unknown-key", "other-option-no-key"])
def test_amend_luks_open_errors_match_qemu(di, tmp_path: Path, luks_templates: dict[int, bytes],
                                           args: list[str]) -> None:
    luks_image(luks_templates, tmp_path, "k.qcow2", 1)
    before = (tmp_path / "k.qcow2").read_bytes()
    ref = qemu_amend(*args, cwd=tmp_path)
    mine = di("amend", *SECRETS, *args, cwd=tmp_path)
    assert (mine.rc, mine.err) == (ref.rc, ref.err) and ref.rc == 1
    assert "nope" not in mine.err  # the wrong secret is never printed
    assert (tmp_path / "k.qcow2").read_bytes() == before


def test_amend_encrypt_options_on_unencrypted_and_aes(di, tmp_path: Path) -> None:
    QEMU.img("create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=tmp_path)
    QEMU.img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw0", "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", "a.qcow2", "1M", cwd=tmp_path)
    for args in (["-o", "encrypt.state=active,encrypt.new-secret=s1", "p.qcow2"],
                 [*iopts("a.qcow2"), "-o", "encrypt.state=active,encrypt.new-secret=s1"]):
        ref = qemu_amend(*args, cwd=tmp_path)
        mine = di("amend", *SECRETS, *args, cwd=tmp_path)
        assert (mine.rc, mine.err) == (ref.rc, ref.err) and ref.rc == 1


def test_amend_image_opts_for_non_key_options(di, twin_dirs: tuple[Path, Path]) -> None:
    """--image-opts names the file for every amend option, not only encrypt.*."""
    q, m = twin_dirs
    build(q)
    build(m)
    args = ["--image-opts", "driver=qcow2,file.filename=am.qcow2", "-o", "compat=0.10"]
    ref = qemu("amend", *args, cwd=q)
    mine = di("amend", *args, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err) == (0, "", "")
    assert (q / "am.qcow2").read_bytes() == (m / "am.qcow2").read_bytes()


@pytest.mark.parametrize("args", [
    ["commit", "--image-opts", "driver=qcow2,file.filename=ov.qcow2"],
    ["commit", "-d", "--image-opts", "driver=qcow2,file.filename=ov.qcow2"],
    ["commit", "-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=ov.qcow2"],
    ["commit", "--image-opts", "ov.qcow2"],
    ["rebase", "-u", "-b", "", "--image-opts", "driver=qcow2,file.filename=ov.qcow2"],
    ["rebase", "-b", "", "--image-opts", "driver=qcow2,file.filename=ov.qcow2"],
    ["rebase", "-u", "-b", "x", "-F", "qcow2", "--image-opts",
     "driver=raw,file.filename=am.qcow2"],
], ids=["commit", "commit-d", "commit-f", "commit-bad", "rebase-u", "rebase-safe",
        "rebase-raw"])
def test_commit_rebase_image_opts_match_qemu(di, twin_dirs: tuple[Path, Path],
                                             args: list[str]) -> None:
    """qemu-img accepts --image-opts for commit and rebase; same output, exit code and
    resulting images."""
    q, m = twin_dirs
    build(q)
    build(m)
    ref = qemu(*args, cwd=q)
    mine = di(*args, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    for name in ("am.qcow2", "ov.qcow2"):
        assert QEMU.compare(q / name, m / name) == 0
        QEMU.check_clean(name, cwd=m)
    assert QEMU.img("info", "ov.qcow2", cwd=q).stdout.split("disk size")[1].split(
        "\n", 1)[1] == QEMU.img("info", "ov.qcow2", cwd=m).stdout.split(
        "disk size")[1].split("\n", 1)[1]
