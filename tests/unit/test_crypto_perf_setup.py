"""Set-up costs of the LUKS paths (issue 20 item 3): the anti-forensic merge of a
4000-stripe key slot, and the CLI's OpenBLAS thread limit while numpy (the ``diskimg[fast]``
XTS kernel) loads."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from typing import Any

import pytest

from diskimg.cli import main as cli_main
from diskimg.crypto.luks import af_merge, af_split


def _ref_merge(material: bytes, n: int, stripes: int, name: str) -> bytes:
    """af_merge straight from the LUKS1 spec, byte by byte."""
    size = hashlib.new(name).digest_size
    d = bytes(n)
    for k in range(stripes):
        s = material[k * n:(k + 1) * n]
        d = bytes(a ^ b for a, b in zip(d, s, strict=True))
        if k == stripes - 1:
            return d
        d = b"".join(hashlib.new(name, struct.pack(">I", i // size) + d[i:i + size])
                     .digest()[:len(d[i:i + size])] for i in range(0, n, size))
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("n", "name"), [(64, "sha256"), (32, "sha1"), (48, "sha512")])
def test_af_full_slot_matches_spec(n: int, name: str) -> None:
    """A full 4000-stripe slot (what qemu-img writes) merges to the spec's key, and
    af_split's material merges back to the key it split."""
    key = os.urandom(n)
    material = bytes(af_split(key, 4000, name))
    assert _ref_merge(material, n, 4000, name) == key
    assert af_merge(material, n, 4000, name) == key


def test_cli_limits_openblas_threads_for_the_command_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli_main, "_main",
                        lambda argv: seen.append(os.environ.get("OPENBLAS_NUM_THREADS")) or 0)
    assert cli_main.main(["--version"]) == 0
    assert seen == ["1"]
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # in-process callers get theirs back
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # a caller's own choice is kept
    assert cli_main.main(["--version"]) == 0
    assert seen == ["1", "4"]
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"


@pytest.mark.parametrize("encrypt", [False, True])
def test_crypt_private_xts_bytes_and_scratch_wiped(monkeypatch: pytest.MonkeyPatch,
                                                   encrypt: bool) -> None:
    """Key material (a 4000-stripe slot of a 64-byte key: 500 sectors) en/decrypted by
    crypt_private equals cryptography's XTS sector by sector; with the numpy kernel (in
    place) every scratch array it used is zero afterwards."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from diskimg.crypto.luks import cipher as cmod
    from diskimg.crypto.luks.header import CipherSpec

    made: list[Any] = []

    class Spy(cmod.XtsKernel):  # type: ignore[misc,valid-type]
        def __init__(self, key: Any) -> None:
            super().__init__(key)
            made.append(self)

    monkeypatch.setattr(cmod, "XtsKernel", Spy)
    key = bytes(range(1, 65))
    data = random.Random(3).randbytes(512 * 500)
    buf = bytearray(data)
    c = cmod.LuksCipher(CipherSpec("aes", "xts", "plain64", None, 64), key)
    c.crypt_private(0, buf, encrypt)
    ref = b"".join(
        (lambda ctx: ctx.update(data[512 * i:512 * i + 512]))(
            (lambda ci: ci.encryptor() if encrypt else ci.decryptor())(
                Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16, "little")))))
        for i in range(500))
    assert hashlib.sha256(buf).digest() == hashlib.sha256(ref).digest()
    if Spy.private:  # the numpy kernel: used, then wiped
        assert made
        for k in made:
            assert not k._shifted.any() and not k._out_bits.any()
            assert not any(k._out) and not any(k._tweaks)


PRELOAD_PROBE = """\
import sys, threading
area = open(sys.argv[1], "rb").read()
from diskimg.crypto.luks import keyslots
seen = []
real = keyslots.pbkdf2_key

def probe(*args, **kw):
    seen.append((sorted(t.name for t in threading.enumerate()),
                 "diskimg.crypto.luks.cipher" in sys.modules))
    return real(*args, **kw)

keyslots.pbkdf2_key = probe
from diskimg.crypto.luks import open_luks
cipher, payload = open_luks(area, sys.argv[2])
buf = bytearray(open(sys.argv[3], "rb").read())
cipher.decrypt(7, buf)
print(repr((seen[0], payload, buf.hex(),
            [t.name for t in threading.enumerate() if t.name == "diskimg-preload"])))
"""


def test_unlock_loads_the_sector_kernels_while_pbkdf2_runs(tmp_path: Any) -> None:
    """open_luks starts importing the sector kernels (numpy's: ~50 ms) on a thread before
    the key slot's PBKDF2 run (which releases the GIL), instead of before it, and the
    cipher it returns decrypts the same bytes; no import thread outlives the call."""
    import subprocess
    import sys

    from tests.unit.luks_testlib import MK64, PASS, luks_area

    from diskimg.crypto.luks import LuksCipher, LuksHeader

    area = luks_area()
    (tmp_path / "area").write_bytes(area)
    data = random.Random(3).randbytes(512 * 3000)
    (tmp_path / "data").write_bytes(data)
    r = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, str(tmp_path / "area"),
                        PASS.decode(), str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=120, check=True)
    (threads, cipher_loaded), payload, plain_hex, left = eval(r.stdout)  # noqa: S307
    assert "diskimg-preload" in threads and not cipher_loaded
    assert left == []
    header = LuksHeader.parse(area, len(area))
    assert payload == header.payload_offset * 512
    ref = bytearray(data)
    LuksCipher(header.spec, MK64).decrypt(7, ref)
    assert bytes.fromhex(plain_hex) == bytes(ref)
