"""TLS for the NBD server with the stdlib :mod:`ssl` module, from a directory laid out as
QEMU's ``tls-creds-x509`` object expects: ``ca-cert.pem`` (the CA that signs client
certificates), ``server-cert.pem`` and ``server-key.pem``.

``verify_peer`` (QEMU's ``verify-peer``, on by default there too) requires every client to
present a certificate signed by ``ca-cert.pem``.  TLS 1.2 is the oldest version accepted
(the NBD spec's minimum).
"""

from __future__ import annotations

import os
import ssl

from ..errors import UsageError


def server_context(directory: str, *, verify_peer: bool = True) -> ssl.SSLContext:
    """An SSL server context from a tls-creds-x509 directory; :class:`UsageError` naming
    the file when one is missing or unusable."""
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    ca = os.path.join(directory, "ca-cert.pem")
    for path in (cert, key) + ((ca,) if verify_peer else ()):
        if not os.path.isfile(path):
            raise UsageError(f"Unable to access credentials {path}: No such file or "
                             "directory", field="tls-creds")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer:
            ctx.load_verify_locations(ca)
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"Unable to load TLS credentials from {directory}: {e}",
                         field="tls-creds") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


def parse_tls_object(text: str) -> tuple[str, str, bool]:
    """``tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`` (the
    ``--object`` qemu-nbd takes) → (id, dir, verify_peer)."""
    from ..options import parse_items

    head, _, rest = text.partition(",")
    props = dict(parse_items(rest if "=" not in head else text))
    if "=" not in head:
        props["qom-type"] = head
    if props.get("qom-type") != "tls-creds-x509":
        raise UsageError(f"Parameter 'qom-type' does not accept value "
                         f"'{props.get('qom-type')}'", field="object")
    unknown = set(props) - {"qom-type", "id", "dir", "endpoint", "verify-peer", "priority"}
    if unknown:
        raise UsageError(f"Property 'tls-creds-x509.{sorted(unknown)[0]}' not found",
                         field="object")
    if "id" not in props:
        raise UsageError("Parameter 'id' is missing", field="object")
    if props.get("endpoint", "client") != "server":
        raise UsageError("Expecting TLS credentials with a server endpoint",
                         field="object")
    verify = props.get("verify-peer", "on")
    if verify not in ("on", "off", "yes", "no", "true", "false"):
        raise UsageError("Parameter 'verify-peer' expects 'on' or 'off'", field="object")
    return props["id"], props.get("dir", ""), verify in ("on", "yes", "true")
