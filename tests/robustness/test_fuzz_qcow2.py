"""Hypothesis mutation fuzzing of small valid qcow2 images (MALICIOUS-INPUTS.md §6).

For every kind of base image (qemu-made v3, v2, 64k clusters with 64-bit refcounts and lazy
refcounts, compressed zlib and zstd, extended L2, internal snapshots, a backing file, LUKS;
diskimg-made v3 with a compressed cluster and a snapshot, diskimg-made v2 with a snapshot)
hypothesis draws 1-4 mutations: targeted values for known fields (header, extensions,
backing name, L1/L2 entries, refcount table/blocks, snapshot table, LUKS header and key
slots — boundaries, bit flips, other tables' offsets, file size) and random byte flips
inside the metadata regions, plus truncations.  Each mutated image runs through
``robust_worker.py`` (API open/info/read/map/check, ``check(repair="all")`` on an ``"r+"``
copy, CLI ``info``/``check``/``convert -O raw``) in a subprocess limited to 1 GiB of
address space and 20 s per image.  Every outcome must be success or a ``DiskImgError`` with
a message; see robust_worker.py for the full list of checks.

CI budget: ``EXAMPLES`` per kind (about 60 s for the file on 2 cores).  Deeper runs:
``DISKIMG_FUZZ_EXAMPLES=2000`` or ``HYPOTHESIS_PROFILE=thorough``, or ``fuzz/run_long.sh``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import robustlib

pytestmark = pytest.mark.qemu

EXAMPLES = 60
KINDS = ["qemu-v3", "qemu-v2", "qemu-v3-64k-rc64", "qemu-compressed-zlib",
         "qemu-compressed-zstd", "qemu-extl2", "qemu-snapshots", "qemu-backing", "qemu-luks",
         "diskimg-v3", "diskimg-v2-snap"]


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_qcow2(kind: str, qcow2_bases: dict, worker: robustlib.Worker,
                       tmp_path: Path) -> None:
    seen = robustlib.fuzz_kind(qcow2_bases[kind], worker, tmp_path,
                               robustlib.fuzz_examples(EXAMPLES))
    print(f"{kind}: {sum(seen.values())} inputs: {dict(seen)}")


@pytest.mark.parametrize("kind", KINDS)
def test_base_image_is_clean(kind: str, qcow2_bases: dict, worker: robustlib.Worker,
                             tmp_path: Path) -> None:
    """The unmutated base opens, reads, maps, checks clean, converts: the fuzzer starts
    from images diskimg fully handles, so refusals are caused by the mutations."""
    base = qcow2_bases[kind]
    for f in base.extra:
        shutil.copyfile(f, tmp_path / f.name)
    img = tmp_path / base.path.name
    img.write_bytes(base.data)
    rep = worker.run(robustlib.make_job(base, img, tmp_path))
    assert not rep["bugs"], rep
    assert all(s[1] == "ok" for s in rep["steps"]), rep["steps"]
    assert rep["info"]["check"] == 0 and rep["info"]["repair"] == 0
    assert len(base.layout.fields) > 30 and base.layout.regions


@pytest.mark.parametrize("what", ["hang", "alloc", "crash", "wrong", "empty"])
def test_harness_detects_planted_failures(what: str, tmp_path: Path) -> None:
    """The sandbox reports a hang, an allocation over the limit, a dead interpreter, a
    non-DiskImgError exception and an empty error message as bugs."""
    w = robustlib.Worker(mem_mb=512, time_limit=1.0, grace=5.0)
    try:
        rep = w.run({"image": str(tmp_path / "x"), "workdir": str(tmp_path),
                     "selftest": what})
        assert rep["bugs"], rep
        words = {"hang": "time limit", "alloc": "MemoryError", "crash": "worker died",
                 "wrong": "ValueError", "empty": "empty message"}[what]
        assert words in "\n".join(rep["bugs"])
        # and the worker is usable again afterwards
        rep2 = w.run({"image": str(tmp_path / "x"), "workdir": str(tmp_path),
                      "selftest": "wrong"})
        assert "ValueError" in "\n".join(rep2["bugs"])
    finally:
        w.close()
