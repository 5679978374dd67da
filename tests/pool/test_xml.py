"""libvirt storage XML: units, pool/volume round trips, output layout, hostile input."""

from __future__ import annotations

import pytest

from diskimg.errors import PoolError
from diskimg.pool.xml import (
    Permissions,
    PoolDef,
    VolumeDef,
    format_timestamp,
    parse_scaled,
    unit_scale,
)


@pytest.mark.parametrize(("unit", "scale"), [
    (None, 1), ("", 1), ("B", 1), ("b", 1), ("bytes", 1), ("byte", 1),
    ("KB", 1000), ("kb", 1000), ("K", 1024), ("k", 1024), ("KiB", 1024), ("kib", 1024),
    ("MB", 10**6), ("M", 1 << 20), ("MiB", 1 << 20),
    ("GB", 10**9), ("G", 1 << 30), ("GiB", 1 << 30),
    ("TB", 10**12), ("T", 1 << 40), ("TiB", 1 << 40),
    ("PB", 10**15), ("P", 1 << 50), ("PiB", 1 << 50),
    ("EB", 10**18), ("E", 1 << 60), ("EiB", 1 << 60),
])
def test_units_as_libvirt(unit: str | None, scale: int) -> None:
    assert unit_scale(unit) == scale


@pytest.mark.parametrize("unit", ["X", "KiBB", "Kb2", "kilo", "Z", "iB", "%"])
def test_unknown_units(unit: str) -> None:
    with pytest.raises(PoolError, match="unknown suffix"):
        unit_scale(unit)


def test_parse_scaled() -> None:
    assert parse_scaled("1KB") == 1000
    assert parse_scaled("1K") == 1024
    assert parse_scaled("10M") == 10 << 20
    assert parse_scaled("5") == 5
    assert parse_scaled("15EiB") == 15 << 60
    with pytest.raises(PoolError, match="unknown suffix 'X'"):
        parse_scaled("1X")
    with pytest.raises(PoolError, match="Malformed size"):
        parse_scaled("abc")
    with pytest.raises(PoolError, match="Malformed size"):
        parse_scaled("-1")
    with pytest.raises(PoolError, match="too large"):
        parse_scaled("16EiB")  # 2**64 does not fit libvirt's unsigned long long


def test_timestamps_as_libvirt_prints_them() -> None:
    assert format_timestamp(1481535271, 342162944) == "1481535271.342162944"
    assert format_timestamp(1481535271, 5) == "1481535271.000000005"
    assert format_timestamp(0, 0) == "0"


# A definition as libvirt 9 stores it (/etc/libvirt/storage/default.xml), with the
# warning comment, a label, and an element diskimg does not know (<refresh>, libvirt 3.4+).
LIBVIRT_DEFAULT = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh pool-edit default
or other application using the libvirt API.
-->

<pool type='dir'>
  <name>default</name>
  <uuid>3ea8e2e7-ad8b-4c63-9a3e-0f4c54b3f6a2</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
  </source>
  <target>
    <path>/var/lib/libvirt/images</path>
    <permissions>
      <mode>0711</mode>
      <owner>0</owner>
      <group>0</group>
      <label>system_u:object_r:virt_image_t:s0</label>
    </permissions>
  </target>
  <refresh>
    <volume allocation='capacity'/>
  </refresh>
</pool>
"""


def test_pool_round_trip_keeps_everything() -> None:
    d = PoolDef.from_xml(LIBVIRT_DEFAULT)
    assert d.name == "default"
    assert d.type == "dir"
    assert d.uuid == "3ea8e2e7-ad8b-4c63-9a3e-0f4c54b3f6a2"
    assert d.target_path == "/var/lib/libvirt/images"
    assert d.permissions == Permissions(0o711, 0, 0, "system_u:object_r:virt_image_t:s0")
    out = d.to_xml()
    assert out == LIBVIRT_DEFAULT.split("-->\n\n", 1)[1]
    assert PoolDef.from_xml(out).to_xml() == out


def test_pool_sizes_and_units_on_input() -> None:
    d = PoolDef.from_xml("<pool type='dir'><name>p</name><capacity unit='KB'>2</capacity>"
                         "<allocation unit='KiB'>2</allocation><available>7</available>"
                         "<target><path>/srv/p</path></target></pool>")
    assert (d.capacity, d.allocation, d.available) == (2000, 2048, 7)
    assert d.uuid is None
    # always written back as bytes
    out = d.to_xml(capacity=5, allocation=6, available=7)
    assert "<capacity unit='bytes'>5</capacity>" in out
    assert "<uuid>" not in out


NETFS_WITH_NAMESPACE = """<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>
  <name>nfsimages</name>
  <uuid>7ef2a4c5-2f0c-4bde-9c2b-2b8f1c0e1a11</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='nfs.example.com'/>
    <dir path='/export/images'/>
    <format type='nfs'/>
  </source>
  <target>
    <path>/var/lib/libvirt/nfs</path>
  </target>
  <fs:mount_opts>
    <fs:option name='sync'/>
  </fs:mount_opts>
