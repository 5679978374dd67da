"""The handshake paths a modern client does not take (NBD_OPT_EXPORT_NAME with and without
the 124 zero bytes, a client without fixed newstyle, OPT_INFO before OPT_GO, OPT_ABORT,
OPT_LIST) and WRITE_ZEROES' FAST_ZERO, against the in-process server, with the bytes of
the image checked after each change."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import diskimg
from diskimg.nbd import protocol as p
from tests.nbd.nbdtestlib import RawClient

MiB = 1 << 20


def _img(tmp_path: Path, fmt: str = "qcow2") -> tuple[Path, bytes]:
    path = tmp_path / f"h.{fmt}"
    diskimg.create(str(path), fmt, 2 * MiB)
    data = random.Random(3).randbytes(2 * MiB)
    with diskimg.open(str(path), "r+", fmt) as dev:
        dev.write(0, data)
    return path, data


def test_export_name_with_and_without_zeroes(tmp_path: Path, inproc_nbd: Any) -> None:
    path, data = _img(tmp_path)
    served = inproc_nbd(path, "qcow2", name="vol", description="d")
    for cflags, pad in ((p.NBD_FLAG_C_FIXED_NEWSTYLE, 124),
                        (p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES, 0),
                        (0, 124)):                       # not even fixed newstyle
        c = RawClient(served.sock, handshake=False)
        assert p.parse_server_greeting(c.recv(18)) == (p.NBD_FLAG_FIXED_NEWSTYLE
                                                       | p.NBD_FLAG_NO_ZEROES)
        c.send(p.pack_client_flags(cflags))
        c.send(p.pack_option(p.NBD_OPT_EXPORT_NAME, p.pack_export_name_option("vol")))
        reply = p.parse_export_name_reply(c.recv(10))
        assert reply.size == 2 * MiB and not reply.flags & p.NBD_FLAG_SEND_DF
        assert c.recv(pad) == bytes(pad)
        assert c.request(p.NBD_CMD_READ, MiB, 4096) == (0, data[MiB:MiB + 4096], [])
        c.close()
    # an unknown name cannot be refused with an error: the server hangs up
    c = RawClient(served.sock, handshake=False)
    c.greet()
    c.send(p.pack_option(p.NBD_OPT_EXPORT_NAME, b"other"))
    assert c.closed_by_server()
    # a client without fixed newstyle may only send NBD_OPT_EXPORT_NAME
    c = RawClient(served.sock, handshake=False)
    c.recv(18)
    c.send(p.pack_client_flags(0) + p.pack_option(p.NBD_OPT_LIST))
    assert c.closed_by_server()


def test_info_list_abort(tmp_path: Path, inproc_nbd: Any) -> None:
    path, data = _img(tmp_path)
    served = inproc_nbd(path, "qcow2", name="vol", description="a disk")
    c = RawClient(served.sock, handshake=False)
    c.greet()
    reps = c.option(p.NBD_OPT_LIST)
    assert [p.parse_rep_server(d) for t, d in reps if t == p.NBD_REP_SERVER] == [
        ("vol", "a disk")]
    reps = c.option(p.NBD_OPT_INFO, p.pack_info_request(
        "vol", (p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, p.NBD_INFO_BLOCK_SIZE)))
    infos = [p.parse_info(d) for t, d in reps if t == p.NBD_REP_INFO]
    exp = infos[0]
    assert isinstance(exp, p.InfoExport) and exp.flags & p.NBD_FLAG_SEND_WRITE_ZEROES
    assert infos == [p.InfoExport(2 * MiB, exp.flags), p.InfoName("vol"),
                     p.InfoDescription("a disk"), p.InfoBlockSize(1, 4096, 32 * MiB)]
    # INFO does not end the handshake: GO still works
    c.go("vol")
    assert c.request(p.NBD_CMD_READ, 0, 512)[1] == data[:512]
    c.close()
    c = RawClient(served.sock, handshake=False)
    c.greet()
    assert c.option(p.NBD_OPT_ABORT) == [(p.NBD_REP_ACK, b"")]
    assert c.closed_by_server()


def test_fast_zero(tmp_path: Path, inproc_nbd: Any) -> None:
    for fmt in ("qcow2", "raw"):
        path, data = _img(tmp_path, fmt)
        served = inproc_nbd(path, fmt)
        c = RawClient(served.sock)
        assert c.flags & p.NBD_FLAG_SEND_FAST_ZERO
        want = bytearray(data)
        fz = p.NBD_CMD_FLAG_FAST_ZERO
        # qcow2: a range of whole clusters is fast (metadata only), a partial one is not
        err = c.request(p.NBD_CMD_WRITE_ZEROES, 4096, 8192, fz)[0]
        if fmt == "qcow2":
            assert err == p.NBD_ENOTSUP       # refused: nothing written
        else:
            assert err == 0                   # raw: fallocate
            want[4096:12288] = bytes(8192)
        assert c.request(p.NBD_CMD_WRITE_ZEROES, 65536, 131072, fz)[0] == 0
        want[65536:196608] = bytes(131072)
        assert c.request(p.NBD_CMD_READ, 0, 2 * MiB)[1] == bytes(want)
        c.close()
        served.stop()
        with diskimg.open(str(path), "r", fmt) as dev:
            assert dev.read(0, dev.size) == bytes(want)
