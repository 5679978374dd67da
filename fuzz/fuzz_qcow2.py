#!/usr/bin/env python3
"""atheris (libFuzzer) harness for diskimg's qcow2 reader — deeper runs, not CI.

    pip install atheris                       # needs clang/libFuzzer; not a diskimg dependency
    python fuzz/fuzz_qcow2.py --make-corpus fuzz/corpus/qcow2   # seed images (qemu-img + diskimg)
    python fuzz/fuzz_qcow2.py fuzz/corpus/qcow2 -timeout=10 -rss_limit_mb=1024 \
        -max_len=300000 -artifact_prefix=fuzz/findings/qcow2-

Each input is written to a file and run through the same pipeline as the CI fuzzer
(tests/robustness/robust_worker.py, in-process): ``diskimg.open`` + ``info()`` + full read
+ ``map()`` + ``check()``, ``check(repair="all")`` on an ``"r+"`` copy, and the CLI's
``info``/``check``/``convert -O raw``.  Any outcome other than success or a DiskImgError
with a message (another exception, a CLI traceback, a modified source, an oversized
output) raises, which libFuzzer records as a crash with the input; ``-timeout`` and
``-rss_limit_mb`` catch hangs and runaway allocations.  Known, reported bugs
(tests/robustness/robustlib.py KNOWN_BUGS) are not re-reported unless
``DISKIMG_FUZZ_NO_WORKAROUNDS=1``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "robustness"))
sys.path.insert(0, str(ROOT / "tests"))  # qemukit: the one qemu-img/qemu-io runner

FORMAT = "qcow2"


def make_corpus(dest: Path, vmdk: bool = False) -> None:
    import robustlib

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        bases = (robustlib.build_vmdk_bases(Path(t)) if vmdk
                 else robustlib.build_qcow2_bases(Path(t)))
        for name, b in bases.items():
            if b.luks or b.extra:
                continue  # need a secret / a backing file beside them: CI fuzzer covers them
            (dest / f"{name}.{b.fmt}").write_bytes(b.data)
    print(f"wrote {len(list(dest.iterdir()))} seed images to {dest}")


def harness(fmt: str) -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]), vmdk=fmt == "vmdk")
        return
    import atheris

    with atheris.instrument_imports(include=["diskimg"]):
        import diskimg
        import diskimg.cli.main
        import diskimg.qcow2.check
        import diskimg.qcow2.image
        import diskimg.vmdk  # noqa: F401
    import signal

    import robust_worker
    import robustlib

    signal.signal(signal.SIGALRM, robust_worker._alarm)

    wd = Path(tempfile.mkdtemp(prefix=f"atheris-{fmt}-", dir="/dev/shm"
                               if os.path.isdir("/dev/shm") else None))
    img = wd / f"input.{fmt}"
    dummy = robustlib.BaseImage("atheris", img, fmt, b"", robustlib.Layout())

    def one(data: bytes) -> None:
        img.write_bytes(data)
        job = {"image": str(img), "workdir": str(wd), "fmt": fmt, "open": {},
               "time_limit": 3600}  # libFuzzer's -timeout is the limit here
        rep = robust_worker.Job(job, mem_mb=0).run()
        bugs = robustlib.unexcused(rep["bugs"], dummy, data)
        if bugs:
            raise RuntimeError("\n".join(bugs))

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    harness(FORMAT)
