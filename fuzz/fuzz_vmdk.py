#!/usr/bin/env python3
"""atheris (libFuzzer) harness for diskimg's vmdk reader (monolithicSparse and
streamOptimized extents) — deeper runs, not CI.  Same pipeline as fuzz_qcow2.py:

    pip install atheris
    python fuzz/fuzz_vmdk.py --make-corpus fuzz/corpus/vmdk
    python fuzz/fuzz_vmdk.py fuzz/corpus/vmdk -timeout=10 -rss_limit_mb=1024 \
        -max_len=2000000 -artifact_prefix=fuzz/findings/vmdk-
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_qcow2 import harness

if __name__ == "__main__":
    harness("vmdk")
