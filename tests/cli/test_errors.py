"""diskimg.cli.errors: each structured library error → qemu-img's exact words.

The library raises errors that say which file (``path``), which operation
(``operation``) and why (``reason``), with further lines as ``notes``; the CLI words them
in one module.  The unit tests build each error as the library raises it and compare the
whole stderr text; the parity tests at the end run both programs on the same failing
command and compare stderr byte for byte, and check the refusal changed no file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import diskimg
from diskimg.cli import errors
from diskimg.errors import (BackingChainError, CorruptImageError, DiskImgError,
                            ImageLockedError, UsageError, WrongFormatError)
from diskimg.units import SIZE_HELP

from .conftest import Result, needs_qemu, qemu

TRY = "Try 'diskimg --help' for more information"


# --- the library's errors carry their fields; str() is the message as before ---------


def test_missing_file_error_names_path_operation_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(DiskImgError) as ei:
        diskimg.open(missing)
    e = ei.value
    assert str(e) == f"Could not open '{missing}': No such file or directory"
    assert (e.path, e.operation, e.reason) == (str(missing), "open",
                                               "No such file or directory")


def test_missing_backing_file_error_names_the_backing_file(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    diskimg.create(top, "qcow2", 1 << 20, backing_file="gone.qcow2", backing_fmt="qcow2",
                   unsafe=True)
    with pytest.raises(BackingChainError) as ei:
        diskimg.open(top)
    e = ei.value
    assert (e.path, e.operation, e.reason) == (str(tmp_path / "gone.qcow2"),
                                               "open backing file",
                                               "No such file or directory")
    assert str(e) == (f"Could not open backing file '{tmp_path / 'gone.qcow2'}' named by "
                      f"'{top}': No such file or directory")


def test_size_error_is_marked_as_a_size() -> None:
    with pytest.raises(UsageError) as ei:
        diskimg.units.parse_size("12x")
    assert str(ei.value) == SIZE_HELP and ei.value.field == "size"


def test_fields_default_to_none_and_lock_errors_stay_oserrors() -> None:
    e = CorruptImageError("L1 table overlaps", offset=48)
    assert (e.path, e.operation, e.reason, e.field, e.notes, e.offset) == \
        (None, None, None, None, (), 48)
    locked = ImageLockedError(11, "Failed to get shared \"write\" lock")
    assert locked.errno == 11 and locked.path is None


# --- render: the whole stderr text and exit code ----------------------------------------


@pytest.mark.parametrize("error, text, code", [
    (DiskImgError("Could not open 'a': Is a directory"),
     "diskimg: Could not open 'a': Is a directory\n", 1),
    # a second line of the message itself has no prefix ...
    (DiskImgError("f: Could not open 'b': No such file or directory\n"
                  "Could not open backing image."),
     "diskimg: f: Could not open 'b': No such file or directory\n"
     "Could not open backing image.\n", 1),
    # ... a note has one (qemu's second error_report)
    (UsageError("Invalid parameter 'snapshot.x'",
                notes=("Failed in parsing snapshot param 'snapshot.x=1'",)),
     "diskimg: Invalid parameter 'snapshot.x'\n"
     "diskimg: Failed in parsing snapshot param 'snapshot.x=1'\n", 1),
    # a size that does not parse: every line is prefixed
    (UsageError(SIZE_HELP, field="size"),
     "diskimg: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
     "diskimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n", 1),
    (errors.CommandLineError("Expecting one image file name"),
     f"diskimg: Expecting one image file name\n{TRY}\n", 1),
    (errors.ExitCode("This image format does not support checks", 63),
     "diskimg: This image format does not support checks\n", 63),
    (errors.ExitCode("Use the --shrink option to perform a shrink operation.", 1,
                     notes=("warning: Shrinking an image will delete all data",)),
     "diskimg: Use the --shrink option to perform a shrink operation.\n"
     "diskimg: warning: Shrinking an image will delete all data\n", 1),
    (errors.ExitCode("x: Backing file specified without backing format\n"
                     "Detected format of qcow2.", 1, newline=False),
     "diskimg: x: Backing file specified without backing format\n"
     "Detected format of qcow2.", 1),
    (FileNotFoundError(2, "No such file or directory", "f.raw"),
     "diskimg: Could not open 'f.raw': No such file or directory\n", 1),
    (KeyboardInterrupt(), "diskimg: interrupted\n", 130),
    (ZeroDivisionError("division by zero"),
     "diskimg: internal error: ZeroDivisionError: division by zero\n", 1),
])
def test_render(error: BaseException, text: str, code: int) -> None:
    assert errors.render(error) == (text, code)


def test_command_line_error_is_followed_by_the_help_hint() -> None:
    text, code = errors.render(errors.CommandLineError("Cannot mix '-l', '-a', '-c', '-d'"))
    assert text == f"diskimg: Cannot mix '-l', '-a', '-c', '-d'\n{TRY}\n" and code == 1
    assert errors.usage_text("unrecognized option '--x'") == \
        f"diskimg: unrecognized option '--x'\n{TRY}\n"


# --- open, create, actions ----------------------------------------------------------------


def _missing_backing() -> BackingChainError:
    return BackingChainError("Could not open backing file '/d/b.qcow2' named by '/d/t.qcow2': "
                             "No such file or directory", path="/d/b.qcow2",
                             operation=errors.OPEN_BACKING, reason="No such file or directory")


def test_open_failure_of_a_missing_backing_file() -> None:
    e = errors.open_failure("t.qcow2", _missing_backing(), None)
    assert isinstance(e, BackingChainError)
    assert str(e) == ("Could not open 't.qcow2': Could not open backing file: Could not open "
                      "'/d/b.qcow2': No such file or directory")
    assert (e.path, e.operation) == ("t.qcow2", "open")


def test_open_failure_keeps_class_and_offset() -> None:
    e = errors.open_failure("x", CorruptImageError("L1 table is too large", offset=36), "qcow2")
    assert isinstance(e, CorruptImageError) and e.offset == 36
    assert str(e) == "Could not open 'x': L1 table is too large"
    os_err = errors.open_failure("y", PermissionError(13, "Permission denied"), None)
    assert str(os_err) == "Could not open 'y': Permission denied"


def test_open_failure_not_a_vmdk_only_with_f_vmdk() -> None:
    wrong = WrongFormatError("Not a VMDK image", offset=0, field="format")
    assert str(errors.open_failure("r", wrong, "vmdk")) == \
        "Could not open 'r': invalid VMDK image descriptor"
    assert str(errors.open_failure("r", wrong, None)) == "Could not open 'r': Not a VMDK image"


def test_chain_open_failure_names_the_backing_file_twice() -> None:
    outer = errors.open_failure("t.qcow2", _missing_backing(), None)
    outer.__cause__ = _missing_backing()
    e = errors.chain_open_failure(outer)
    assert e is not None and str(e) == ("Could not open '/d/b.qcow2': Could not open "
                                        "'/d/b.qcow2': No such file or directory")
    blamed = CorruptImageError("Could not open backing file: bad magic")
    blamed.backing_path, blamed.backing_reason = "/d/b.qcow2", "bad magic"
    e = errors.chain_open_failure(blamed)
    assert e is not None and str(e) == "Could not open '/d/b.qcow2': bad magic"
    assert errors.chain_open_failure(CorruptImageError("top is bad")) is None


def test_create_reason() -> None:
    opened = DiskImgError("Could not open 'd/x': Is a directory", path="d/x",
                          operation="open", reason="Is a directory")
    assert errors.create_reason(opened, "d/x") == "Could not create 'd/x': Is a directory"
    assert errors.create_reason(opened, "other", exact=True) == str(opened)
    assert errors.create_reason(PermissionError(13, "Permission denied"), "p") == \
        "Could not create 'p': Permission denied"
    assert errors.create_reason(CorruptImageError("no"), "p") == "no"


def test_backing_open_reason_uses_the_name_given() -> None:
    e = DiskImgError("Could not open '/abs/b': Permission denied", path="/abs/b",
                     operation="open", reason="Permission denied")
    assert errors.backing_open_reason(e, "/abs/b", "b") == "Could not open 'b': Permission denied"
    assert errors.backing_open_reason(e, "/abs/c", "c") == str(e)


def test_action_and_snapshot_load_and_exit_code() -> None:
    e = errors.action_failure("delete snapshot 's1'", DiskImgError("snapshot not found"))
    assert str(e) == "Could not delete snapshot 's1': snapshot not found"
    assert str(errors.snapshot_load_failure(CorruptImageError("bad table"))) == \
        "Failed to load snapshot: bad table"
    assert str(errors.snapshot_load_failure(
        DiskImgError("Failed to load snapshot: Can't find snapshot",
                     operation="load snapshot"))) == \
        "Failed to load snapshot: Can't find snapshot"
    noted = errors.with_notes(UsageError("a"), "b")
    assert errors.render(errors.exit_code(noted, 2)) == ("diskimg: a\ndiskimg: b\n", 2)


# --- the same failing command through both programs ----------------------------------------


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file()}


def _both(tmp_path: Path, di, setup, args: list[str]) -> tuple[Result, Result]:
    """Run ``args`` with qemu-img and diskimg in twin directories prepared by ``setup``;
    every file must be byte-identical after the refusal."""
    res = []
    for tool in ("qemu", "diskimg"):
        d = tmp_path / tool
        d.mkdir()
        setup(d)
        before = _digests(d)
        r = qemu(*args, cwd=d) if tool == "qemu" else di(*args, cwd=d)
        assert _digests(d) == before, tool
        res.append(r)
    return res[0], res[1]


def _top_over_missing(d: Path) -> None:
    diskimg.create(d / "top.qcow2", "qcow2", 1 << 20, backing_file="gone.qcow2",
                   backing_fmt="qcow2", unsafe=True)


def _raw(d: Path) -> None:
    with open(d / "r.raw", "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(1 << 20)


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("setup, args", [
    (_top_over_missing, ["compare", "top.qcow2", "top.qcow2"]),
    (_top_over_missing, ["info", "--backing-chain", "top.qcow2"]),
    (_top_over_missing, ["map", "top.qcow2"]),
    (_raw, ["info", "-f", "vmdk", "r.raw"]),
    (_raw, ["resize", "-f", "raw", "r.raw", "4k"]),
    (_raw, ["map", "--start-offset=12x", "r.raw"]),
    (_raw, ["measure", "-O", "qcow2", "-l", "snapshot.x=1", "r.raw"]),
    (_raw, ["measure", "-O", "qcow2", "-o", "cluster_size=3", "--size", "1M"]),
    (_raw, ["create", "-f", "qcow2", "-b", "r.raw", "new.qcow2"]),
    (_raw, ["create", "-f", "qcow2", "-b", "missing.raw", "-F", "raw", "new.qcow2"]),
    (_raw, ["snapshot", "-l", "-c", "s", "r.raw"]),
])
def test_same_words_as_qemu_img(tmp_path: Path, di, setup, args: list[str]) -> None:
    q, d = _both(tmp_path, di, setup, args)
    assert q.rc != 0 and q.err  # a failure, not a success that prints nothing
    assert (d.rc, d.err) == (q.rc, q.err.replace(str(tmp_path / "qemu"),
                                                 str(tmp_path / "diskimg")))
