"""diskimg.hostio.path_name: ``str(pathlib.Path(p))`` without importing pathlib (issue 20
start-up).  Every message naming an image file, ``info``'s ``image:`` line and a check
report's filename use it, so it must print exactly what pathlib printed before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from diskimg.hostio import open_host_file, path_name


@example("")
@example("/")
@example("//")
@example("///")
@example("//a//b/")
@example("./a/./b/.")
@example("a/../b")
@example("..")
@example(".")
@given(st.text(alphabet=["/", ".", "a", " ", "é", "\udcff"], max_size=12))
def test_path_name_is_pathlibs_str(name: str) -> None:
    assert path_name(name) == str(Path(name))
    assert path_name(Path(name)) == str(Path(name))


def test_bytes_are_refused_as_pathlib_refuses_them() -> None:
    with pytest.raises(TypeError):
        Path(b"a")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        path_name(b"a")  # type: ignore[arg-type]


def test_a_host_file_names_itself_as_pathlib_did(tmp_path: Path) -> None:
    f = tmp_path / "x.img"
    f.write_bytes(b"\0" * 512)
    odd = f"{tmp_path}//./x.img"
    with open_host_file(odd) as hf:
        assert hf.name == str(Path(odd)) == str(f)
        assert hf.path == f and isinstance(hf.path, Path)
        assert hf.pread(0, 4) == b"\0" * 4
    os.unlink(f)
