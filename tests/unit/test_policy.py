"""Which files an image may make diskimg open: the safety rules of CONTRACT.md
("Files an image names")."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import diskimg
from diskimg.errors import BackingChainError
from diskimg.policy import OpenPolicy


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    (img_dir / "sub").mkdir()
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"host secret")
    top = img_dir / "top.qcow2"
    top.write_bytes(b"")
    (img_dir / "base.raw").write_bytes(bytes(512))
    (img_dir / "sub" / "deep.raw").write_bytes(bytes(512))
    return {"dir": img_dir, "top": top, "outside": outside}


@pytest.mark.parametrize(
    "name",
    ['json:{"file.filename":"/etc/passwd"}', "nbd://127.0.0.1:10809/x", "nbd:localhost:10809",
     "http://example.com/disk", "https://example.com/disk", "ssh://host/disk",
     "iscsi://host/iqn/0", "rbd:pool/img", "gluster://h/v/i", "host_device:/dev/sda"],
)
def test_json_and_protocol_names_are_never_followed(tree, name: str) -> None:
    for pol in (OpenPolicy(), OpenPolicy(untrusted=True).for_top(tree["top"])):
        with pytest.raises(BackingChainError) as ei:
            pol.resolve(name, tree["top"])
        msg = str(ei.value)
        assert name in msg and str(tree["top"]) in msg


def test_relative_names_resolve_next_to_the_naming_image(tree) -> None:
    pol = OpenPolicy()
    assert pol.resolve("base.raw", tree["top"]) == tree["dir"] / "base.raw"
    assert pol.resolve("sub/deep.raw", tree["top"]) == tree["dir"] / "sub" / "deep.raw"
    assert pol.resolve("file:base.raw", tree["top"]) == tree["dir"] / "base.raw"


def test_trusted_mode_follows_absolute_and_parent_paths_like_qemu(tree) -> None:
    pol = OpenPolicy()
    assert pol.resolve(str(tree["outside"]), tree["top"]) == tree["outside"]
    assert pol.resolve("../secret.raw", tree["top"]).resolve() == tree["outside"]


@pytest.mark.parametrize("name", ["../secret.raw", "ABS", "sub/../../secret.raw",
                                  "link-out.raw"])
def test_untrusted_confines_to_the_image_directory(tree, name: str) -> None:
    (tree["dir"] / "link-out.raw").symlink_to(tree["outside"])  # symlinks don't escape
    if name == "ABS":
        name = str(tree["outside"])
    pol = OpenPolicy(untrusted=True).for_top(tree["top"])
    with pytest.raises(BackingChainError) as ei:
        pol.resolve(name, tree["top"])
    assert name in str(ei.value)
    assert "outside the allowed directories" in str(ei.value)


def test_untrusted_allows_files_inside_and_explicit_directories(tree, tmp_path: Path) -> None:
    pol = OpenPolicy(untrusted=True).for_top(tree["top"])
    assert pol.resolve("sub/deep.raw", tree["top"]) == tree["dir"] / "sub" / "deep.raw"
    explicit = OpenPolicy(untrusted=True, allowed_dirs=[tmp_path.resolve()])
    assert explicit.resolve("../secret.raw", tree["top"]).resolve() == tree["outside"]


def test_missing_backing_file_names_the_file_and_the_image(tree) -> None:
    with pytest.raises(BackingChainError) as ei:
        OpenPolicy().resolve("gone.qcow2", tree["top"])
    msg = str(ei.value)
    assert "gone.qcow2" in msg and "No such file or directory" in msg and "top.qcow2" in msg


def test_fifo_directory_and_char_device_are_refused(tree) -> None:
    os.mkfifo(tree["dir"] / "fifo")
    pol = OpenPolicy()
    for name in ("fifo", "sub", "/dev/zero", "/dev/null"):
        with pytest.raises(BackingChainError, match="not a regular file"):
            pol.resolve(name, tree["top"])


def test_untrusted_open_of_a_qcow2_with_an_outside_backing_file(tmp_path: Path, make_image,
                                                                run, qemu_img: str) -> None:
    pytest.importorskip("diskimg.qcow2.image", reason="qcow2 image support not built yet")
    base = make_image("base.raw", "raw", "1M")
    top_dir = tmp_path / "upload"
    top_dir.mkdir()
    top = top_dir / "user.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top])
    with diskimg.open(top) as img:  # trusted: followed, as qemu-img does
        assert img.backing is not None
    with pytest.raises(BackingChainError) as ei:
        diskimg.open(top, untrusted=True)
    assert str(base) in str(ei.value)


def _block_device(tmp_path: Path) -> Path:
    """A block-device node that is never opened: one made with mknod in ``tmp_path`` (loop
    device 7:0), else any block device under /dev."""
    import stat

    node = tmp_path / "blockdev"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
        return node
    except OSError:
        pass
    for cand in sorted(Path("/dev").iterdir()):
        try:
            if stat.S_ISBLK(cand.stat().st_mode):
                return cand
        except OSError:
            continue
    pytest.skip("no block device node available (mknod not permitted, none in /dev)")


def test_block_devices_are_never_followed_with_or_without_untrusted(tree, tmp_path) -> None:
    """Issue 15 bug 12: a block device named as a backing file was followed unless
    --untrusted; CONTRACT.md ("Files an image names") and the docs say never."""
    dev = _block_device(tmp_path)
    link = tree["dir"] / "disk-link"   # inside the image's directory: only the type decides
    link.symlink_to(dev)
    for name in (str(dev), "disk-link"):
        for pol in (OpenPolicy(), OpenPolicy(untrusted=True,
                                             allowed_dirs=[tmp_path.resolve(),
                                                           dev.resolve().parent])):
            for what in ("backing file", "data file", "vmdk extent"):
                with pytest.raises(BackingChainError) as ei:
                    pol.resolve(name, tree["top"], what)
                msg = str(ei.value)
                assert f"Refusing to open {what} '{name}' named by '{tree['top']}'" in msg
                assert "not a regular file (a block device)" in msg


def test_qcow2_naming_a_block_device_does_not_open(tmp_path: Path) -> None:
    pytest.importorskip("diskimg.qcow2.image", reason="qcow2 image support not built yet")
    import hashlib

    dev = _block_device(tmp_path)
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", 1 << 20, backing_file=str(dev), backing_fmt="raw",
                   unsafe=True)
    before = hashlib.sha256(top.read_bytes()).hexdigest()
    for mode in ("r", "r+"):
        with pytest.raises(BackingChainError, match="not a regular file"):
            diskimg.open(top, mode)
    with diskimg.open(top, "r", backing=False) as img:   # the image itself is fine
        assert img.read(0, 4096) == bytes(4096)
    assert hashlib.sha256(top.read_bytes()).hexdigest() == before


def test_a_backing_file_that_is_a_device_when_opened_is_refused(tmp_path: Path,
                                                                monkeypatch) -> None:
    """The check is repeated on the file actually opened: a name that passed the policy and
    was then swapped for a device (simulated: a policy that lets everything through) is
    refused before any format code reads it."""
    pytest.importorskip("diskimg.qcow2.image", reason="qcow2 image support not built yet")
    dev = _block_device(tmp_path)
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", 1 << 20, backing_file=str(dev), backing_fmt="raw",
                   unsafe=True)
    monkeypatch.setattr(OpenPolicy, "resolve", lambda self, name, parent, what="": Path(name))
    with pytest.raises(BackingChainError, match="not a regular file"):
        diskimg.open(top)


def test_backing_symlink_loop_is_the_images_fault(tmp_path: Path) -> None:
    """A backing name that is a symlink loop ended in an internal RuntimeError from
    Path.resolve(); it is a BackingChainError in qemu's words (ELOOP)."""
    import errno

    (tmp_path / "b").symlink_to("a")
    (tmp_path / "a").symlink_to("b")
    top = tmp_path / "top.qcow2"
    with pytest.raises(BackingChainError) as e:
        OpenPolicy().for_top(top).resolve("a", top)
    assert e.value.reason == os.strerror(errno.ELOOP)


