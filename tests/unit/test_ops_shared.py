"""The rules issue 16 wrote once: the zero test (``hostio.all_zero``), the worker-pool
factory (``hostio.workers``), the boolean option parser and the compat parser
(``options``), and the ``diskimg.operations`` -> ``diskimg.ops`` move."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import diskimg
from diskimg import operations, options
from diskimg.errors import UsageError
from diskimg.hostio import all_zero
from diskimg.hostio.workers import worker_pool

MiB = 1 << 20


@pytest.mark.parametrize("n", [0, 1, 511, 4096, MiB, MiB + 3, 3 * MiB - 1])
def test_all_zero_every_buffer_type_and_every_position(n: int) -> None:
    zero = bytes(n)
    for buf in (zero, bytearray(zero), memoryview(zero), memoryview(bytearray(zero))):
        assert all_zero(buf)
    for pos in sorted(p for p in {0, n // 2, n - 1, MiB, MiB - 1} if 0 <= p < n):
        data = bytearray(n)
        data[pos] = 0x80
        for buf in (bytes(data), data, memoryview(data), memoryview(data)[0:n]):
            assert not all_zero(buf), (n, pos, type(buf))
        if n % 8 == 0:  # a view with 8-byte items: compared by bytes, not by items
            assert not all_zero(memoryview(data).cast("Q"))
            assert all_zero(memoryview(bytearray(n)).cast("Q"))


def test_one_zero_test_under_its_old_names() -> None:
    assert operations.is_zero is all_zero
    from diskimg.ops.zero import is_zero

    assert is_zero is all_zero


def test_worker_pool_threads_are_named_and_at_least_one() -> None:
    names: list[str] = []
    with worker_pool(0, "unit") as pool:
        pool.submit(lambda: names.append(threading.current_thread().name)).result()
        assert pool._max_workers == 1
    assert names and names[0].startswith("diskimg-unit")


@pytest.mark.parametrize("value, want", [
    ("on", True), ("off", False), (True, True), (False, False), ("yes", True),
    ("TRUE", True), ("No", False), ("false", False)])
def test_parse_bool_library_spellings(value: object, want: bool) -> None:
    assert options.parse_bool("opt", value) is want


@pytest.mark.parametrize("value", ["yes", "true", "ON", "1", ""])
def test_parse_bool_strict_is_the_o_syntax(value: str) -> None:
    with pytest.raises(UsageError, match="Parameter 'lazy_refcounts' expects 'on' or 'off'"):
        options.parse_bool("lazy_refcounts", value, strict=True)
    with pytest.raises(UsageError, match="expects 'on' or 'off'"):
        options.validate("qcow2", [("lazy_refcounts", value)])
    assert options.validate("qcow2", [("lazy_refcounts", "on")]) == {"lazy_refcounts": "on"}


def test_parse_bool_refuses_other_words() -> None:
    with pytest.raises(UsageError, match="Parameter 'x' expects 'on' or 'off'"):
        options.parse_bool("x", "maybe")


@pytest.mark.parametrize("text, qapi, strict", [
    ("0.10", 2, 2), ("1.1", 3, 3), ("v2", 2, None), ("v3", 3, None), ("1.0", None, None),
    ("", None, None), ("V3", None, None)])
def test_compat_version(text: str, qapi: int | None, strict: int | None) -> None:
    assert options.compat_version(text) == qapi
    assert options.compat_version(text, qapi_names=False) == strict


def test_create_uses_the_shared_parsers(tmp_path: Path) -> None:
    """qcow2 and vmdk create take the library spellings; a bad value changes nothing."""
    diskimg.create(tmp_path / "a.qcow2", "qcow2", MiB,
                   options={"compat": "v2", "lazy_refcounts": "no"})
    diskimg.create(tmp_path / "b.qcow2", "qcow2", MiB, options={"compat": "0.10"})
    assert (tmp_path / "a.qcow2").read_bytes() == (tmp_path / "b.qcow2").read_bytes()
    with pytest.raises(UsageError, match="Parameter 'version' does not accept value '2'"):
        diskimg.create(tmp_path / "c.qcow2", "qcow2", MiB, options={"compat": "2"})
    with pytest.raises(UsageError, match="Parameter 'compat6' expects 'on' or 'off'"):
        diskimg.create(tmp_path / "d.vmdk", "vmdk", MiB, options={"compat6": "maybe"})
    assert not (tmp_path / "c.qcow2").exists() and not (tmp_path / "d.vmdk").exists()
    diskimg.create(tmp_path / "e.vmdk", "vmdk", MiB, options={"compat6": "Yes"})
    assert b'virtualHWVersion = "6"' in (tmp_path / "e.vmdk").read_bytes()[:MiB]


def test_amend_uses_the_shared_compat_parser(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    diskimg.create(p, "qcow2", MiB)
    before = p.read_bytes()
    with pytest.raises(UsageError, match="Unknown compatibility level 0.9"):
        diskimg.amend(p, {"compat": "0.9"})
    assert p.read_bytes() == before
    diskimg.amend(p, {"compat": "v2"})
    assert diskimg.info(p).format_specific["data"]["compat"] == "0.10"  # type: ignore[index, union-attr]