</pool>
"""


def test_foreign_pool_types_and_namespaces_survive() -> None:
    d = PoolDef.from_xml(NETFS_WITH_NAMESPACE)
    assert d.type == "netfs"
    assert d.to_xml() == NETFS_WITH_NAMESPACE


# The volume example of libvirt's formatstorage documentation, in its spirit: units,
# permissions, encryption, compat, features and a backing store.
DOC_VOLUME = """<volume type='file'>
  <name>sparse.img</name>
  <key>/var/lib/libvirt/images/sparse.img</key>
  <allocation>0</allocation>
  <capacity unit="T">1</capacity>
  <physical unit='KiB'>4</physical>
  <target>
    <path>/var/lib/libvirt/images/sparse.img</path>
    <format type='qcow2'/>
    <permissions>
      <owner>107</owner>
      <group>107</group>
      <mode>0744</mode>
      <label>virt_image_t</label>
    </permissions>
    <timestamps>
      <atime>1341933637.273190990</atime>
      <mtime>1341930622.047245868</mtime>
      <ctime>1341930622.047245868</ctime>
    </timestamps>
    <encryption format='luks'>
      <secret type='passphrase' uuid='6c1ee3a6-3a6c-4b0e-8d7e-7b8b0cbb0a11'/>
    </encryption>
    <compat>1.1</compat>
    <clusterSize unit='KiB'>64</clusterSize>
    <nocow/>
    <features>
      <lazy_refcounts/>
    </features>
  </target>
  <backingStore>
    <path>/var/lib/libvirt/images/master.img</path>
    <format type='raw'/>
    <permissions>
      <owner>107</owner>
      <group>107</group>
      <mode>0744</mode>
      <label>virt_image_t</label>
    </permissions>
  </backingStore>
  <unknownExtension answer='42'>text</unknownExtension>
</volume>
"""


def test_volume_from_doc_xml() -> None:
    v = VolumeDef.from_xml(DOC_VOLUME)
    assert v.name == "sparse.img"
    assert v.capacity == 1 << 40
    assert v.allocation == 0
    assert v.physical == 4096
    assert v.format == "qcow2"
    assert v.permissions == Permissions(0o744, 107, 107, "virt_image_t")
    assert v.encryption is not None and v.encryption.format == "luks"
    assert v.encryption.secret_uuid == "6c1ee3a6-3a6c-4b0e-8d7e-7b8b0cbb0a11"
    assert v.compat == "1.1"
    assert v.cluster_size == 65536
    assert v.features == ["lazy_refcounts"]
    assert v.backing is not None and v.backing.path == "/var/lib/libvirt/images/master.img"
    assert v.backing.format == "raw"
    out = v.to_xml()
    # normalised the libvirt way, unknown elements kept
    assert "<capacity unit='bytes'>1099511627776</capacity>" in out
    assert "<clusterSize unit='B'>65536</clusterSize>" in out
    assert "<nocow/>" not in out  # a creation-time hint libvirt does not print back
    assert "<unknownExtension answer='42'>text</unknownExtension>" in out
    assert "<mode>0744</mode>" in out
    again = VolumeDef.from_xml(out)
    assert again.to_xml() == out


def test_volume_minimal_and_order() -> None:
    v = VolumeDef.from_xml("<volume><name>a.qcow2</name><capacity unit='G'>1</capacity>"
                           "<target><format type='qcow2'/><features/></target></volume>")
    assert v.features == []
    assert v.compat is None
    assert v.to_xml() == (
        "<volume>\n  <name>a.qcow2</name>\n"
        "  <capacity unit='bytes'>1073741824</capacity>\n"
        "  <target>\n    <format type='qcow2'/>\n    <features/>\n  </target>\n</volume>\n")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<pool type='dir'><name>&lol9;</name><target><path>/x</path></target></pool>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE pool [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<volume><name>&xxe;</name><capacity>1</capacity></volume>
"""