_NAME_CHARS = st.sampled_from("aZz09+.-:/_ é\x00")


@given(name=st.text(_NAME_CHARS, max_size=12) | st.sampled_from(
    ["file:x", "json:{}", "nbd://h/e", "HTTPS://h", "a+b.c-d:x", "1a:x", "+a:x", ":x",
     "é:x", "a é:x", "/abs:x", "C:\\x", "s3://b/k", "x"]))
def test_protocol_is_rfc3986_scheme_prefix(name: str) -> None:
    """``hostio.names.protocol`` (no regex: start-up) answers as the grammar it replaced,
    ``^[A-Za-z][A-Za-z0-9+.-]*:``, and ``urls.is_url``/``scheme`` as ``...://``; a
    wrong answer would follow a protocol name as a file (or refuse a file name)."""
    import re

    from diskimg.hostio.urls import is_url, scheme
    from diskimg.hostio.names import protocol

    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", name)
    assert protocol(name) == (m.group(1) if m else None)
    u = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", name)
    assert is_url(name) is (u is not None)
    assert scheme(name) == (u.group(1).lower() if u else "")


def _pathlib_resolve(pol: OpenPolicy, name: str, parent: Path) -> tuple[str, str]:
    """The oracle: what ``resolve`` answered when it was written with pathlib (a local
    parent): ("ok", path) or ("refused"/"missing"/"loop"/"other", "")."""
    if name.startswith("json:") or (re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name)
                                    and not name.startswith("file:")):
        return "refused", ""
    if name.startswith("file:"):
        name = name[5:]
    p = Path(name)
    if not p.is_absolute():
        p = parent.parent / p
    try:
        real = p.resolve()
    except (RuntimeError, OSError):
        return "loop", ""
    if pol.untrusted and not any(real.is_relative_to(d) for d in pol.allowed_dirs):
        return "refused", ""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return "missing", ""
    except OSError:
        return "other", ""
    return ("ok", str(p)) if stat.S_ISREG(st.st_mode) else ("refused", "")


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with files, a subdirectory, a link out of it, a link loop, a FIFO and a
    sibling directory whose name has the tree's as a prefix."""
    root = tmp_path_factory.mktemp("links")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"a")
    (root / "d" / "sub" / "b").write_bytes(b"b")
    (root / "out").write_bytes(b"o")
    (root / "dd").mkdir()                        # a sibling whose name begins with "d"
    (root / "dd" / "c").write_bytes(b"c")
    (root / "d" / "up").symlink_to(root / "out")
    (root / "d" / "loop").symlink_to(root / "d" / "loop2")
    (root / "d" / "loop2").symlink_to(root / "d" / "loop")
    os.mkfifo(root / "d" / "fifo")
    return root


