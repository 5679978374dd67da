"""Validate untrusted disk images the way a CI job should: ``diskimg --untrusted check
--output=json`` per image, judged by exit status and ``findings``.

The script fills ``uploads/`` with four images (a clean one, one with a leaked cluster,
one whose backing file lies outside ``uploads/``, and a VHD), runs the command line on each
exactly as a CI step would, and then does the same in Python with ``untrusted=True``.
Run it in an empty directory:

    python examples/validate_uploads.py

Every verdict is asserted (tests/docs runs it).
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import diskimg

DISKIMG = [sys.executable, "-m", "diskimg"]  # in a CI job: just `diskimg`
ACCEPT = {0, 3, 63}  # clean, only leaks (data intact), raw (nothing to check)

os.makedirs("uploads", exist_ok=True)

# a clean image
diskimg.create("uploads/clean.qcow2", "qcow2", 16 << 20)

# an image with one leaked cluster: a refcount of 1 that no table references
diskimg.create("uploads/leaky.qcow2", "qcow2", 16 << 20)
with open("uploads/leaky.qcow2", "r+b") as f:
    f.seek(48)
    (reftable,) = struct.unpack(">Q", f.read(8))  # header: refcount_table_offset
    f.seek(reftable)
    (refblock,) = struct.unpack(">Q", f.read(8))  # the first refcount block
    leaked = -(-f.seek(0, os.SEEK_END) // 65536)  # the first cluster past the end
    f.seek(leaked * 65536)
    f.write(bytes(65536))
    f.seek(refblock + 2 * leaked)  # 16-bit refcounts
    f.write(struct.pack(">H", 1))

# an image whose backing file lies outside its directory (qemu-img would follow it)
diskimg.create("base.qcow2", "qcow2", 16 << 20)
diskimg.create("uploads/escape.qcow2", "qcow2", None, backing_file="../base.qcow2",
               backing_fmt="qcow2")

# a format diskimg does not implement: refused by name, never read as raw
with open("uploads/disk.vhd", "wb") as f:
    f.write(b"conectix" + bytes(504))


def cli_check(path: str) -> tuple[int, dict | None, str]:
    """Exit status, parsed JSON report (None when the check could not run), stderr."""
    p = subprocess.run([*DISKIMG, "--untrusted", "check", "--output=json", path],
                       capture_output=True, text=True)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stderr


results = {}
for name in sorted(os.listdir("uploads")):
    path = f"uploads/{name}"
    rc, report, err = cli_check(path)
    results[name] = (rc, report, err)
    verdict = "accept" if rc in ACCEPT else "reject"
    detail = [f["kind"] for f in report["findings"]] if report else err.strip()
    print(f"{verdict:6} exit {rc:2}  {path}  {detail}")

rc, report, _ = results["clean.qcow2"]
assert rc == 0 and report is not None and report["check-errors"] == 0
assert report["findings"] == []

rc, report, _ = results["leaky.qcow2"]
assert rc == 3 and report is not None and report["leaks"] == 1
assert [(f["kind"], f["host_offset"]) for f in report["findings"]] == [("leak", leaked * 65536)]

rc, report, err = results["escape.qcow2"]
assert rc == 1 and report is None
assert "../base.qcow2" in err and "--untrusted" in err, err

rc, report, err = results["disk.vhd"]
assert rc == 1 and report is None and "not supported by diskimg" in err, err

# the same policy in Python: untrusted=True confines every file an image names
try:
    diskimg.open("uploads/escape.qcow2", untrusted=True)
except diskimg.BackingChainError as e:
    print("python: refused:", e)
else:
    raise AssertionError("the backing file outside uploads/ must be refused")
with diskimg.open("uploads/leaky.qcow2", untrusted=True) as img:
    result = img.check()  # read-only: never repairs
assert result.exit_code == 3 and result.findings[0]["kind"] == "leak"

# an explicit policy: allow the parent directory too, and a short chain limit
policy = diskimg.OpenPolicy(untrusted=True, allowed_dirs=[Path(".").resolve()], max_depth=8)
with diskimg.open("uploads/escape.qcow2", policy=policy) as img:
    assert img.backing is not None and img.backing.filename.endswith("base.qcow2")
print("python: with allowed_dirs=[.], the backing file opens:", img.backing.filename)
