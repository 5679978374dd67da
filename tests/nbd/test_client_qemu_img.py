"""diskimg commands on NBD exports as qemu-img 7.2 runs them: ``info`` (no allocated size,
no dirty flag for raw), writing onto an export without ``-n`` and qemu's legacy
``nbd:HOST:PORT`` / ``nbd:unix:PATH`` file names.  qemu-img on the same export is the
oracle; every test compares output text or bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemukit import Qemu

from tests.nbd.clientkit import cli, qemu_nbd_tcp
from tests.nbd.nbdtestlib import Serve, uri

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path, qemu: Qemu) -> Path:
    img = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "4M")
    qemu.io(img, "write -P 0x5a 0 1M", "write -P 0x11 3M 4096")
    return img


def _same_info(qemu: Qemu, name: str, *extra: str) -> None:
    for out in ("human", "json"):
        ours = cli("info", f"--output={out}", *extra, name).stdout
        theirs = qemu.img("info", f"--output={out}", *extra, name).stdout
        assert ours == theirs, (name, out)


def test_info_of_an_export_equals_qemu_img(image: Path, tmp_path: Path, qemu: Qemu,
                                           qemu_nbd: Serve) -> None:
    """raw over an export: ``disk size: unavailable``, no ``actual-size`` nor
    ``dirty-flag``; a qcow2 file served raw: its dirty flag, no ``actual-size``."""
    with qemu_nbd(image, "-r") as sock:
        _same_info(qemu, uri(sock))
        assert "disk size: unavailable" in cli("info", uri(sock)).stdout
    with qemu_nbd(image, "-r", fmt="raw") as sock:
        _same_info(qemu, uri(sock))
        _same_info(qemu, uri(sock), "-f", "qcow2")
    with qemu_nbd_tcp(image, "-r", "-x", "disk one") as url:
        _same_info(qemu, url + "disk%20one")


WRITES = [  # (command, args with {u} the export's URL, exit code)
    ("convert", ["-O", "raw", "{small}", "{u}"], 0),   # the export's tail left as it was
    ("convert", ["-O", "raw", "{same}", "{u}"], 0),    # stale bytes overwritten with zeros
    ("convert", ["-O", "raw", "{big}", "{u}"], 1),     # Cannot grow NBD nodes: nothing
    ("dd", ["-O", "raw", "if={small}", "of={u}"], 0),
    ("dd", ["-O", "raw", "bs=64k", "count=3", "if={same}", "of={u}"], 0),
    ("dd", ["-O", "raw", "if={big}", "of={u}"], 1),
    ("create", ["-f", "raw", "{u}", "1M"], 0),         # only the first 512 bytes zeroed
    ("create", ["-f", "raw", "{u}", "16M"], 1),
    ("create", ["-f", "raw", "-o", "preallocation=full", "{u}", "1M"], 1),
]


def test_writing_onto_an_export_without_n_as_qemu_img(tmp_path: Path, qemu: Qemu,
                                                      qemu_nbd: Serve) -> None:
    """convert/dd/create onto an existing export without ``-n``: qemu-img writes onto
    it (it cannot create it); the export keeps its size; a larger image is refused
    before anything is written.  The export's every byte equals qemu-img's result."""
    imgs = {}
    for name, size, io in (("small", "3M", "write -P 0x22 0 64k"),
                           ("same", "8M", "write -P 0x33 1M 64k"),
                           ("big", "16M", "write -P 0x44 0 64k")):
        imgs[name] = tmp_path / f"{name}.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", imgs[name], size)
        qemu.io(imgs[name], io, "write -P 0x55 2M 512")
    target = tmp_path / "export.raw"
    stale = bytes(range(256)) * (8 * MiB // 256)
    target.write_bytes(stale)
    with qemu_nbd(target, fmt="raw") as sock:
        for cmd, args, code in WRITES:
            argv = [a.format(u=uri(sock), **{k: str(v) for k, v in imgs.items()})
                    for a in args]
            results, errors = [], []
            for tool in ("qemu-img", "diskimg"):
                target.write_bytes(stale)
                if tool == "diskimg":
                    errors.append(cli(cmd, *argv, ok=code).stderr)
                else:
                    errors.append(qemu.img(cmd, *argv, ok=(code,)).stderr)
                results.append(target.read_bytes())
            # the message after the program's name: qemu-img's words
            assert errors[1].partition(": ")[2] == errors[0].partition(": ")[2], errors
            assert len(results[1]) == 8 * MiB, (cmd, args)
            assert results[1] == results[0], (cmd, args)
            if code:
                assert results[1] == stale, (cmd, args)   # a refusal changes nothing


def test_legacy_nbd_names_open_at_the_top_level_only(image: Path, tmp_path: Path,
                                                      qemu: Qemu, qemu_nbd: Serve) -> None:
    """``nbd:unix:PATH[:exportname=NAME]`` and ``nbd:HOST:PORT``: info as qemu-img prints
    it, a convert onto one writes the export; as a backing name one is refused and
    nothing connects."""
    with qemu_nbd(image, "-r", "-x", "ex") as sock:
        _same_info(qemu, f"nbd:unix:{sock}:exportname=ex")
        for bad in (f"nbd:unix:{sock}:exportname=", "nbd:127.0.0.1"):
            r = cli("info", bad, ok=1)
            assert r.stderr.split(": ", 1)[1] == \
                qemu.img("info", bad, ok=(1,)).stderr.split(": ", 1)[1]
    with qemu_nbd_tcp(image, "-r") as url:
        port = url.rsplit(":", 1)[1].strip("/")
        _same_info(qemu, f"nbd:127.0.0.1:{port}")
        _same_info(qemu, f"nbd:[127.0.0.1]:{port}")
    target = tmp_path / "t.raw"
    target.write_bytes(b"\xee" * (8 * MiB))
    with qemu_nbd(target, fmt="raw") as sock:
        cli("convert", "-O", "raw", str(image), f"nbd:unix:{sock}")
        top = tmp_path / "top.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", f"nbd:unix:{sock}", "-F", "raw",
                 top, "8M")
        before = top.read_bytes()
        r = cli("convert", "-O", "raw", str(top), str(tmp_path / "o.raw"), ok=1)
        assert "Refusing to open backing file" in r.stderr
        assert top.read_bytes() == before and not (tmp_path / "o.raw").exists()
    assert target.read_bytes() == qemu.raw_bytes(image) + b"\xee" * (4 * MiB)


def test_convert_B_over_holes_that_do_not_read_as_zeros(tmp_path: Path, qemu: Qemu,
                                                         qemu_nbd: Serve) -> None:
    """An export whose block status is a hole without NBD_STATE_ZERO (qemu's null-co
    driver with read-zeroes=off: its bytes are undefined): ``convert -B BASE`` leaves
    such ranges to the backing file, as qemu-img does (the output's map and every byte
    equal qemu-img's); with a zero-reading hole neither tool does."""
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "4M")
    qemu.io(base, "write -P 0x77 0 4M")
    opts = "driver=raw,file.driver=null-co,file.size=4M,file.read-zeroes={}"
    for zeroes in ("off", "on"):
        with qemu_nbd(opts.format(zeroes), "-r", "--image-opts", fmt=None) as sock:
            outs = []
            for tool in ("qemu", "diskimg"):
                out = tmp_path / f"{tool}-{zeroes}.qcow2"
                args = ["convert", "-O", "qcow2", "-B", str(base), "-F", "qcow2", uri(sock),
                        str(out)]
                if tool == "qemu":
                    qemu.img(*args)
                else:
                    cli(*args)
                outs.append(out)
        assert qemu.map(outs[1]) == qemu.map(outs[0]), zeroes
        assert qemu.raw_bytes(outs[1]) == qemu.raw_bytes(outs[0]) == \
            (b"\x77" * (4 * MiB) if zeroes == "off" else bytes(4 * MiB))
