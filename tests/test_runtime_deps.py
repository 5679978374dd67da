"""``pip install diskimg`` brings cryptography and zstandard and nothing else: object
storage (fsspec, s3fs), numpy and the test tools are extras."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep, 1)[0]
    return req.lower()


def test_runtime_dependencies_are_exactly_two() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(_name(r) for r in project["dependencies"]) == ["cryptography", "zstandard"]
    remote = {_name(r) for r in project["optional-dependencies"]["remote"]}
    assert remote == {"fsspec", "s3fs"}
    assert {"fsspec", "s3fs", "moto", "dask"} <= \
        {_name(r) for r in project["optional-dependencies"]["test"]}