@given(parts=st.lists(st.sampled_from(["a", "b", "sub", ".", "..", "", "up", "loop",
                                        "fifo", "nope", "d", "dd", "c"]), min_size=1,
                    max_size=5),
       lead=st.sampled_from(["", "/", "file:", "json:", "nbd:"]),
       untrusted=st.booleans(), parent=st.sampled_from(["d/top", "d/sub/top", "d//./top"]))
@example(parts=["..", "dd", "c"], lead="", untrusted=True, parent="d/top")
@example(parts=["..", "d", "loop"], lead="", untrusted=True, parent="d/top")
@example(parts=["up"], lead="", untrusted=True, parent="d/sub/top")
@example(parts=["sub", "..", "a"], lead="file:", untrusted=False, parent="d//./top")
def test_resolve_name_answers_as_the_pathlib_rules(links: Path, parts: list[str], lead: str,
                                                   untrusted: bool, parent: str) -> None:
    """``resolve_name`` (no pathlib: an overlay opens without it) resolves, refuses and
    fails on exactly the names the pathlib version did, to the same path, for names with
    ``.``, ``..``, repeated slashes, links out of the tree, link loops and a FIFO, in a
    trusted and an --untrusted policy."""
    name = lead + "/".join(parts)
    if lead == "/":
        name = str(links) + name
    top = links / parent
    pol = OpenPolicy(untrusted=True).for_top(top) if untrusted else OpenPolicy()
    want = _pathlib_resolve(pol, name, Path(top))
    try:
        got = ("ok", pol.resolve_name(name, str(top), local=True))
    except BackingChainError as e:
        msg = str(e)
        got = ("loop" if "symbolic links" in msg else "missing" if "No such file" in msg
               else "refused" if "Refusing" in msg else "other", "")
    assert got == want
    if got[0] == "ok":
        assert pol.resolve(name, top) == Path(got[1])
