"""commit and rebase of encrypted qcow2 overlays (LUKS and legacy AES) through
``--object secret,... --image-opts driver=qcow2,file.filename=X,encrypt.key-secret=ID``,
with ``backing.encrypt.key-secret=ID`` for an encrypted backing file, as qemu-img 7.2.

Images are made by qemu-img/qemu-io; diskimg commits or rebases them; qemu-img then
compares the result with the original chain (with the secrets) and checks it, and the
encrypted files are scanned for the plaintext pattern the guest wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from qemukit import QEMU

from tests.cli.conftest import needs_qemu, qemu

pytestmark = [needs_qemu, pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing")]

SECRET_OBJECTS = ["secret,id=s,data=pw-one", "secret,id=t,data=pw-two"]
SECRETS = [a for o in SECRET_OBJECTS for a in ("--object", o)]
PATTERN = 0x5A  # what the guest writes into the encrypted overlay
PLAIN_RUN = bytes([PATTERN]) * 512


def _create(cwd: Path, name: str, enc: str | None, key: str = "s",
            backing: str | None = None) -> None:
    o = f"encrypt.format={enc},encrypt.key-secret={key}" if enc else "compat=1.1"
    if enc == "luks":
        o += ",encrypt.iter-time=10"
    args = ["create", "-q", "-f", "qcow2", *SECRETS, "-o", o]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    r = qemu(*args, name, "4M", cwd=cwd)
    assert r.rc == 0, r.err


def _opts(name: str, key: str | None, backing_key: str | None = None) -> str:
    s = f"driver=qcow2,file.filename={name}"
    if key:
        s += f",encrypt.key-secret={key}"
    if backing_key:
        s += f",backing.encrypt.key-secret={backing_key}"
    return s


def _write(cwd: Path, name: str, key: str | None, backing_key: str | None,
           pattern: int, off: str, length: str) -> None:
    res = QEMU.io(_opts(name, key, backing_key), f"write -P {pattern:#x} {off} {length}",
                  image_opts=True, objects=SECRET_OBJECTS, cwd=cwd, timeout=60)
    assert "error" not in res.stdout.lower(), res.stdout + res.stderr


def _chain(tmp_path: Path, enc: str, base_enc: str | None, base_key: str = "t") -> Path:
    """base.qcow2 (pattern 0x11 in its first MiB, encrypted with ``base_key`` when
    ``base_enc``) under top.qcow2 (encrypted with ``s``, pattern 0x5a over 512K..1.5M);
    copies of both are kept as *0.qcow2."""
    _create(tmp_path, "base.qcow2", base_enc, base_key)
    _write(tmp_path, "base.qcow2", base_key if base_enc else None, None, 0x11, "0", "1M")
    _create(tmp_path, "top.qcow2", enc, "s", backing="base.qcow2")
    _write(tmp_path, "top.qcow2", "s", base_key if base_enc else None, PATTERN, "512K", "1M")
    _write(tmp_path, "top.qcow2", "s", base_key if base_enc else None, 0, "3M", "64K")
    for n in ("base", "top"):
        shutil.copy(tmp_path / f"{n}.qcow2", tmp_path / f"{n}0.qcow2")
    return tmp_path


def _assert_no_plaintext(path: Path) -> None:
    assert PLAIN_RUN not in path.read_bytes(), f"plaintext of the guest data in {path.name}"


def _compare(cwd: Path, a: str, b: str) -> None:
    r = qemu("compare", *SECRETS, "--image-opts", a, b, cwd=cwd)
    assert (r.rc, r.out) == (0, "Images are identical.\n"), r.out + r.err


def _check(cwd: Path, opts: str) -> None:
    r = qemu("check", *SECRETS, "--image-opts", opts, cwd=cwd)
    assert r.rc == 0 and "No errors were found" in r.out, r.out + r.err


@pytest.mark.parametrize("enc", ["luks", "aes"])
@pytest.mark.parametrize(("base_enc", "base_key"), [(None, "t"), ("luks", "t"),
                                                    ("luks", "s"), ("aes", "t")])
def test_commit_encrypted_overlay(di, tmp_path: Path, enc: str, base_enc: str | None,
                                  base_key: str) -> None:
    d = _chain(tmp_path, enc, base_enc, base_key)
    bkey = base_key if base_enc else None
    r = di("commit", *SECRETS, "--image-opts", _opts("top.qcow2", "s", bkey), cwd=d)
    assert (r.rc, r.out, r.err) == (0, "Image committed.\n", "")
    # the base now shows what the whole chain showed, and the emptied top still does
    _compare(d, _opts("top0.qcow2", "s", bkey), _opts("base.qcow2", bkey))
    _compare(d, _opts("top0.qcow2", "s", bkey), _opts("top.qcow2", "s", bkey))
    _check(d, _opts("base.qcow2", bkey))
    _check(d, _opts("top.qcow2", "s", bkey))
    _assert_no_plaintext(d / "top.qcow2")
    if base_enc:
        _assert_no_plaintext(d / "base.qcow2")
    # qemu-img commit of the same chain gives the same guest view of the base
    shutil.copy(d / "top0.qcow2", d / "qtop.qcow2")
    shutil.move(d / "base.qcow2", d / "dbase.qcow2")
    shutil.copy(d / "base0.qcow2", d / "base.qcow2")
    q = qemu("commit", *SECRETS, "--image-opts", _opts("qtop.qcow2", "s", bkey), cwd=d)
    assert q.rc == 0, q.err
    _compare(d, _opts("base.qcow2", bkey), _opts("dbase.qcow2", bkey))


@pytest.mark.parametrize("enc", ["luks", "aes"])
def test_rebase_encrypted_overlay_flatten(di, tmp_path: Path, enc: str) -> None:
    d = _chain(tmp_path, enc, "luks", "t")
    r = di("rebase", *SECRETS, "--image-opts", _opts("top.qcow2", "s", "t"), "-b", "",
           cwd=d)
    assert (r.rc, r.err) == (0, "")
    info = qemu("info", "--output=json", "top.qcow2", cwd=d).json
    assert isinstance(info, dict) and "backing-filename" not in info
    _compare(d, _opts("top0.qcow2", "s", "t"), _opts("top.qcow2", "s"))
    _check(d, _opts("top.qcow2", "s"))
    _assert_no_plaintext(d / "top.qcow2")


@pytest.mark.parametrize("enc", ["luks", "aes"])
def test_rebase_encrypted_overlay_onto_plain_backing(di, tmp_path: Path, enc: str) -> None:
    d = _chain(tmp_path, enc, None)
    _create(d, "new.qcow2", None)
    _write(d, "new.qcow2", None, None, 0x22, "0", "256K")
    new = str(d / "new.qcow2")  # absolute: qemu-img cannot resolve a relative one here
    r = di("rebase", *SECRETS, "--image-opts", _opts("top.qcow2", "s"), "-b", new,
           "-F", "qcow2", cwd=d)
    assert (r.rc, r.err) == (0, "")
    _compare(d, _opts("top0.qcow2", "s"), _opts("top.qcow2", "s"))
    _check(d, _opts("top.qcow2", "s"))
    _assert_no_plaintext(d / "top.qcow2")
    # the same rebase by qemu-img gives the same guest view
    shutil.copy(d / "top0.qcow2", d / "qtop.qcow2")
    q = qemu("rebase", *SECRETS, "--image-opts", _opts("qtop.qcow2", "s"), "-b", new,
             "-F", "qcow2", cwd=d)
    assert q.rc == 0, q.err
    _compare(d, _opts("qtop.qcow2", "s"), _opts("top.qcow2", "s"))


def _same_failure(di, d: Path, *args: str) -> str:
    """Run ARGS with both tools on copies of the chain; both must fail alike and leave
    the images untouched."""
    before = {p.name: p.read_bytes() for p in d.glob("*.qcow2")}
    q = qemu(*args, cwd=d)
    r = di(*args, cwd=d)
    assert (r.rc, r.err) == (q.rc, q.err) and r.rc == 1, (r.err, q.err)
    assert {p.name: p.read_bytes() for p in d.glob("*.qcow2")} == before
    return r.err


def test_encrypted_backing_needs_its_key_like_qemu_img(di, tmp_path: Path) -> None:
    d = _chain(tmp_path, "luks", "luks", "t")
    for cmd in (["commit"], ["rebase", "-b", "", ]):
        err = _same_failure(di, d, cmd[0], *SECRETS, "--image-opts",
                            _opts("top.qcow2", "s"), *cmd[1:])
        assert err.endswith("Could not open backing file: Parameter 'encrypt.key-secret' "
                            "is required for cipher\n")


def test_rebase_onto_encrypted_backing_is_refused_like_qemu_img(di, tmp_path: Path) -> None:
    d = _chain(tmp_path, "luks", None)
    _create(d, "enew.qcow2", "luks", "t")
    err = _same_failure(di, d, "rebase", *SECRETS, "--image-opts",
                        _opts("top.qcow2", "s", "t"), "-b", str(d / "enew.qcow2"),
                        "-F", "qcow2")
    assert "Could not open new backing file" in err


def test_other_image_options_still_refused(di, tmp_path: Path) -> None:
    d = _chain(tmp_path, "luks", None)
    r = di("commit", *SECRETS, "--image-opts",
           _opts("top.qcow2", "s") + ",bogus=on", cwd=d)
    assert r.rc == 1 and "Block format 'qcow2' does not support the option 'bogus'" in r.err
    assert (d / "top.qcow2").read_bytes() == (d / "top0.qcow2").read_bytes()
