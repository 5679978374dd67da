"""``diskimg nbd --tls-creds``: TLS with the stdlib ssl module, certificates laid out as
QEMU's tls-creds-x509 directory, against libnbd (nbdcopy, nbdinfo) and qemu-img as TLS
clients.  Every byte copied over TLS is compared; a client without TLS, and one without a
client certificate (verify-peer), are refused while the server keeps serving."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from qemukit import Qemu

from diskimg.nbd import protocol as p
from tests.nbd.nbdtestlib import RawClient, Serve, needs_nbd_tools, uri

pytestmark = [pytest.mark.qemu, needs_nbd_tools,
              pytest.mark.skipif(not shutil.which("openssl"), reason="openssl absent")]


def test_tls_with_libnbd_and_qemu_img(creds: Path, tmp_path: Path, qemu: Qemu,
                                      diskimg_nbd: Serve) -> None:
    img = tmp_path / "t.qcow2"
    qemu.img("create", "-f", "qcow2", img, "8M")
    qemu.io(img, "write -P 0x3c 0 3M", "write -P 0x3d 6M 512")
    want = qemu.raw_bytes(img)
    with diskimg_nbd(img, "-r", "-e", "2", "--tls-creds", str(creds)) as sock:
        tls_uri = f"nbds+unix:///?socket={sock}&tls-certificates={creds}"
        out = tmp_path / "o.raw"
        qemu.run(["nbdcopy", tls_uri, str(out)])
        assert out.read_bytes() == want
        info = qemu.run(["nbdinfo", "--json", tls_uri]).stdout
        assert '"TLS": true' in info
        # without TLS: every option but STARTTLS is refused (TLS_REQD), nothing is read
        plain = qemu.run(["nbdcopy", uri(sock), str(tmp_path / "x.raw")], ok=None)
        assert plain.returncode != 0
        # qemu-img, with a tls-creds-x509 object of its own
        q = tmp_path / "q.raw"
        qemu.img("convert", "--object",
                 f"tls-creds-x509,id=tls0,dir={creds},endpoint=client", "--image-opts",
                 f"driver=nbd,path={sock},tls-creds=tls0,tls-hostname=localhost",
                 "-O", "raw", q)
        assert q.read_bytes() == want
        # verify-peer: a TLS client without a certificate is dropped
        c = RawClient(sock, handshake=False)
        c.greet()
        assert c.option(p.NBD_OPT_GO, p.pack_info_request(""))[-1][0] == \
            p.NBD_REP_ERR_TLS_REQD
        assert c.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ACK
        ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
            tls = ctx.wrap_socket(c.sock, server_hostname="localhost")
            tls.sendall(p.pack_option(p.NBD_OPT_GO, p.pack_info_request("")))
            if not tls.recv(20):
                raise ConnectionError("closed")
        c.sock.close()
        # and the server still serves a good client
        qemu.run(["nbdcopy", tls_uri, str(out)])
        assert out.read_bytes() == want


def test_tls_object_without_peer_verification(creds: Path, tmp_path: Path, qemu: Qemu,
                                              diskimg_nbd: Serve) -> None:
    img = tmp_path / "v.raw"
    img.write_bytes(bytes(range(256)) * 4096)
    obj = f"tls-creds-x509,id=t0,dir={creds},endpoint=server,verify-peer=off"
    with diskimg_nbd(img, "--object", obj, "--tls-creds", "t0", fmt="raw") as sock:
        c = RawClient(sock, handshake=False)
        c.greet()
        assert c.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ACK
        ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        assert c.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ERR_INVALID  # already on
        assert c.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == p.NBD_REP_ACK
        c.structured = True
        c.go()
        assert c.request(p.NBD_CMD_WRITE, 4096, data=b"\xfe" * 4096)[0] == 0
        err, got, _ = c.request(p.NBD_CMD_READ, 0, 3 * 4096)
        assert err == 0 and got == bytes(range(256)) * 16 + b"\xfe" * 4096 + \
            bytes(range(256)) * 16
        c.close()
    data = img.read_bytes()
    assert data[4096:8192] == b"\xfe" * 4096
    assert data[:4096] + data[8192:] == (bytes(range(256)) * 4096)[:4096] + \
        (bytes(range(256)) * 4096)[8192:]
