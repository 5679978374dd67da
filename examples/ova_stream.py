"""Stream an OVA (a tar of the .ovf descriptor, the .mf manifest and a streamOptimized
vmdk) straight into a pipe, any writable file object, or a bucket (any fsspec URL:
``s3://bucket/appliance.ova``; the ``diskimg[remote]`` extra), without a temporary file.

A tar member's header carries its size, and OVF 1.x wants the manifest (with the SHA256
of the disk) before the disk.  Both are known only once the vmdk is written, so the vmdk
is written twice: a dry run into a counting, hashing sink (nothing stored: constant
memory) gives its size and digest, then the real run streams it into the tar.  The two
runs give the same bytes because the one random field (the descriptor's CID) is derived
from ``SOURCE_DATE_EPOCH`` (set here when unset); the real run's digest is checked
against the dry run's, and a mismatch ends with an error.

    python examples/ova_stream.py                 # builds appliance.qcow2, writes out.ova
    python examples/ova_stream.py SRC - > x.ova   # any image to stdout
    python examples/ova_stream.py SRC s3://bucket/x.ova   # into a bucket (multipart upload)

``stream_ova(src, fileobj)`` and ``stream_ova_to_url(src, url)`` are the reusable parts
(tests/anywhere/test_ova_stream.py, tests/anywhere/test_sink_s3.py).  Into a bucket the
OVA is one multipart upload: it appears under the URL only once complete, and a failure
leaves no object.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import threading
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, Protocol

import diskimg
from diskimg.hostio.sink import CountingSink, Sink


class Out(Protocol):
    """Where the OVA goes: a binary file object, a pipe, or a sink (a bucket's object)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...

    def flush(self) -> None: ...

DISK = "disk1.vmdk"
VMDK_OPTIONS = {"subformat": "streamOptimized", "adapter_type": "lsilogic"}


class HashingSink(Sink):
    """A sink that hashes what passes through it (and, with ``count_only``, stores none)."""

    def __init__(self, dest: Out | None) -> None:
        if dest is None:
            self._inner: Sink = CountingSink()
        else:
            self._inner = Sink(dest, "ova")
        super().__init__(-1, "hash")
        self.digest = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.digest.update(data)
        self._inner.write(data)
        self.offset += len(data)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        self.flush()
        self.closed = True


def _ovf(size: int, capacity: int) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
          xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file1" ovf:href="{DISK}" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity}"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance"><Info>A streamed appliance</Info></VirtualSystem>
</Envelope>
""".encode()


def _member(out: Out, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    out.write(info.tobuf(format=tarfile.USTAR_FORMAT))


def _pad(out: Out, size: int) -> None:
    out.write(bytes(-size % tarfile.BLOCKSIZE))


def stream_ova(src: str, out: Out, name: str = "appliance") -> int:
    """Write the OVA of image ``src`` into ``out`` (written in order, never sought);
    returns the vmdk's size."""
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")   # the CID, equal in both runs
    dry = HashingSink(None)
    diskimg.convert(src, dry, "vmdk", options=VMDK_OPTIONS)
    size, digest = dry.offset, dry.digest.hexdigest()
    with diskimg.open(src) as img:
        capacity = img.size
    ovf = _ovf(size, capacity)
    mf = (f"SHA256({name}.ovf)= {hashlib.sha256(ovf).hexdigest()}\n"
          f"SHA256({DISK})= {digest}\n").encode()
    for member, data in ((f"{name}.ovf", ovf), (f"{name}.mf", mf)):
        _member(out, member, len(data))
        out.write(data)
        _pad(out, len(data))
    _member(out, DISK, size)
    real = HashingSink(out)
    diskimg.convert(src, real, "vmdk", options=VMDK_OPTIONS)
    real.flush()
    if real.offset != size or real.digest.hexdigest() != digest:
        raise RuntimeError("the vmdk changed between the dry run and the real one "
                           "(was the source written to meanwhile?)")
    _pad(out, size)
    out.write(bytes(2 * tarfile.BLOCKSIZE))    # the end-of-archive blocks
    out.flush()
    return size


def stream_ova_to_url(src: str, url: str, name: str = "appliance",
                      storage_options: Mapping[str, Any] | None = None) -> int:
    """Write the OVA of image ``src`` as the object at fsspec ``url`` (a multipart upload,
    committed when the OVA is complete; discarded if anything fails); returns the vmdk's
    size."""
    from diskimg.hostio.url_sink import open_url_sink

    with diskimg.open(src) as img:       # an upper bound of the OVA's size: the part size
        hint = img.size + img.size // 32 + (4 << 20)
    with open_url_sink(url, storage_options, size_hint=hint) as sink:
        return stream_ova(src, sink, name=name)


def into_pipe(write: Callable[[BinaryIO], object]) -> bytes:
    """What ``write`` writes into a pipe (drained by a thread): a destination that
    cannot seek."""
    r, w = os.pipe()
    got: list[bytes] = []

    def drain() -> None:
        with os.fdopen(r, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=drain)
    t.start()
    with os.fdopen(w, "wb") as pipe:
        write(pipe)
    t.join()
    return got[0]


def main() -> None:
    if len(sys.argv) == 3:
        src, dst = sys.argv[1:]
        if dst == "-":
            stream_ova(src, sys.stdout.buffer)
            return
        if "://" in dst:
            stream_ova_to_url(src, dst)
            return
        with open(dst, "wb") as f:
            stream_ova(src, f)
        return
    sizes: list[int] = []
    diskimg.create("appliance.qcow2", "qcow2", 64 << 20)
    with diskimg.open("appliance.qcow2", "r+") as img:
        img.write(0, b"\xeb\x63\x90" + bytes(509))
        img.write(40 << 20, b"payload" * 10000)
    blob = into_pipe(lambda pipe: sizes.append(stream_ova("appliance.qcow2", pipe)))
    size = sizes[0]
    with open("out.ova", "wb") as f:
        f.write(blob)
    with tarfile.open("out.ova") as ova:
        names = ova.getnames()
        assert names == ["appliance.ovf", "appliance.mf", DISK], names
        disk = ova.extractfile(DISK)
        assert disk is not None
        data = disk.read()
        mf = ova.extractfile("appliance.mf")
        assert mf is not None
        assert f"SHA256({DISK})= {hashlib.sha256(data).hexdigest()}" in mf.read().decode()
    assert len(data) == size
    with open(DISK, "wb") as f:
        f.write(data)
    same, _, msg = diskimg.compare("appliance.qcow2", DISK)
    assert same, msg
    print(f"out.ova: {os.path.getsize('out.ova')} bytes, {DISK} {size} bytes, "
          "manifest and guest bytes verified")


if __name__ == "__main__":
    main()
