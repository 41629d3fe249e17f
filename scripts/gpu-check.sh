#!/usr/bin/env bash
# Builds dtl with CUDA here (no GPU needed) and packs what a GPU machine needs to check it into
# .gpu/ (git-ignored, kept under 64 MiB):
#   .gpu/bin/dtl            the release binary (when dtl-cli has a `cuda` feature)
#   .gpu/tests/*            the GPU test executables (tests/tests/cuda_*.rs)
#   .gpu/paths.env          the build-machine path baked into the tests (their fixtures)
#   .gpu/data/mnist         the quickstart's data (data/mnist, when present here; 8.8 MiB)
#   .gpu/run.sh             the one script to run on the GPU machine, from the repository root
# It never contacts a GPU machine. On the GPU machine, from the repository root of a copy of
# this working tree with .gpu/ beside it: `bash .gpu/run.sh` (8 minutes at most; see run.sh).
# Fashion-MNIST (data/fashion-mnist, 30 MiB) is not packed: nothing run.sh runs reads it, and
# with it the pack and the tree would pass 64 MiB.
#
#   scripts/gpu-check.sh            build and pack
#   scripts/gpu-check.sh --pack     pack what the last build left, without building
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
target="${CARGO_TARGET_DIR:-$here/target-cuda}"
out="$here/.gpu"
limit=$((64 * 1024 * 1024))
log() { echo "gpu-check: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The CUDA build needs no CUDA install: cudarc loads the driver, NVRTC and cuBLAS at run time.
export CARGO_TARGET_DIR="$target"

cli_has_cuda=0
if grep -Eq '^cuda *=' crates/dtl-cli/Cargo.toml; then cli_has_cuda=1; fi

tests_json="$target/gpu-check-tests.json"
if [[ "${1:-}" != "--pack" ]]; then
    start=$SECONDS
    # One cargo invocation, so that the binary and the tests share one feature set (and one
    # build of the dependencies).
    # Every GPU test file: tests/tests/cuda_*.rs.
    pkgs=(-p dtl-tests)
    for f in tests/tests/cuda_*.rs; do pkgs+=(--test "$(basename "$f" .rs)"); done
    feats="dtl-tests/cuda"
    if [[ $cli_has_cuda == 1 ]]; then
        pkgs+=(-p dtl-cli --bin dtl)
        feats="$feats,dtl-cli/cuda"
    fi
    log "building the GPU tests and the binary (release, features $feats)"
    mkdir -p "$target"
    cargo build --release "${pkgs[@]}" --features "$feats" --message-format=json >"$tests_json"
    log "built in $((SECONDS - start)) s"
fi
[[ -f "$tests_json" ]] || die "no test build found; run scripts/gpu-check.sh without --pack first"

rm -rf "$out"
mkdir -p "$out/bin" "$out/tests"

# Test executables: the cuda_* integration tests.
python3 - "$tests_json" "$out/tests" <<'EOF'
import json, shutil, sys, os
src, dst = sys.argv[1], sys.argv[2]
seen = set()
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = m["target"]["name"]
    kind = m["target"]["kind"]
    if not (name.startswith("cuda_") and kind == ["test"]):
        continue
    if name in seen:
        continue
    seen.add(name)
    shutil.copy2(m["executable"], os.path.join(dst, name))
EOF
[[ -n "$(ls "$out/tests")" ]] || die "no GPU test executable was built"

if [[ $cli_has_cuda == 1 && -x "$target/release/dtl" ]]; then
    cp "$target/release/dtl" "$out/bin/dtl"
fi
strip --strip-debug "$out"/tests/* "$out"/bin/* 2>/dev/null || true

# The build-machine path baked into the tests (they read their fixtures from there).
cat >"$out/paths.env" <<EOF
BUILD_ROOT="$here"
EOF

# The quickstart's data (git-ignored, so it does not travel with the tree).
if [[ -f data/mnist/train.csv && -f data/mnist/test.csv ]]; then
    mkdir -p "$out/data/mnist"
    cp data/mnist/train.csv data/mnist/test.csv "$out/data/mnist/"
else
    log "warning: data/mnist not found (scripts/setup-data.sh installs it); the GPU machine needs it for the quickstart, or DTL_DATA set there"
fi

cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root (PyTorch + timm installed, no network needed):
#   1. the GPU tests                                                       (120 s at most)
#   2. when the binary accepts run.device=cuda:0: the quickstart on cuda:0, its top-1 next to
#      the CPU figure                                                      (110 s)
#   3. `dtl bench` of ViT-B/16 (random weights), DTL / DTL+ / linear, batch 32 and 128, f32
#      (120 s)
#   4. the PyTorch reference, same methods and batches, fp32 and bf16      (90 s)
#   5. bench/reference/compare.py: the dtl / PyTorch table, printed last   (10 s)
# Every step has a timeout and a failing step does not stop the others; the whole script stays
# under 8 minutes (DTL_GPU_CHECK_BUDGET seconds, default 470) even when steps hang.
# Environment:
#   DTL_DATA   a folder holding mnist/{train,test}.csv (laid out like the repository's data/),
#              or the mnist folder itself; default: data/ of the tree, then .gpu/data
#   PYTHON     the Python with torch and timm (default python3)
#   OUT        when set (a folder), results are written there, else to .gpu/results
set -uo pipefail
root="$(pwd)"
pack="$root/.gpu"
[[ -f "$pack/paths.env" ]] || { echo "run.sh: error: $pack/paths.env not found; run from the repository root with .gpu/ in it" >&2; exit 2; }
# shellcheck source=/dev/null
. "$pack/paths.env"
t0=$SECONDS
deadline=$((t0 + ${DTL_GPU_CHECK_BUDGET:-470}))
py="${PYTHON:-python3}"
results="${OUT:-$pack/results}"
mkdir -p "$results"
status=0
summary=()
note() { summary+=("$*"); }
# Seconds a step may take: its own budget, cut so that 10 s remain for the comparison.
limit() {
    local want=$1 left=$((deadline - SECONDS - ${2:-10}))
    ((left < want)) && want=$left
    ((want < 1)) && want=1
    echo "$want"
}
# timeout with a short grace period; exit 124/137 means the step ran out of time.
tmo() { timeout -k 3 "$@"; }

# The tests read their fixtures from the build machine's tree: point that path here.
if [[ ! -e "$BUILD_ROOT/tests/fixtures" ]]; then
    mkdir -p "$BUILD_ROOT/tests"
    ln -sfn "$root/tests/fixtures" "$BUILD_ROOT/tests/fixtures"
fi
# No LD_LIBRARY_PATH: dtl finds the driver, NVRTC and cuBLAS where the CUDA toolkit or
# PyTorch's wheels put them, which this check exercises.
libs="dtl's own search (docs/cuda.md)"
card_name="$(tmo 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
card="$(tmo 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
echo "== device: ${card:-unknown}; libraries from ${libs:-nowhere}; results in $results"

# 1. GPU tests: 120 s for all of them together.
echo "== GPU tests"
tests_end=$((SECONDS + $(limit 120)))
for t in "$pack"/tests/*; do
    name="$(basename "$t")"
    left=$((tests_end - SECONDS))
    if ((left < 5)); then
        echo "FAILED: $name not run, the 120 s for the GPU tests are spent"
        note "GPU test $name: not run (out of time)"
        status=1
        continue
    fi
    echo "-- $name (at most $left s)"
    # On the GPU machine a missing GPU is a failure, and the host emulation is not needed.
    DTL_REQUIRE_GPU=1 DTL_SKIP_EMULATOR=1 tmo "$left" "$t" --test-threads 2 2>&1 | tee "$results/test-$name.log" | tail -n 20
    rc=${PIPESTATUS[0]}
    if [[ $rc == 0 ]]; then
        note "GPU test $name: passed"
    else
        [[ $rc == 124 || $rc == 137 ]] && why="timed out after $left s" || why="exit $rc"
        echo "FAILED: $name ($why)"
        note "GPU test $name: FAILED ($why; log test-$name.log)"
        status=1
    fi
done

dtl="$pack/bin/dtl"
bench_pipeline="examples/pipelines/bench-vit-tiny-cpu.toml"
bench_files=()
cuda_ok=0
if [[ ! -x "$dtl" ]]; then
    echo "== skipped quickstart and dtl bench: no dtl binary in the pack (dtl-cli has no cuda feature)"
    note "quickstart, dtl bench: skipped (no binary with the cuda feature)"
    status=1
elif probe="$(tmo 15 "$dtl" run "$bench_pipeline" run.device=cuda:0 --print-config 2>&1 >/dev/null)"; then
    cuda_ok=1
else
    echo "== skipped quickstart and dtl bench: this dtl does not accept run.device=cuda:0:"
    echo "$probe" | head -n 3
    note "quickstart, dtl bench: skipped (run.device=cuda:0 refused: $(echo "$probe" | head -n1))"
    status=1
fi

# 2. Quickstart on cuda:0 (DTL+ on MNIST, 3 epochs); its data is git-ignored, so it travels in
#    .gpu/data or is named by DTL_DATA.
cpu_top1="90.40" # pipelines/quickstart.toml on the CPU: top1 0.904 in runs/quickstart/report.json
if [[ $cuda_ok == 1 ]]; then
    mnist=""
    for d in ${DTL_DATA:+"$DTL_DATA/mnist" "$DTL_DATA"} "$root/data/mnist" "$pack/data/mnist"; do
        if [[ -f "$d/train.csv" && -f "$d/test.csv" ]]; then mnist="$d"; break; fi
    done
    if [[ -n "${DTL_DATA:-}" && "$mnist" != "$DTL_DATA"* ]]; then
        echo "note: DTL_DATA=$DTL_DATA holds no mnist/train.csv and test.csv; looking elsewhere"
    fi
    if [[ -z "$mnist" ]]; then
        echo "== quickstart skipped: MISSING DATA: no mnist/train.csv and test.csv in ${DTL_DATA:+DTL_DATA=$DTL_DATA, }$root/data/mnist or $pack/data/mnist"
        echo "   (run scripts/setup-data.sh where the pack is built, so that gpu-check.sh packs data/mnist, or set DTL_DATA)"
        note "quickstart: SKIPPED, data missing (data/mnist; see DTL_DATA)"
        status=1
    else
        lim=$(limit 110)
        echo "== quickstart on cuda:0 (data $mnist, at most $lim s)"
        rm -rf "$results/runs/quickstart-cuda"
        tmo "$lim" "$dtl" run pipelines/quickstart.toml run.device=cuda:0 run.name=quickstart-cuda \
            "run.output_dir=$results/runs" "data.root=$mnist" --no-progress \
            >"$results/quickstart.log" 2>&1
        rc=$?
        tail -n 8 "$results/quickstart.log"
        report="$results/runs/quickstart-cuda/report.json"
        if [[ $rc == 0 && -f "$report" ]]; then
            line="$(tmo 10 "$py" - "$report" "$cpu_top1" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
gpu, cpu = 100 * r["top1"], float(sys.argv[2])
print("quickstart top-1 on cuda:0 %.2f %% (CPU %.2f %%, difference %+.2f points); %.1f s, %.0f img/s training"
      % (gpu, cpu, gpu - cpu, r.get("wall_s", float("nan")), r.get("train_img_per_s", float("nan"))))
PYEOF
)" || line="quickstart: report.json unreadable ($report)"
            echo "$line"
            note "$line"
        else
            [[ $rc == 124 || $rc == 137 ]] && why="timed out after $lim s" || why="exit $rc"
            echo "FAILED: quickstart ($why)"
            note "quickstart: FAILED ($why; log quickstart.log)"
            status=1
        fi
    fi
fi

# 3. dtl bench: ViT-B/16 with random weights (the bench pipeline has no weights), DTL, DTL+ and
#    linear; one process per batch size so that one that hangs does not take the other's rows.
if [[ $cuda_ok == 1 ]]; then
    for spec in "32 5 2 50" "128 3 1 70"; do
        read -r b steps warm budget <<<"$spec"
        lim=$(limit "$budget")
        f="$results/dtl-bench-b$b.json"
        echo "== dtl bench on cuda:0, ViT-B/16, batch $b ($steps steps after $warm warm-up, at most $lim s)"
        tmo "$lim" "$dtl" bench "$bench_pipeline" run.device=cuda:0 backbone.kind=vit_base_patch16_224 \
            --batch "$b" --steps "$steps" --warmup "$warm" --what train --json >"$f" 2>"$results/dtl-bench-b$b.log"
        rc=$?
        tail -n 5 "$results/dtl-bench-b$b.log"
        if [[ $rc == 0 ]] && tmo 10 "$py" -c 'import json,sys; json.load(open(sys.argv[1]))["rows"]' "$f" 2>/dev/null; then
            tmo 10 "$py" - "$f" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print("  %-15s batch %4d  %9.1f img/s  peak live GPU %s MiB  driver %s MiB  peak RSS %s MiB" % (
        r["side"], r["batch"], r["img_per_s"], r.get("peak_gpu_mib"), r.get("gpu_driver_mib"),
        r.get("peak_rss_mib")))
PYEOF
            bench_files+=(--dtl "dtl-bench-b$b.json")
            note "dtl bench batch $b: ok ($f)"
        else
            [[ $rc == 124 || $rc == 137 ]] && why="timed out after $lim s" || why="exit $rc"
            echo "FAILED: dtl bench batch $b ($why)"
            note "dtl bench batch $b: FAILED ($why; log dtl-bench-b$b.log)"
            status=1
        fi
    done
fi

# 4. PyTorch reference: one process for every method, batch and precision (one start-up).
ref="bench/reference/bench_dtl_train.py"
ref_json="$results/ref.jsonl"
rm -f "$ref_json"
lim=$(limit 90)
echo "== PyTorch reference on cuda, ViT-B/16, dtl/dtlplus/linear, batch 32 and 128, fp32 and bf16 (at most $lim s)"
tmo "$lim" "$py" "$ref" --device cuda --model vit_base_patch16_224 --method all --batch 32 128 \
    --precision fp32 bf16 --steps 10 --warmup 3 --json "$ref_json" >"$results/ref.log" 2>&1
rc=$?
if [[ -s "$ref_json" ]]; then
    tmo 10 "$py" - "$ref_json" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("  %-8s batch %4d  %s  %9.1f img/s  peak %6.0f MiB allocated, %s MiB reserved" % (
        r["method"], r["batch"], r["precision"], r["img_per_s"], r["peak_mib"],
        "%.0f" % r["peak_reserved_mib"] if r.get("peak_reserved_mib") is not None else "-"))
PYEOF
fi
[[ $rc == 0 ]] || tail -n 5 "$results/ref.log" | cut -c1-300
n_ref=$(grep -c . "$ref_json" 2>/dev/null || true)
if [[ $rc == 0 ]]; then
    note "PyTorch reference: ok, ${n_ref:-0} rows ($ref_json)"
else
    [[ $rc == 124 || $rc == 137 ]] && why="timed out after $lim s" || why="exit $rc"
    echo "FAILED: PyTorch reference ($why; ${n_ref:-0} rows written)"
    note "PyTorch reference: FAILED ($why; ${n_ref:-0} of 12 rows; log ref.log)"
    status=1
fi

# 5. Summary, then the comparison table last.
echo
echo "== summary (${card:-unknown device}), $((SECONDS - t0)) s"
for s in "${summary[@]}"; do echo "$s"; done
[[ $status == 0 ]] && echo "GPU check passed" || echo "GPU check FAILED"
if [[ ${#bench_files[@]} -gt 0 && -s "$ref_json" ]]; then
    echo
    # From the results folder, so that the table names its files briefly.
    (cd "$results" && tmo 10 "$py" "$root/bench/reference/compare.py" "${bench_files[@]}" --ref ref.jsonl \
        --card "${card_name:-unknown card}" | tee compare.md; exit "${PIPESTATUS[0]}")
    rc=$?
    [[ $rc == 0 ]] || { echo "compare.py: exit $rc"; status=1; }
else
    echo "== no comparison table: $([[ ${#bench_files[@]} -gt 0 ]] && echo "no PyTorch rows" || echo "no dtl bench result")"
fi
exit $status
EOF
chmod +x "$out/run.sh"

size=$(du -sb "$out" | cut -f1)
log "packed $out: $((size / 1024 / 1024)) MiB (tests: $(cd "$out/tests" && echo *))"
# The working tree travels with the pack: both together must stay under 64 MiB.
tree=$( (git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n1 | cut -f1) 2>/dev/null || true)
tree=${tree:-0}
log "working tree (tracked and untracked, not ignored): $((tree / 1024 / 1024)) MiB"
[[ $((size + tree)) -lt $limit ]] || die "the pack ($size bytes) and the working tree ($tree bytes) pass the 64 MiB a GPU machine is sent"
cat <<EOF
# On the GPU machine, from the repository root of a copy of this working tree with .gpu/ in it:
#   bash .gpu/run.sh
# About 8 minutes at most; results print to stdout (summary, then the dtl / PyTorch table last)
# and are written to \$OUT when set, else .gpu/results/.
EOF
