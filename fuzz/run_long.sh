#!/usr/bin/env bash
# Deeper robustness runs than CI's (see docs/robustness.md).  Not run in CI.
#
#   bash fuzz/run_long.sh                  # defaults below, ~1-2 hours on 2 cores
#   EXAMPLES=300 KILLS=30 bash fuzz/run_long.sh          # a quick pass
#   ATHERIS_SECONDS=3600 bash fuzz/run_long.sh           # also run the atheris harnesses
#
# 1. fuzz/hunt.py: hypothesis mutation fuzzing of every qcow2 and vmdk base image, EXAMPLES
#    inputs per image, collecting *all* distinct findings (it does not stop at the first);
#    images of findings and summary.json go to $OUT.
# 2. the CI fuzz tests with EXAMPLES examples each (random seeds: profile "dev"), which
#    shrink the first failure to a minimal mutation list.
# 3. crash consistency: the CI test file, then fuzz/crash_long.py with KILLS more seeds.
# 3b. fuzz/two_writers.py: TWO_WRITERS seeded sequences of qemu and diskimg taking turns on
#    one qcow2 image (CI runs seeds 0..59; these are seeds 1000 and up).
# 3c. fuzz/model_long.py: the qcow2/vmdk/raw model tests with MODEL_EXAMPLES random examples.
# 3d. fuzz/convert_matrix.py: CONVERT_CASES seeded convert cases (CI runs seeds 0..39).
# 4. optionally the atheris harnesses (pip install atheris) for ATHERIS_SECONDS each.
# Exit status: 0 when nothing was found.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
EXAMPLES="${EXAMPLES:-2000}"
KILLS="${KILLS:-500}"
OUT="${OUT:-fuzz/findings/$(date +%Y%m%d-%H%M%S)}"
ATHERIS_SECONDS="${ATHERIS_SECONDS:-0}"
TWO_WRITERS="${TWO_WRITERS:-2000}"
MODEL_EXAMPLES="${MODEL_EXAMPLES:-500}"
CONVERT_CASES="${CONVERT_CASES:-500}"
mkdir -p "$OUT"
rc=0

echo "== hunt: qcow2 ($EXAMPLES inputs per base image)"
"$PY" fuzz/hunt.py --examples "$EXAMPLES" --out "$OUT/qcow2" || rc=1
echo "== hunt: vmdk ($EXAMPLES inputs per base image)"
"$PY" fuzz/hunt.py --vmdk --examples "$EXAMPLES" --out "$OUT/vmdk" || rc=1

echo "== hypothesis fuzz tests (random seeds, $EXAMPLES examples each)"
HYPOTHESIS_PROFILE=dev DISKIMG_FUZZ_EXAMPLES="$EXAMPLES" DISKIMG_FUZZ_SAVE="$OUT/shrunk" \
  "$PY" -m pytest -q -p no:cacheprovider tests/robustness/test_fuzz_qcow2.py \
  tests/robustness/test_fuzz_vmdk.py -k mutated || rc=1

echo "== crash consistency (the CI tests, then $KILLS more seeds)"
"$PY" -m pytest -q -p no:cacheprovider tests/robustness/test_crash_consistency.py || rc=1
"$PY" fuzz/crash_long.py "$KILLS" --out "$OUT/crash" || rc=1

echo "== two writers: qemu and diskimg on one qcow2 image ($TWO_WRITERS sequences)"
"$PY" fuzz/two_writers.py --seed 1000 --count "$TWO_WRITERS" || rc=1

echo "== model tests: qcow2, vmdk, raw against a bytearray ($MODEL_EXAMPLES examples each)"
"$PY" fuzz/model_long.py --examples "$MODEL_EXAMPLES" || rc=1

echo "== convert matrix ($CONVERT_CASES seeded cases from seed 1000)"
"$PY" fuzz/convert_matrix.py "$CONVERT_CASES" --start 1000 || rc=1

if [ "$ATHERIS_SECONDS" -gt 0 ]; then
  for fmt in qcow2 vmdk; do
    echo "== atheris $fmt (${ATHERIS_SECONDS}s)"
    corpus="$OUT/corpus-$fmt"
    "$PY" "fuzz/fuzz_$fmt.py" --make-corpus "$corpus" || { rc=1; continue; }
    "$PY" "fuzz/fuzz_$fmt.py" "$corpus" -timeout=10 -rss_limit_mb=2048 \
      -max_total_time="$ATHERIS_SECONDS" -artifact_prefix="$OUT/atheris-$fmt-" || rc=1
  done
fi
echo "== results in $OUT (exit $rc)"
exit "$rc"
