"""Image options, backing format names and metadata-only opens as qemu-img 7.2 has them
(issue 17 item 7).  Every case runs qemu-img and diskimg on identical copies of the same
files: the same exit code, stdout and stderr (program name substituted), and the same
bytes in every file afterwards.

- ``--image-opts`` options qemu takes and that change nothing diskimg reads or writes
  (caches, host I/O knobs, node names, ``backing.driver`` ...) are accepted; an option
  qemu does not know, or a value it refuses, is refused in qemu's words;
- ``info`` opens the image without its backing file, so ``backing.*`` options are unknown
  to it, and opens it for metadata only: a key secret that is missing or wrong is not
  tried;
- ``file``, ``host_device`` and ``host_cdrom`` are backing format names.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

import diskimg
from diskimg.cli.main import main
from tests.cli.conftest import Result
from tests.cli.conftest import qemu as qemu_img

pytestmark = pytest.mark.qemu

SECRET = ["--object", "secret,id=s0,data=pw"]
WRONG = ["--object", "secret,id=s0,data=wrong"]



def diskimg_cli(*args: str, cwd: Path) -> Result:
    """``diskimg ARGS`` in-process in ``cwd``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        rc = main(list(args))
    return Result(rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.qcow2 (data at 0 and 256K) under top.qcow2 (data at 64K), and an encrypted
    qcow2 and luks volume (made by diskimg: qemu-img's LUKS create can fail its PBKDF
    timing on a loaded host)."""
    d = tmp_path_factory.mktemp("opts")
    QEMU.img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
    QEMU.io(d / "base.qcow2", "write -P 1 0 64k", "write -P 2 256k 128k", fmt="qcow2")
    QEMU.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             d / "top.qcow2", cwd=d)
    QEMU.io(d / "top.qcow2", "write -P 3 64k 64k", fmt="qcow2")
    diskimg.create(d / "enc.qcow2", "qcow2", 1 << 20, secrets={"s0": b"pw"},
                   options={"encrypt.format": "luks", "encrypt.key-secret": "s0",
                            "encrypt.iter-time": 10})
    diskimg.create(d / "enc.luks", "luks", 1 << 20, secrets={"s0": b"pw"},
                   options={"key-secret": "s0", "iter-time": 10})
    (d / "sub").mkdir()
    return d


@pytest.fixture
def twins(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of the template: one for qemu-img, one for diskimg."""
    q, m = tmp_path / "qemu", tmp_path / "diskimg"
    shutil.copytree(template, q)
    shutil.copytree(template, m)
    return q, m


def files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def same(twins: tuple[Path, Path], *args: str) -> Result:
    """Run ``args`` with both tools; assert the same rc, output and files; qemu's result."""
    q, m = twins
    ref = qemu_img(*args, cwd=q)
    mine = diskimg_cli(*args, cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err)
    assert files(m) == files(q)
    return ref


TOP = "driver=qcow2,file.filename=top.qcow2"

# options qemu takes that change nothing diskimg reads or writes: the caches, host I/O,
# node names (commit opens the image read-write; before, diskimg refused them all)
HARMLESS = ["cache.direct=on,cache.no-flush=on,node-name=n1,auto-read-only=on",
            "l2-cache-entry-size=4096,l2-cache-size=1M,refcount-cache-size=1M,"
            "cache-clean-interval=10", "cache-size=2M,l2-cache-size=1M",
            "overlap-check=all,overlap-check.active-l2=off", "read-only=off",
            "file.locking=off,file.aio=threads,file.driver=file,file.cache.direct=on,"
            "cache.direct=on,file.aio=native"]

# refused by qemu-img, each with its own reason
REFUSED = ["bogus=1", "file.bogus=1", "backing=null", "backing.driver=qcow2",
           "cache.direct=maybe", "l2-cache-size=abc",
           "cache-clean-interval=x", "l2-cache-entry-size=128k",
           "cache-size=1M,l2-cache-size=2M",
           "cache-size=3M,l2-cache-size=1M,refcount-cache-size=1M",
           "file.locking=maybe", "file.aio=native", "discard=foo",
           "overlap-check=foo", "force-share=on,read-only=off", "detect-zeroes=unmap"]


@pytest.mark.parametrize("opt", HARMLESS)
def test_commit_takes_harmless_options(twins: tuple[Path, Path],
                                       opt: str) -> None:
    ref = same(twins, "commit", "--image-opts", f"{TOP},{opt}")
    assert (ref.rc, ref.out) == (0, "Image committed.\n")


@pytest.mark.parametrize("opt", REFUSED)
def test_info_refuses_like_qemu(twins: tuple[Path, Path], opt: str) -> None:
    ref = same(twins, "info", "--image-opts", f"{TOP},{opt}")
    assert ref.rc == 1


@pytest.mark.parametrize("opt", ["discard=unmap", "detect-zeroes=on", "lazy-refcounts=on"])
def test_write_only_options_refused_for_writing(twins: tuple[Path, Path],
                                                opt: str) -> None:
    """qemu acts on these when it writes; diskimg does not, so it refuses them by name
    (and takes them for a read-only open, where they change nothing)."""
    _, m = twins
    before = files(m)
    mine = diskimg_cli("commit", "--image-opts", f"{TOP},{opt}", cwd=m)
    key = opt.split("=")[0]
    assert (mine.rc, mine.out) == (1, "")
    assert mine.err == (f"diskimg: Could not open '{TOP},{opt}': Block format 'qcow2' "
                        f"option '{key}' is not supported by diskimg for writing\n")
    assert files(m) == before
    same(twins, "info", "--image-opts", f"{TOP},{opt}")


@pytest.mark.parametrize("opt", ["backing.driver=qcow2", "backing.encrypt.key-secret=s0"])
def test_info_backing_chain_refuses_backing_options(twins: tuple[Path, Path],
                                                    opt: str) -> None:
    """qemu-img info opens every image of the chain without its backing file."""
    ref = same(twins, "info", "--backing-chain", "--image-opts", f"{TOP},{opt}")
    assert ref.rc == 1 and f"'{opt.split('=')[0]}'" in ref.err


def test_commit_takes_backing_and_cache_options(twins: tuple[Path, Path]) -> None:
    """``backing.driver`` and ``backing.file.filename`` naming the backing file, and the
    caches, for commit: the same committed bytes as qemu-img's."""
    ref = same(twins, "commit", "--image-opts",
               f"{TOP},backing.driver=qcow2,backing.file.filename=base.qcow2,"
               "cache.direct=on,l2-cache-size=1M,file.locking=on,backing.cache.no-flush=on")
    assert ref.rc == 0 and ref.out == "Image committed.\n"


@pytest.mark.parametrize("opt", ["bogus=1", "backing.bogus=1", "backing.file.bogus=1",
                                 "file.aio=foo", "read-only=on", "backing=null"])
def test_commit_refuses_like_qemu(twins: tuple[Path, Path], opt: str) -> None:
    ref = same(twins, "commit", "--image-opts", f"{TOP},{opt}")
    assert ref.rc == 1


def test_backing_driver_sets_the_backing_format(twins: tuple[Path, Path]) -> None:
    """``backing.driver=raw`` reads the qcow2 backing file as raw bytes, as qemu does."""
    for out in ("human", "json"):
        ref = same(twins, "map", f"--output={out}", "--image-opts",
                   f"{TOP},backing.driver=raw")
        assert ref.rc == 0
    ref = same(twins, "compare", "--image-opts", f"{TOP},backing.driver=raw",
               "driver=qcow2,file.filename=top.qcow2")
    assert ref.rc == 1


def test_rebase_unsafe_refuses_backing_options(twins: tuple[Path, Path]) -> None:
    """rebase -u opens the image without its backing file."""
    ref = same(twins, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "--image-opts",
               f"{TOP},backing.driver=qcow2")
    assert ref.rc == 1


JSON_TOP = '"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}'


@pytest.mark.parametrize("argv", [
    ["info", 'json:{%s, "cache": {"direct": true}, "l2-cache-size": 1048576}' % JSON_TOP],
    ["info", "--output=json", 'json:{%s, "encrypt.key-secret": "s0"}' % JSON_TOP],
    ["info", 'json:{%s, "bogus": 1}' % JSON_TOP], ["info", 'json:[1]'],
    ["info", 'json:{"driver": "qcow2", "file": "top.qcow2"}'],
    ["map", 'json:{%s, "backing": {"driver": "raw"}}' % JSON_TOP],
    ["info", "--image-opts", "driver=file,filename=base.qcow2"],
    ["info", "--image-opts", "driver=file,filename=base.qcow2,offset=1"],
    ["commit", 'json:{%s, "backing": {"driver": "qcow2"}, "cache": {"no-flush": true}}'
     % JSON_TOP],
], ids=["info", "info-key", "bogus", "not-object", "node", "map-backing-raw", "file",
        "file-offset", "commit"])
def test_json_names(twins: tuple[Path, Path], argv: list[str]) -> None:
    """A ``json:{...}`` image name takes the options ``--image-opts`` takes."""
    ref = same(twins, *argv)
    assert ref.rc == (1 if argv[-1].count("bogus") or "[1]" in argv[-1]
                      or '"file": "' in argv[-1] or "offset" in argv[-1] else 0)


@pytest.mark.parametrize("depth", [5000, 900])
def test_json_name_nested_too_deep(twins: tuple[Path, Path], depth: int) -> None:
    """Hostile nesting ends in an error naming the JSON, never an internal error."""
    _, m = twins
    name = "json:" + '{"a":' * depth + "1" + "}" * depth
    r = diskimg_cli("info", name, cwd=m)
    assert r.rc == 1 and r.out == ""
    assert r.err.startswith(f"diskimg: Could not open '{name}': ")
    assert "internal error" not in r.err and "Traceback" not in r.err


# --- info opens for metadata only ---------------------------------------------------------

ENC_QCOW2 = "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"


@pytest.mark.parametrize("spec,objs", [
    (ENC_QCOW2, []), (ENC_QCOW2, WRONG),
    ("driver=luks,file.filename=enc.luks,key-secret=s0", []),
    ("driver=luks,file.filename=enc.luks,key-secret=s0", WRONG),
    ("driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0", [])],
    ids=["qcow2-none", "qcow2-wrong", "luks-none", "luks-wrong", "plain-none"])
def test_info_needs_no_key(twins: tuple[Path, Path], spec: str,
                           objs: list[str]) -> None:
    """info opens for metadata only; every other command still needs the secret."""
    for out in ("human", "json"):
        ref = same(twins, "info", f"--output={out}", *objs, "--image-opts", spec)
        assert ref.rc == 0 and "json:{" in ref.out
    ref = same(twins, "map", *objs, "--image-opts", spec)
    assert ref.rc == (0 if "top" in spec else 1)


# --- backing format names -----------------------------------------------------------------

@pytest.mark.parametrize("fmt,unsafe", [("host_device", ["-u"]), ("host_cdrom", ["-u"]),
                                        ("file", ["-u"]), ("host_device", []), ("file", [])],
                         ids=["host_device-unsafe", "host_cdrom-unsafe", "file-unsafe",
                              "host_device-safe", "file-safe"])
def test_rebase_protocol_backing_format(twins: tuple[Path, Path], fmt: str,
                                        unsafe: list[str]) -> None:
    """A safe rebase onto a file of the current chain reads it as the chain has it open,
    whatever -F names (qemu); the header stores -F as given."""
    ref = same(twins, "rebase", *unsafe, "-F", fmt, "-b", "base.qcow2", "top.qcow2")
    assert ref.rc == 0
    if unsafe:  # (the safe rebase leaves the same header: the same files were compared)
        for argv in (["map", "--output=json", "top.qcow2"], ["info", "--backing-chain",
                                                             "top.qcow2"]):
            same(twins, *argv)


@pytest.mark.parametrize("fmt", ["host_device", "file"])
@pytest.mark.parametrize("unsafe", [True, False])
def test_create_protocol_backing_format(twins: tuple[Path, Path], fmt: str,
                                        unsafe: bool) -> None:
    args = ["create", "-f", "qcow2", "-F", fmt, "-b", "base.qcow2", "new.qcow2"]
    ref = same(twins, *args, *(["-u", "1M"] if unsafe else []))
    assert ref.rc == (1 if fmt == "host_device" and not unsafe else 0)
    if ref.rc == 0:
        same(twins, "info", "--backing-chain", "new.qcow2")


# --- backing names as written, and the file: protocol prefix --------------------------------

@pytest.mark.parametrize("image,backing", [("new.qcow2", "./base.qcow2"),
                                           ("sub/new.qcow2", "./../base.qcow2"),
                                           ("./new.qcow2", "././base.qcow2")])
def test_backing_names_shown_as_written(twins: tuple[Path, Path], image: str,
                                        backing: str) -> None:
    """``./base`` stays ``./base`` in ``backing file:`` and in the chain's image names,
    and the actual path is the name beside the image as written (``sub/../base``)."""
    ref = same(twins, "create", "-f", "qcow2", "-F", "qcow2", "-b", backing, image)
    assert ref.rc == 0
    for argv in (["info"], ["info", "--backing-chain", "--output=json"]):
        ref = same(twins, *argv, image)
        assert ref.rc == 0 and backing in ref.out


def test_absolute_backing_name_with_dot_and_colon(twins: tuple[Path, Path]) -> None:
    """QEMU's ``TEST_DIR/./image:base``: stored, printed and opened as written."""
    q, m = twins
    for d in twins:
        shutil.copy(d / "base.qcow2", d / "image:base")
    outs = []
    for d, run in ((q, qemu_img), (m, diskimg_cli)):
        res = [run("create", "-f", "qcow2", "-F", "qcow2", "-b", f"{d}/./image:base",
                   "new.qcow2", cwd=d)]
        res += [run(*argv, cwd=d) for argv in (
            ["info", "new.qcow2"], ["info", "--backing-chain", "--output=json", "new.qcow2"],
            ["map", "--output=json", "new.qcow2"], ["info", "file:image:base"],
            ["map", "file:image:base"])]
        outs.append([(r.rc, r.out.replace(str(d), "TEST_DIR"), r.err) for r in res])
    assert outs[1] == outs[0]
    assert "backing file: TEST_DIR/./image:base\n" in outs[0][1][1]


@pytest.mark.parametrize("argv", [
    ["info", "--output=json", "file:top.qcow2"], ["map", "file:top.qcow2"],
    ["info", "file:nope.qcow2"], ["compare", "file:top.qcow2", "top.qcow2"],
    ["create", "-f", "qcow2", "file:new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-F", "qcow2", "-b", "file:base.qcow2", "new.qcow2"],
    ["convert", "-O", "qcow2", "file:top.qcow2", "file:out.qcow2"],
    ["convert", "-O", "qcow2", "file:nope.qcow2", "file:out.qcow2"],
], ids=lambda a: "-".join(a))
def test_file_protocol_prefix(twins: tuple[Path, Path], argv: list[str]) -> None:
    ref = same(twins, *argv)
    assert ref.rc == (1 if "file:nope.qcow2" in argv else 0)
    if argv[0] == "create" and "-b" in argv:  # the name is stored as given
        for info in (["info", "new.qcow2"], ["map", "new.qcow2"]):
            assert "file:base.qcow2" in same(twins, *info).out or info[0] == "map"


# --- amend --force on an inactive LUKS key slot -------------------------------------------

KEYS = ["--object", "secret,id=s0,data=pw"]
AMEND = {"qcow2": ("driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0", "encrypt."),
         "luks": ("driver=luks,file.filename=enc.luks,key-secret=s0", "")}


def _changed_range(a: bytes, b: bytes) -> tuple[int, int]:
    diff = [i for i in range(0, len(a), 512) if a[i:i + 512] != b[i:i + 512]]
    return (diff[0], diff[-1] + 512) if diff else (0, 0)


@pytest.mark.parametrize("kind", ["qcow2", "luks"])
def test_amend_force_erases_an_inactive_slot(twins: tuple[Path, Path],
                                             kind: str) -> None:
    """qemu skips its "already erased" check with --force and erases the slot again: the
    headers stay equal, only that slot's key material is overwritten (with random bytes),
    and the image still opens with its secret."""
    q, m = twins
    spec, pre = AMEND[kind]
    name = f"enc.{kind}"
    before = (q / name).read_bytes()
    ref = qemu_img("amend", *KEYS, "--force", "--image-opts", spec, "-o",
                   f"{pre}state=inactive,{pre}keyslot=3", cwd=q)
    mine = diskimg_cli("amend", *KEYS, "--force", "--image-opts", spec, "-o",
              f"{pre}state=inactive,{pre}keyslot=3", cwd=m)
    assert (mine.rc, mine.out, mine.err) == (ref.rc, ref.out, ref.err) == (0, "", "")
    qb, mb = (q / name).read_bytes(), (m / name).read_bytes()
    lo, hi = _changed_range(before, qb)
    assert 0 < hi - lo <= 256 * 1024  # one slot's key material, nothing else
    assert _changed_range(before, mb) == (lo, hi)
    assert qb[:lo] == mb[:lo] and qb[hi:] == mb[hi:]
    for d in (q, m):
        info = QEMU.json("info", d / name)
        data = info["format-specific"]["data"]
        slots = data.get("encrypt", data)["slots"]
        assert [s["active"] for s in slots] == [True] + [False] * 7
    # both unlock with s0, and the guest content is the same
    r = qemu_img("compare", *KEYS, "--image-opts", spec.replace(name, str(q / name)),
                 spec.replace(name, str(m / name)), cwd=q)
    assert (r.rc, r.out) == (0, "Images are identical.\n"), r.err


def test_amend_keyslot_checks_old_secret_first(twins: tuple[Path, Path]) -> None:
    """An inactive slot with ``old-secret``: qemu tries the secret before the state."""
    spec, pre = AMEND["luks"]
    for force in ([], ["--force"]):
        ref = same(twins, "amend", *KEYS, *force, "--image-opts", spec, "-o",
                   f"{pre}state=inactive,{pre}keyslot=3,{pre}old-secret=s0")
        assert ref.rc == 1 and "doesn't contain the given old password" in ref.err
