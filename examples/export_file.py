"""Export a file from inside a disk image with ``img.as_file()``, without mounting anything.

The disk holds a tar archive written straight onto the block device (as ``tar -cf
/dev/vdb`` in a guest would). The script makes such a qcow2 disk, lists and extracts a
member through ``as_file()``, and checks that hashing the disk through ``as_file()``
gives the same digest as hashing its raw conversion. Run it in an empty directory:

    python examples/export_file.py

Every step asserts its result (tests/docs runs it).
"""

import hashlib
import io
import os
import shutil
import tarfile

import diskimg

MEMBERS = {"build/VERSION": b"1.4.2\n", "build/report.txt": b"all green\n" * 5000}

# a 16 MiB qcow2 data disk with a tar archive on it
diskimg.create("artefacts.qcow2", "qcow2", 16 << 20)
with diskimg.open("artefacts.qcow2", "r+") as img, img.as_file() as disk:
    with tarfile.open(fileobj=disk, mode="w") as tar:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    end = disk.tell()
print(f"tar archive of {end} bytes written onto the disk")
assert os.path.getsize("artefacts.qcow2") < 1 << 20  # only the clusters tar wrote

# read one member back out, streaming it into a host file
with (diskimg.open("artefacts.qcow2") as img,  # read-only, shared lock
      tarfile.open(fileobj=img.as_file(), mode="r:") as tar):
    assert tar.getnames() == list(MEMBERS)
    src = tar.extractfile("build/report.txt")
    assert src is not None
    with open("report.txt", "wb") as out:
        shutil.copyfileobj(src, out)
with open("report.txt", "rb") as f:
    assert f.read() == MEMBERS["build/report.txt"]
print("extracted build/report.txt:", os.path.getsize("report.txt"), "bytes")

# the file object is the whole disk: its digest is the raw image's digest
with diskimg.open("artefacts.qcow2") as img, img.as_file() as disk:
    assert disk.seek(0, io.SEEK_END) == img.size == 16 << 20
    disk.seek(0)
    via_as_file = hashlib.file_digest(disk, "sha256").hexdigest()
diskimg.convert("artefacts.qcow2", "artefacts.raw", out_format="raw")
with open("artefacts.raw", "rb") as f:
    via_raw = hashlib.file_digest(f, "sha256").hexdigest()
assert via_as_file == via_raw, (via_as_file, via_raw)
print("sha256 of the disk:", via_as_file)