@pytest.mark.parametrize("text", [BILLION_LAUGHS, EXTERNAL_ENTITY,
                                  BILLION_LAUGHS.encode(), "<!doctype pool><pool/>",
                                  # the DOCTYPE check must see through other encodings
                                  BILLION_LAUGHS.encode("utf-16"),
                                  b"\xfe\xff" + EXTERNAL_ENTITY.encode("utf-16-be"),
                                  BILLION_LAUGHS.encode("utf-32"),
                                  BILLION_LAUGHS.encode("utf-8-sig"),
                                  "<?xml version='1.0'?>\n<!DOCTYPE pool SYSTEM 'x.dtd'><pool/>"])
def test_hostile_xml_refused(text: str | bytes) -> None:
    for parse in (PoolDef.from_xml, VolumeDef.from_xml):
        with pytest.raises(PoolError, match="DOCTYPE"):
            parse(text)


@pytest.mark.parametrize(("text", "msg"), [
    ("<pool type='dir'><name>p</name>", "not well-formed"),
    ("", "not well-formed"),
    ("<volume><name>v</name></volume>", "unexpected root"),
    ("<pool><name>p</name><target><path>/x</path></target></pool>", "missing type"),
    ("<pool type='dir'><target><path>/x</path></target></pool>", "missing pool"),
    ("<pool type='dir'><name>a/b</name><target><path>/x</path></target></pool>", "'/'"),
    ("<pool type='dir'><name>..</name><target><path>/x</path></target></pool>", "invalid"),
    ("<pool type='dir'><name>p</name></pool>", "target path"),
    ("<pool type='dir'><name>p</name><uuid>nope</uuid><target><path>/x</path></target>"
     "</pool>", "uuid"),
    ("<pool type='dir'><name>p</name><capacity unit='X'>1</capacity>"
     "<target><path>/x</path></target></pool>", "unknown suffix"),
    ("<pool type='dir'><name>p</name><target><path>/x</path><permissions><mode>999</mode>"
     "</permissions></target></pool>", "octal"),
])
def test_bad_pool_xml(text: str, msg: str) -> None:
    with pytest.raises(PoolError, match=msg):
        PoolDef.from_xml(text)


@pytest.mark.parametrize(("text", "msg"), [
    ("<volume><capacity>1</capacity></volume>", "missing volume name"),
    ("<volume><name>../etc/passwd</name><capacity>1</capacity></volume>", "cannot contain"),
    ("<volume><name>..</name><capacity>1</capacity></volume>", "invalid volume name"),
    ("<volume><name>v</name><capacity>1.5</capacity></volume>", "malformed capacity"),
    ("<volume><name>v</name><capacity unit='Q'>1</capacity></volume>", "unknown suffix"),
    ("<volume><name>v</name><capacity>1</capacity><target><compat>1.1;rm</compat></target>"
     "</volume>", "compat"),
    ("<volume><name>v</name><capacity>1</capacity><target><features><bogus/></features>"
     "</target></volume>", "unsupported feature"),
    ("<volume><name>v</name><capacity>1</capacity><backingStore/></volume>",
     "backing store path"),
])
def test_bad_volume_xml(text: str, msg: str) -> None:
    with pytest.raises(PoolError, match=msg):
        VolumeDef.from_xml(text)


def test_encodings_of_xml_bytes() -> None:
    """Bytes are decoded by their BOM (UTF-8 without one), strictly: what libvirt reads."""
    doc = "<volume><name>vé.raw</name><capacity>1</capacity></volume>"
    for enc in ("utf-8", "utf-8-sig", "utf-16", "utf-32"):
        assert VolumeDef.from_xml(doc.encode(enc)).name == "vé.raw"
    for enc in ("utf-16-be", "utf-16-le", "utf-32-le"):  # no BOM: refused, whatever it says
        with pytest.raises(PoolError, match="NUL characters"):
            VolumeDef.from_xml(BILLION_LAUGHS.encode(enc))
    with pytest.raises(PoolError, match=r"not valid UTF-8 \(byte 14"):
        VolumeDef.from_xml(b"<volume><name>\xff</name><capacity>1</capacity></volume>")


def test_text_with_a_lone_surrogate_is_refused_in_its_own_words() -> None:
    """A Python caller's XML text holding a lone surrogate (text no decoding of bytes
    gives: a name from os.fsdecode of non-UTF-8 bytes) is refused as a PoolError naming
    the character, not with the codec's words from inside ElementTree."""
    doc = "<pool type='dir'><name>p\udcff</name><target><path>/x</path></target></pool>"
    with pytest.raises(PoolError, match=r"^XML error: pool XML holds a lone surrogate at "
                                        r"character 24 \(text that no decoding"):
        PoolDef.from_xml(doc)
    with pytest.raises(PoolError, match="lone surrogate at character 14"):
        VolumeDef.from_xml("<volume><name>\udcff</name><capacity>1</capacity></volume>")
