"""diskimg images pickle as what opens them (issue 18 item 1 / item 4's Dask workers):
path or URL, mode, format, options and policy -- never a file descriptor, never secrets.
``pickle.loads`` opens the image again (in this process or another); an image over a
bare file object (or a pipe, read once) refuses to pickle with a clear error."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import ImageLockedError, UsageError
from diskimg.hostio import urls
from diskimg.hostio.fileobj import FileObjectHost
from diskimg.policy import OpenPolicy
from qemukit import Qemu

SIZE = 1 << 20


def _chain(qemu: Qemu, tmp_path: Path) -> Path:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu.io(base, "write -P 0x51 0 128k")
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
             cwd=tmp_path)
    qemu.io(top, "write -P 0x52 64k 4k")
    return top


@pytest.mark.qemu
def test_pickle_reopens_in_another_process_without_fds(qemu: Qemu, tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    want = hashlib.sha256(qemu.raw_bytes(top, "qcow2")).hexdigest()
    with diskimg.open(top, secrets={"unused": b"hunter2-secret"}) as img:
        blob = pickle.dumps(img)
        copy = pickle.loads(blob)
    assert b"hunter2-secret" not in blob                          # never secrets
    with copy:                                                    # the original is closed
        assert copy.format == "qcow2" and copy.read_only and copy.filename == str(top)
        assert hashlib.sha256(copy.read(0, SIZE)).hexdigest() == want
    code = ("import pickle, sys, hashlib\nimg = pickle.loads(sys.stdin.buffer.read())\n"
            "print(hashlib.sha256(img.read(0, img.size)).hexdigest()); img.close()")
    r = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == want


@pytest.mark.qemu
def test_mode_format_options_and_policy_survive(qemu: Qemu, tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x01" * 512 + b"\x02" * 1024 + b"\x03" * 512)
    with diskimg.open(raw, format="raw", options={"offset": "512", "size": "1024"}) as img:
        copy = pickle.loads(pickle.dumps(img))
    with copy:
        assert (copy.format, copy.size, copy.read(0, 1024)) == ("raw", 1024, b"\x02" * 1024)
    with diskimg.open(top, backing=False, untrusted=True) as img:
        copy = pickle.loads(pickle.dumps(img))
    with copy:
        assert copy.backing is None and copy.read(0, 4) == bytes(4)
        assert copy.reopen_with is not None
        pol = copy.reopen_with[1]["policy"]
        assert isinstance(pol, OpenPolicy) and pol.untrusted and \
            pol.allowed_dirs == [tmp_path.resolve()]
    with diskimg.open(top, "r+") as img:
        blob = pickle.dumps(img)
        with pytest.raises(ImageLockedError):      # a writer while the writer is open
            pickle.loads(blob)
    with pickle.loads(blob) as copy:
        assert not copy.read_only
        copy.write(0, b"\x99" * 512)
    qemu.check_clean(top)
    assert qemu.raw_bytes(top, "qcow2")[:513] == b"\x99" * 512 + b"\x51"


def test_file_object_images_backing_files_and_urls(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    with diskimg.open(io.BytesIO(raw.read_bytes()), format="raw") as img, \
            pytest.raises(UsageError, match=r"Cannot pickle the raw image '<BytesIO>': it was "
                          r"not opened from a path or URL"):
        pickle.dumps(img)
    opened: list[str] = []

    def opener(url: str, policy: OpenPolicy,
               writable: bool = False) -> FileObjectHost:
        opened.append(url)
        return FileObjectHost(io.BytesIO(raw.read_bytes()), name=url)

    urls.register("pickletest", opener)
    try:
        with diskimg.open("pickletest://h/d.raw", format="raw") as img:
            copy = pickle.loads(pickle.dumps(img))
        with copy:
            assert copy.filename == "pickletest://h/d.raw" and copy.read(0, 8) == bytes(8)
        assert opened == ["pickletest://h/d.raw"] * 2
    finally:
        urls._OPENERS.pop("pickletest", None)


@pytest.mark.qemu
def test_a_backing_file_or_a_snapshot_view_alone_refuses_to_pickle(qemu: Qemu,
                                                                   tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    qemu.img("snapshot", "-c", "s1", top)
    with diskimg.open(top) as img:
        assert img.backing is not None
        with pytest.raises(UsageError, match="Cannot pickle the qcow2 image"):
            pickle.dumps(img.backing)
        view = img.snapshot_view(name="s1")
        with pytest.raises(UsageError, match="Cannot pickle the qcow2 image"):
            pickle.dumps(view)
        with pickle.loads(pickle.dumps(img)) as again:          # the image itself does
            assert again.read(64 << 10, 4) == b"\x52" * 4
