"""The vmdk descriptor's line grammar, read without the re module (start-up, issue 20):
the hand-written readers of diskimg.vmdk.descriptor (key lines) and diskimg.vmdk.extent_line
(extent lines) give exactly what the regular expressions they replaced gave, on the
descriptor lines they are used for (a line holds no newline).
The expressions below are the specification, written once here."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from diskimg.errors import FormatError
from diskimg.vmdk.descriptor import Descriptor, _key_value
from diskimg.vmdk.extent_line import ExtentLine, _extent_fields

EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(-?\d+)\s+([A-Za-z]+)'
                    r'(?:\s+"([^"\r\n]*)"(?:\s+(-?\d+))?)?\s*$')
KEY = re.compile(r'^\s*([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$')
HEX = re.compile(r"\s*([0-9a-fA-F]+)")

#: pieces of descriptor lines, and of lines that almost are: the access words and near
#: misses, numbers (a minus, a non-ASCII decimal digit, a superscript that is a digit but
#: not a decimal), types, quotes, every kind of whitespace re's \s and str.isspace() know
#: in latin-1 (the descriptor's decoding), key characters and the characters around them
PIECES = ["RW", "RDONLY", "NOACCESS", "RWX", "R", "NO", "10", "7", "-", "-5", "0", "\u0663",
          "\u00b2", "SPARSE", "FLAT", "ZERO", "\u00e9", "x", "Z9", '"', '"a b"', '"f.vmdk"',
          '"x\ry"', " ", "  ", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
          "=", ".", "_", "ddb.x", "CID", "\x00", "ab", "#", "fF", "g"]

lines = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


def _spec_extent(line: str) -> tuple[str | None, ...] | None:
    m = EXTENT.match(line)
    return m.groups() if m else None


def _spec_key(line: str) -> tuple[str, str] | None:
    m = KEY.match(line)
    return (m.group(1), m.group(2)) if m else None


@pytest.mark.parametrize("line", [
    'RW 4192256 SPARSE "a-s001.vmdk"', 'RDONLY 100 FLAT "a-f.vmdk" 7', "RW 8 ZERO",
    '  NOACCESS\t-3 VMFS "x y" -9 \r', 'RW 8 SPARSE"f"', 'RW 8 SPARSE "f"9', 'RW 8 SPARSE "f',
    'RW 8 SPARSE "a\rb"', "RW 8 SPARSE 7", 'RW 8 SPARSE "f" 7 8', "RW8 ZERO", "RW 8", "RW",
    "RW \u0663 ZERO", "RW \u00b2 ZERO", "RW 8 ZER0", "RW 8 Z\u00e9RO", '\xa0RW\x85 8\x1c ZERO\x0c',
    'RW 8 ZERO ""', 'RW 8 ZERO "" ', 'RW 8 ZERO "" -', "RWX 8 ZERO", "", " ",
])
def test_extent_lines_read_as_the_expression_reads_them(line: str) -> None:
    assert _extent_fields(line) == _spec_extent(line)


@pytest.mark.parametrize("line", [
    "version=1 ", 'createType="monolithicSparse"', "  ddb.geometry.heads = \"16\"\r",
    "CID=a454774a", "key =", "key=  ", "=value", " = v", "a b=c", "k\xa0=\x85v\x85",
    "k==v", "#CID=1", "k.9_x=\"v\" # comment ", "", "k",
])
def test_key_lines_read_as_the_expression_reads_them(line: str) -> None:
    assert _key_value(line) == _spec_key(line)


@given(lines)
@example('RW 8 SPARSE "f" \u0663\u0663 ')
def test_any_line_reads_as_the_expressions_read_it(line: str) -> None:
    assert _extent_fields(line) == _spec_extent(line)
    assert _key_value(line) == _spec_key(line)


@given(lines)
@example(" \t00A4g")
def test_cid_values_read_as_the_expression_reads_them(value: str) -> None:
    """``CID`` / ``parentCID``: leading whitespace, hex digits (16 at most used), the rest
    ignored; no hex digit is a FormatError naming the key."""
    d = Descriptor([f"CID={value}"])
    got = d.get("CID")  # the value as the key grammar reads it, unquoted
    assert got is not None
    m = HEX.match(got)
    if m is None:
        with pytest.raises(FormatError, match="Invalid CID value"):
            _ = d.cid
    else:
        assert d.cid == int(m.group(1)[:16], 16) & 0xFFFFFFFF


def test_a_descriptor_reads_its_extents_and_keys_as_before() -> None:
    text = (b'# Disk DescriptorFile\nversion=1\nCID= 00fe\r\nparentCID=ffffffff\n'
            b'createType = "vmfs"\n\nRW 100 VMFS "a.vmdk"\r\nRDONLY 4 FLAT "b c.vmdk" 2\n'
            b'NOACCESS 8 ZERO\nddb.adapterType = "ide"\nddb.uuid="1 2"')
    d = Descriptor.parse(text)
    assert d.extents == [ExtentLine("RW", 100, "VMFS", "a.vmdk"),
                         ExtentLine("RDONLY", 4, "FLAT", "b c.vmdk", 2),
                         ExtentLine("NOACCESS", 8, "ZERO")]
    assert (d.cid, d.parent_cid, d.create_type) == (0xFE, 0xFFFFFFFF, "vmfs")
    assert d.ddb() == {"ddb.adapterType": "ide", "ddb.uuid": "1 2"}
    assert d.pack() == text
    with pytest.raises(FormatError, match="Invalid extent line 2"):
        Descriptor.parse(b'version=1\nRW 100 VMFS "a.vmdk" x\n')
