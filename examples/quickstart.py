"""The tutorial in one script: create, write, snapshot, convert, map and check a qcow2 image.

Run it in an empty directory (it writes disk.qcow2, disk.raw, disk.vmdk, small.qcow2 and
clean.qcow2 there):

    python examples/quickstart.py

Every step asserts its result, so the script doubles as a test (tests/docs runs it).
"""

import itertools

import diskimg

MiB = 1 << 20

# 1. create: sizes are bytes; -o options are keyword options
diskimg.create("disk.qcow2", "qcow2", 64 * MiB, options={"cluster_size": 65536})

# 2. write: offsets and lengths are bytes and must lie inside the disk
with diskimg.open("disk.qcow2", "r+") as img:  # format probed, QEMU lock taken
    assert (img.format, img.size) == ("qcow2", 64 * MiB)
    img.write(0, b"hello, disk\n" * 1000)
    img.write(32 * MiB, b"\xab" * 65536)
    img.write_zeroes(0, 4096)  # the first 4 KiB read as zeros again
    assert img.read(0, 4096) == bytes(4096)
    assert img.read(4096, 12) == b"o, disk\nhell"
    try:
        img.write(64 * MiB - 1, b"xy")  # one byte past the end
    except diskimg.UsageError as e:
        print("refused as expected:", e)
    else:
        raise AssertionError("a write past the end must be refused")

# 3. snapshot, change, revert
with diskimg.open("disk.qcow2", "r+") as img:
    snap = img.snapshots.create("clean")
    img.write(32 * MiB, b"\xcd" * 65536)
    assert [s.name for s in img.snapshots.list()] == ["clean"]
    img.snapshots.apply("clean")
    assert img.read(32 * MiB, 65536) == b"\xab" * 65536
    print(f"snapshot {snap.id} {snap.name!r} taken and applied")

# 4. convert to raw, vmdk and a zstd-compressed qcow2; the guest bytes stay identical
diskimg.convert("disk.qcow2", "disk.raw", out_format="raw")
diskimg.convert("disk.qcow2", "disk.vmdk", out_format="vmdk",
                options={"subformat": "streamOptimized"})
diskimg.convert("disk.qcow2", "small.qcow2", out_format="qcow2", compress=True,
                options={"compression_type": "zstd"})
for other in ("disk.raw", "disk.vmdk", "small.qcow2"):
    identical, offset, message = diskimg.compare("disk.qcow2", other)
    assert identical and offset is None, (other, message)
    print(f"disk.qcow2 vs {other}: {message}")
with open("disk.raw", "rb") as f:
    f.seek(32 * MiB)
    assert f.read(2) == b"\xab\xab"
with diskimg.open("disk.qcow2") as img:  # an internal snapshot as a convert source
    diskimg.convert(img.snapshot_view(name="clean"), "clean.qcow2", out_format="qcow2")
assert diskimg.compare("disk.qcow2", "clean.qcow2")[0]

# 5. map: the entries of `qemu-img map --output=json`, covering the whole disk
with diskimg.open("disk.qcow2") as img:
    entries = [e.to_json() for e in img.map()]
assert entries[0]["start"] == 0
assert sum(e["length"] for e in entries) == 64 * MiB
for a, b in itertools.pairwise(entries):
    assert a["start"] + a["length"] == b["start"]  # contiguous, no overlap
data = [(e["start"], e["length"]) for e in entries if e["data"] and not e["zero"]]
assert data == [(0, 65536), (32 * MiB, 65536)], data  # the two clusters written
print("map:", *entries, sep="\n  ")

# 6. check: read-only unless repair= is given; exit codes as qemu-img check
with diskimg.open("disk.qcow2") as img:
    result = img.check()
report = result.to_json()
assert result.exit_code == 0 and report["check-errors"] == 0 and result.findings == []
print(f"check: exit {result.exit_code}, {report['allocated-clusters']} of "
      f"{report['total-clusters']} clusters allocated")
