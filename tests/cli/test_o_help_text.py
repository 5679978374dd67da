"""Every ``-o`` option has help text: the option tables (create/convert for qcow2, raw,
vmdk, luks and the host-file protocol; amend for qcow2 and luks) give each option a
description, and ``-o help`` prints the same text as qemu-img 7.2."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from qemukit import QEMU

from diskimg import options
from diskimg.cli.main import main
from diskimg.luks import AMEND_HELP as LUKS_AMEND_HELP
from diskimg.qcow2.amend_plan import AMEND_HELP as QCOW2_AMEND_HELP, AMENDABLE

from .conftest import needs_qemu

TABLES = {**{f"create {fmt}": descs for fmt, descs in options.FORMAT_OPTIONS.items()},
          "protocol file": options.PROTOCOL_OPTIONS}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_create_option_has_a_description(table: str) -> None:
    missing = [d.name for d in TABLES[table] if len(d.help.strip()) < 10]
    assert missing == []


@pytest.mark.parametrize("text", [QCOW2_AMEND_HELP, LUKS_AMEND_HELP], ids=["qcow2", "luks"])
def test_every_amend_option_has_a_description(text: str) -> None:
    lines = text.splitlines()[1:]
    rows = [re.fullmatch(r"  (\S+)=<(str|num|size|bool \(on/off\))> +- (.{10,})", ln)
            for ln in lines]
    assert all(rows), [ln for ln, m in zip(lines, rows, strict=True) if not m]
    if text is QCOW2_AMEND_HELP:
        assert [m.group(1) for m in rows if m] == list(AMENDABLE)


def _mine(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(list(args))
    return rc, out.getvalue()


HELP = [["create", "-f", fmt, "-o", "help"] for fmt in ("qcow2", "raw", "vmdk", "luks")] + [
    ["amend", "-f", "qcow2", "-o", "help"], ["amend", "-f", "luks", "-o", "help"],
    ["convert", "-O", "luks", "-o", "help"],
]


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_o_help_matches_qemu(args: list[str]) -> None:
    want = QEMU.img(*args)
    rc, got = _mine(*args)
    assert (rc, got) == (0, want.stdout)
    assert " - " in got
