#!/usr/bin/env bash
# Fuzzes every input reader of dtl for a set time per target and keeps the corpus.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET]
#
# Targets: pipeline, safetensors, npz, image, csv, list (all when omitted). Inputs with an
# outcome not seen before are added to tests/fuzz/corpus/<target>/ (replayed by
# `cargo test -p dtl-cli --test fuzz`); inputs that panic go to tests/fuzz/crashes/<target>/.
# A process that aborts (a failed allocation) or hangs is a crash too: the script reports
# the exit status and the test's time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
target="${2:-}"
profile=(--release)
[[ "${DTL_FUZZ_DEBUG:-0}" == 1 ]] && profile=()
export DTL_FUZZ_SECONDS="$seconds" DTL_FUZZ_SAVE=1
[[ -n "$target" ]] && export DTL_FUZZ_TARGET="$target"
# Six targets at most, each for $seconds, plus building: a run past this limit hangs.
limit=$(( seconds * 6 + 1800 ))
set +e
timeout "$limit" cargo test "${profile[@]}" -p dtl-cli --test fuzz -- --nocapture --test-threads 1 2>&1 \
    | grep -aE '^fuzz |inputs that panic|test result|^error'
status=${PIPESTATUS[0]}
set -e
case "$status" in
    0) echo "fuzz: no crashes; corpus in tests/fuzz/corpus/" ;;
    124) echo "fuzz: timed out after ${limit} s (a hang?)"; exit 1 ;;
    *) echo "fuzz: failed with exit status $status; crashing inputs in tests/fuzz/crashes/"; exit 1 ;;
esac
