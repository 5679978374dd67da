"""Build an OVA-ready streamOptimized vmdk and pack it into an OVA.

Converts a qcow2 (standing in for your built appliance image) to a streamOptimized vmdk
in VMware's marker layout, checks it (qemu-img's check plus the VMware-acceptance lint),
verifies the guest bytes, and packs ``appliance.ova``: the ``.ovf`` first, then the
manifest, then the disk, as OVF 1.x requires. Run it in an empty directory:

    python examples/build_ova.py

Every step asserts its result (tests/docs runs it).
"""

import hashlib
import os
import tarfile

import diskimg

SIZE = 256 << 20  # virtual disk size in bytes

# the appliance image (normally the output of your image build)
diskimg.create("appliance.qcow2", "qcow2", SIZE)
with diskimg.open("appliance.qcow2", "r+") as img:
    img.write(0, b"\xeb\x63\x90" + bytes(509))  # a boot sector
    img.write(100 << 20, b"payload" * 10000)

# qcow2 -> streamOptimized vmdk (CLI: diskimg convert -O vmdk -o subformat=streamOptimized,...)
diskimg.convert("appliance.qcow2", "appliance-disk1.vmdk", out_format="vmdk",
                options={"subformat": "streamOptimized", "adapter_type": "lsilogic",
                         "hwversion": "14"})

with diskimg.open("appliance-disk1.vmdk") as vmdk:
    data = vmdk.info().to_json()["format-specific"]["data"]
    assert vmdk.format == "vmdk" and vmdk.size == SIZE
    assert data["create-type"] == "streamOptimized" and data["extents"][0]["compressed"]
    result = vmdk.check()  # also lints what VMware's importers reject
    assert result.exit_code == 0 and result.findings == [], result.findings
identical, _, message = diskimg.compare("appliance.qcow2", "appliance-disk1.vmdk")
assert identical, message
with open("appliance-disk1.vmdk", "rb") as f:
    head = f.read(65536)  # sparse header, then the embedded descriptor
assert head[:4] == b"KDMV" and int.from_bytes(head[4:8], "little") == 3  # VMware's version 3
assert b'ddb.adapterType = "lsilogic"' in head and b'ddb.virtualHWVersion = "14"' in head
vmdk_size = os.path.getsize("appliance-disk1.vmdk")
assert vmdk_size < 1 << 20  # zero grains are not stored; the rest is deflated
print(f"appliance-disk1.vmdk: {vmdk_size} bytes for a {SIZE >> 20} MiB disk, check clean")

# a minimal OVF descriptor: the disk's capacity and the file's size must be right
OVF = f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
          xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file1" ovf:href="appliance-disk1.vmdk" ovf:size="{vmdk_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{SIZE}"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance"><Info>An example appliance</Info></VirtualSystem>
</Envelope>
"""
with open("appliance.ovf", "w") as f:
    f.write(OVF)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


with open("appliance.mf", "w") as mf:
    for name in ("appliance.ovf", "appliance-disk1.vmdk"):
        mf.write(f"SHA256({name})= {sha256(name)}\n")

order = ["appliance.ovf", "appliance.mf", "appliance-disk1.vmdk"]
with tarfile.open("appliance.ova", "w", format=tarfile.USTAR_FORMAT) as ova:
    for name in order:
        ova.add(name)

# verify the OVA as an importer would: member order and manifest digests
with tarfile.open("appliance.ova") as ova:
    assert ova.getnames() == order
    manifest = ova.extractfile("appliance.mf").read().decode()
    for line in manifest.splitlines():
        name, digest = line[len("SHA256("):].split(")= ")
        assert hashlib.sha256(ova.extractfile(name).read()).hexdigest() == digest, name
print(f"appliance.ova: {os.path.getsize('appliance.ova')} bytes,", " + ".join(order))
