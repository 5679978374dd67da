"""Hypothesis mutation fuzzing of qemu-made vmdk images (monolithicSparse, streamOptimized).

Same sandboxed pipeline as test_fuzz_qcow2.py (robust_worker.py); mutations target the
SparseExtentHeader (and the streamOptimized footer copy), the embedded descriptor's lines,
the grain directory / redundant grain directory and grain tables, grain and metadata
markers, plus random byte flips in those regions and truncations (MALICIOUS-INPUTS.md
V1-V8, V12).  Skips while ``diskimg.open`` says vmdk is not implemented.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import robustlib

import diskimg

pytestmark = pytest.mark.qemu

EXAMPLES = 80
KINDS = ["monolithicSparse", "streamOptimized"]


@pytest.fixture(scope="module")
def bases(vmdk_bases: dict) -> dict:
    for base in vmdk_bases.values():
        try:
            diskimg.open(base.path).close()
        except diskimg.DiskImgError as e:
            if "not implemented" in str(e):
                pytest.skip(f"diskimg cannot open vmdk yet: {e}")
            raise
    return vmdk_bases


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_vmdk(kind: str, bases: dict, worker: robustlib.Worker,
                      tmp_path: Path) -> None:
    seen = robustlib.fuzz_kind(bases[kind], worker, tmp_path, robustlib.fuzz_examples(EXAMPLES))
    print(f"{kind}: {sum(seen.values())} inputs: {dict(seen)}")


@pytest.mark.parametrize("kind", KINDS)
def test_vmdk_base_image_is_clean(kind: str, bases: dict, worker: robustlib.Worker,
                                  tmp_path: Path) -> None:
    base = bases[kind]
    img = tmp_path / base.path.name
    img.write_bytes(base.data)
    rep = worker.run(robustlib.make_job(base, img, tmp_path))
    assert not rep["bugs"], rep
    for s in rep["steps"]:
        # writing into a streamOptimized image that already holds data is refused by design
        ok = s[1] == "ok" or (kind == "streamOptimized" and s[0] == "open r+"
                              and "read-only" in s[3])
        assert ok, rep["steps"]
    assert len(base.layout.fields) > 20 and base.layout.regions
