#!/usr/bin/env bash
# Builds dtl with CUDA here (no GPU needed) and packs what a GPU machine needs to check it into
# .gpu/ (git-ignored; the pack and the working tree together stay under 64 MiB, so every
# binary and data file is stripped and gzip-compressed; run.sh unpacks them under /tmp):
#   .gpu/bin/dtl.gz         the release binary (when dtl-cli has a `cuda` feature)
#   .gpu/tests/*.gz         the GPU test executables (tests/tests/cuda_*.rs), release builds
#   .gpu/paths.env          the build-machine path baked into the tests (their fixtures)
#   .gpu/data/mnist/*.gz    the quickstart's data (data/mnist, when present here)
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
# Symbols stay (a panic's backtrace names its functions); debug information goes.
strip --strip-debug "$out"/tests/* "$out"/bin/* 2>/dev/null || true
raw=$(du -cb "$out"/tests/* "$out"/bin/* 2>/dev/null | tail -n1 | cut -f1)

# The build-machine path baked into the tests (they read their fixtures from there).
cat >"$out/paths.env" <<EOF
BUILD_ROOT="$here"
EOF

# The quickstart's data (git-ignored, so it does not travel with the tree).
if [[ -f data/mnist/train.csv && -f data/mnist/test.csv ]]; then
    mkdir -p "$out/data/mnist"
    cp data/mnist/train.csv data/mnist/test.csv "$out/data/mnist/"
    raw=$((raw + $(du -cb "$out"/data/mnist/* | tail -n1 | cut -f1)))
else
    log "warning: data/mnist not found (scripts/setup-data.sh installs it); the GPU machine needs it for the quickstart, or DTL_DATA set there"
fi
# Compressed: run.sh unpacks them (gzip is everywhere; -n keeps the pack reproducible).
find "$out/bin" "$out/tests" "$out/data" -type f ! -name '*.gz' -exec gzip -9 -n {} + 2>/dev/null || true

cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root (PyTorch + timm installed, no network needed).
# Phases, each with a timeout; a failing or timed-out phase marks its rows and never stops the
# others. The whole script stays under DTL_GPU_CHECK_BUDGET seconds (default 470, 8 minutes with
# the machine's start) even when phases hang; each cap below is a maximum, and time a phase does
# not use passes to the later ones:
#   1. the GPU tests                                                             (100 s)
#   2. when the binary accepts run.device=cuda:0: the quickstart on cuda:0, its top-1 next to
#      the CPU figure; beside it, PyTorch compiles the `best` setting once to fill its on-disk
#      caches (the quickstart's img/s is therefore no measurement)                 (90 s)
#   3. `dtl bench` of ViT-B/16 (random weights) in bf16: DTL, DTL+ (each with
#      run.activations recompute and store) and the linear probe, batch 32 and 128 (45 + 55 s)
#   4. the PyTorch reference in one process: eager (f32 weights, bf16 autocast) and best (bf16
#      weights, torch.compile per block), same methods and batches                (150 s)
#  4b. where the GPU time goes: `dtl bench --profile` of DTL bf16 recompute at batch 32 and
#      128, the per-kernel tables into profile-b32.md and profile-b128.md (CUDA events, graphs
#      off meanwhile; docs/cuda.md)                                         (40 s for both)
#   5. optional, while time is left: DTL b128 with DTL_GRAPHS=0, with DTL_ATTENTION=fused and
#      =unfused, with DTL_GEMM_EPILOGUE=lt and =plain, dtl in f32 (b32 and b128), PyTorch best
#      with the whole step compiled (DTL b128)
#   6. bench/reference/gpu_table.py: the ratio table with the targets, printed last (10 s)
# Environment:
#   DTL_DATA   a folder holding mnist/{train,test}.csv (laid out like the repository's data/),
#              or the mnist folder itself; default: data/ of the tree, then the pack's copy
#   PYTHON     the Python with torch and timm (default python3)
#   OUT        when set (a folder), results go there as at most 7 files: gpu-table.md,
#              gpu-rows.jsonl, summary.txt, run.log, files.tar.gz (every log and JSON output),
#              profile-b32.md and profile-b128.md; else to .gpu/results (the same, and the
#              folder files/ unpacked)
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
files="$results/files"
rm -rf "$files" "$results/files.tar.gz"
mkdir -p "$files"
exec > >(tee "$results/run.log") 2>&1
scratch="${TMPDIR:-/tmp}/dtl-gpu-check"
rm -rf "${scratch:?}/bin" "${scratch:?}/tests" "${scratch:?}/mnist"
mkdir -p "$scratch/bin" "$scratch/tests"
# PyTorch's compile caches, shared by the warm-up compile of phase 2 and the measurement of phase 4.
export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor" TRITON_CACHE_DIR="$scratch/triton"
status=0
summary=()
note() { summary+=("$*"); }
# Seconds a phase may take: its own cap, cut so that 10 s (or $2) remain for the table.
limit() {
    local want=$1 left=$((deadline - SECONDS - ${2:-10}))
    ((left < want)) && want=$left
    ((want < 1)) && want=1
    echo "$want"
}
# timeout with a short grace period; exit 124/137 means the phase ran out of time.
tmo() { timeout -k 3 "$@"; }
why_of() { [[ $1 == 124 || $1 == 137 ]] && echo "timed out after $2 s" || echo "exit $1"; }
jstr() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}
# One line of status.jsonl per phase: what the table expects and whether it came.
# status_dtl LABEL BATCH FILE OK WHY METHODS_JSON PRECISION
status_dtl() {
    printf '{"phase": "dtl", "label": %s, "batch": %s, "file": %s, "ok": %s, "why": %s, "methods": %s, "precision": %s}\n' \
        "$(jstr "$1")" "$2" "$(jstr "$3")" "$4" "$([[ -n $5 ]] && jstr "$5" || echo null)" "$6" "$(jstr "$7")" \
        >>"$files/status.jsonl"
}
status_ref() {
    printf '{"phase": "pytorch", "label": %s, "file": %s, "ok": %s, "why": %s}\n' "$(jstr "$1")" "$(jstr "$2")" "$3" \
        "$([[ -n $4 ]] && jstr "$4" || echo null)" >>"$files/status.jsonl"
}
# Results: when OUT is set, at most 7 files come back; everything else goes into files.tar.gz.
# shellcheck disable=SC2317 # called by the EXIT trap
finish() {
    [[ -d "$files" ]] || return 0
    tar -czf "$results/files.tar.gz" -C "$results" files 2>/dev/null
    [[ -n "${OUT:-}" ]] && rm -rf "$files"
    return 0
}
trap finish EXIT

# The pack is compressed: unpack the binaries and the data.
for f in "$pack"/bin/*.gz "$pack"/tests/*.gz; do
    [[ -f "$f" ]] || continue
    dst="$scratch/$(basename "$(dirname "$f")")/$(basename "$f" .gz)"
    if ! gzip -dc "$f" >"$dst" || ! chmod +x "$dst"; then
        echo "run.sh: cannot unpack $f" >&2
        status=1
    fi
done
if [[ -d "$pack/data/mnist" ]]; then
    mkdir -p "$scratch/mnist"
    for f in "$pack"/data/mnist/*.gz; do gzip -dc "$f" >"$scratch/mnist/$(basename "$f" .gz)"; done
fi

# The tests read their fixtures from the build machine's tree: point that path here.
if [[ ! -e "$BUILD_ROOT/tests/fixtures" ]]; then
    mkdir -p "$BUILD_ROOT/tests"
    ln -sfn "$root/tests/fixtures" "$BUILD_ROOT/tests/fixtures"
fi
# No LD_LIBRARY_PATH: dtl finds the driver, NVRTC and cuBLAS where the CUDA toolkit or
# PyTorch's wheels put them, which this check exercises.
card_name="$(tmo 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
card="$(tmo 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
echo "== device: ${card:-unknown}; libraries from dtl's own search (docs/cuda.md); results in $results"
printf '{"phase": "run", "card": %s, "when": %s}\n' "$(jstr "${card_name:-unknown card}")" \
    "$(jstr "$(date -u '+%Y-%m-%d %H:%M UTC')")" >"$files/status.jsonl"

# 1. GPU tests: 100 s for all of them together.
echo "== GPU tests"
tests_end=$((SECONDS + $(limit 100)))
for t in "$scratch"/tests/*; do
    [[ -x "$t" ]] || continue
    name="$(basename "$t")"
    left=$((tests_end - SECONDS))
    if ((left < 5)); then
        echo "FAILED: $name not run, the time for the GPU tests is spent"
        note "GPU test $name: not run (out of time)"
        status=1
        continue
    fi
    echo "-- $name (at most $left s)"
    # On the GPU machine a missing GPU is a failure, and the host emulation is not needed.
    DTL_REQUIRE_GPU=1 DTL_SKIP_EMULATOR=1 tmo "$left" "$t" --test-threads 2 >"$files/test-$name.log" 2>&1
    rc=$?
    tail -n 20 "$files/test-$name.log"
    if [[ $rc == 0 ]]; then
        note "GPU test $name: passed"
    else
        echo "FAILED: $name ($(why_of $rc "$left"))"
        note "GPU test $name: FAILED ($(why_of $rc "$left"); log test-$name.log)"
        status=1
    fi
done

dtl="$scratch/bin/dtl"
bench_pipeline="examples/pipelines/bench-vit-tiny-cpu.toml"
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

ref="bench/reference/bench_dtl_train.py"
ref_json="$files/ref.jsonl"
rm -f "$ref_json"
torch_ok=0
if tmo 60 "$py" -c 'import torch, timm, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >"$files/torch-probe.log" 2>&1; then
    torch_ok=1
fi

# 2. Quickstart on cuda:0 (DTL+ on MNIST, 3 epochs); its data is git-ignored, so it travels in
#    the pack or is named by DTL_DATA. Beside it, PyTorch compiles the best setting once.
cpu_top1="90.40" # pipelines/quickstart.toml on the CPU: top1 0.904 in runs/quickstart/report.json
if [[ $cuda_ok == 1 ]]; then
    mnist=""
    for d in ${DTL_DATA:+"$DTL_DATA/mnist" "$DTL_DATA"} "$root/data/mnist" "$scratch/mnist"; do
        if [[ -f "$d/train.csv" && -f "$d/test.csv" ]]; then mnist="$d"; break; fi
    done
    if [[ -n "${DTL_DATA:-}" && "$mnist" != "$DTL_DATA"* ]]; then
        echo "note: DTL_DATA=$DTL_DATA holds no mnist/train.csv and test.csv; looking elsewhere"
    fi
    if [[ -z "$mnist" ]]; then
        echo "== quickstart skipped: MISSING DATA: no mnist/train.csv and test.csv in ${DTL_DATA:+DTL_DATA=$DTL_DATA, }$root/data/mnist or the pack"
        echo "   (run scripts/setup-data.sh where the pack is built, so that gpu-check.sh packs data/mnist, or set DTL_DATA)"
        note "quickstart: SKIPPED, data missing (data/mnist; see DTL_DATA)"
        status=1
    else
        lim=$(limit 90)
        warm_pid=""
        if [[ $torch_ok == 1 ]]; then
            # timeout itself in the background (not a shell function), so that $! is its pid
            # and stopping it stops PyTorch too
            timeout -k 3 "$lim" "$py" "$ref" --device cuda --model vit_base_patch16_224 --method all \
                --batch 32 128 --setting best --compile regional --steps 1 --warmup 2 \
                >"$files/ref-warm.log" 2>&1 &
            warm_pid=$!
        fi
        echo "== quickstart on cuda:0 (data $mnist, at most $lim s${warm_pid:+; PyTorch compiles beside it})"
        rm -rf "$files/runs/quickstart-cuda"
        tmo "$lim" "$dtl" run pipelines/quickstart.toml run.device=cuda:0 run.name=quickstart-cuda \
            "run.output_dir=$files/runs" "data.root=$mnist" --no-progress \
            >"$files/quickstart.log" 2>&1
        rc=$?
        if [[ -n $warm_pid ]]; then
            kill -TERM "$warm_pid" 2>/dev/null
            wait "$warm_pid" 2>/dev/null
            echo "   PyTorch's warm-up compile: $(grep -c '^{' "$files/ref-warm.log") of 6 configurations compiled"
        fi
        tail -n 8 "$files/quickstart.log"
        report="$files/runs/quickstart-cuda/report.json"
        if [[ $rc == 0 && -f "$report" ]]; then
            line="$(tmo 10 "$py" - "$report" "$cpu_top1" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
gpu, cpu = 100 * r["top1"], float(sys.argv[2])
print("quickstart top-1 on cuda:0 %.2f %% (CPU %.2f %%, difference %+.2f points); %.1f s"
      % (gpu, cpu, gpu - cpu, r.get("wall_s", float("nan"))))
PYEOF
)" || line="quickstart: report.json unreadable ($report)"
            echo "$line"
            note "$line"
        else
            echo "FAILED: quickstart ($(why_of $rc "$lim"))"
            note "quickstart: FAILED ($(why_of $rc "$lim"); log quickstart.log)"
            status=1
        fi
    fi
fi

# 3 and 5. dtl bench: ViT-B/16 with random weights (the bench pipeline has no weights); one
# process per configuration so that one that hangs does not take the others' rows. At least 2
# warm-up steps: the step's CUDA graph is recorded on its second run, so the timed steps replay it.
# run_dtl NAME LABEL BATCH STEPS WARMUP CAP MIN METHODS_JSON PRECISION [VAR=VALUE ...]
#   MIN: the seconds it needs to be worth starting; optional runs that do not fit are "not run"
run_dtl() {
    local name=$1 label=$2 b=$3 steps=$4 warm=$5 cap=$6 min=$7 methods=$8 prec=$9
    shift 9
    local f="dtl-$name.json" left=$((deadline - SECONDS - 10)) lim rc
    if [[ $cuda_ok != 1 ]]; then
        status_dtl "$label" "$b" "$f" false "not run: no dtl binary that accepts run.device=cuda:0" "$methods" "$prec"
        return
    fi
    if ((left < min)); then
        echo "== dtl bench $label, batch $b: not run ($left s left, it needs $min)"
        status_dtl "$label" "$b" "$f" false "not run: out of time" "$methods" "$prec"
        note "dtl bench $label batch $b: not run (out of time)"
        return
    fi
    lim=$(limit "$cap")
    echo "== dtl bench on cuda:0, ViT-B/16, $label, batch $b ($steps steps after $warm warm-up, at most $lim s)"
    env "$@" timeout -k 3 "$lim" "$dtl" bench "$bench_pipeline" run.device=cuda:0 backbone.kind=vit_base_patch16_224 \
        "run.precision=$prec" --batch "$b" --steps "$steps" --warmup "$warm" --what train --json \
        >"$files/$f" 2>"$files/dtl-$name.log"
    rc=$?
    tail -n 5 "$files/dtl-$name.log"
    if [[ $rc == 0 ]] && tmo 10 "$py" - "$files/$f" 2>/dev/null <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print("  %-7s %-10s batch %4d  %8.0f img/s  peak live %s MiB  driver %s MiB  %s %s" % (
        r["side"], r.get("activations") or "", r["batch"], r["img_per_s"], r.get("peak_gpu_mib"),
        r.get("gpu_driver_mib"), r.get("precision") or d.get("precision") or "", r.get("graph") or ""))
PYEOF
    then
        status_dtl "$label" "$b" "$f" true "" "$methods" "$prec"
        note "dtl bench $label batch $b: ok"
    else
        [[ $rc == 0 ]] && why="no JSON rows in its output" || why="$(why_of $rc "$lim")"
        echo "FAILED: dtl bench $label batch $b ($why)"
        status_dtl "$label" "$b" "$f" false "$why" "$methods" "$prec"
        note "dtl bench $label batch $b: FAILED ($why; log dtl-$name.log)"
        status=1
    fi
}
all='["dtl", "dtlplus", "linear"]'
run_dtl bf16-b32 bf16 32 20 3 45 1 "$all" bf16
run_dtl bf16-b128 bf16 128 10 2 55 1 "$all" bf16

# 4. PyTorch reference: one process for every method, batch and setting (one start-up, official
#    rows first); it stops starting measurements 15 s before its cap and writes them as "not run".
if [[ $torch_ok == 1 ]]; then
    lim=$(limit 150)
    echo "== PyTorch on cuda, ViT-B/16, dtl/dtlplus/linear, batch 32 and 128, eager bf16 and best (at most $lim s)"
    tmo "$lim" "$py" "$ref" --device cuda --model vit_base_patch16_224 --method all --batch 32 128 \
        --precision bf16 --setting official best --compile regional --steps 20 --warmup 3 \
        --budget $((lim > 30 ? lim - 15 : lim)) --json "$ref_json" >"$files/ref.log" 2>&1
    rc=$?
    if [[ -s "$ref_json" ]]; then
        tmo 10 "$py" - "$ref_json" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    label = "eager" if r.get("setting", "official") == "official" else "best (%s)" % r.get("compile")
    if r.get("error"):
        print("  %-8s batch %4d  %-16s FAILED: %s" % (r["method"], r["batch"], label, r["error"]))
    else:
        print("  %-8s batch %4d  %-16s %8.0f img/s  peak %6.0f MiB allocated, %6.0f MiB reserved; warm-up %.0f s" % (
            r["method"], r["batch"], label, r["img_per_s"], r["peak_mib"], r["peak_reserved_mib"] or 0,
            r.get("warmup_s") or 0))
PYEOF
    fi
    [[ $rc == 0 ]] || tail -n 5 "$files/ref.log" | cut -c1-300
    n_ref=$(grep -c . "$ref_json" 2>/dev/null || true)
    n_bad=$(grep -c '"error"' "$ref_json" 2>/dev/null || true)
    if [[ $rc == 0 ]]; then
        status_ref "official+best" "ref.jsonl" true ""
        note "PyTorch: ok, ${n_ref:-0} rows, ${n_bad:-0} of them failed or not run (ref.jsonl)"
        [[ ${n_bad:-0} == 0 ]] || status=1
    else
        status_ref "official+best" "ref.jsonl" false "$(why_of $rc "$lim"), ${n_ref:-0} of 12 rows written"
        echo "FAILED: PyTorch ($(why_of $rc "$lim"); ${n_ref:-0} rows written)"
        note "PyTorch: FAILED ($(why_of $rc "$lim"); ${n_ref:-0} of 12 rows; log ref.log)"
        status=1
    fi
else
    echo "== PyTorch skipped: $py has no torch with CUDA (torch-probe.log)"
    status_ref "official+best" "ref.jsonl" false "not run: $py has no torch with CUDA"
    note "PyTorch: SKIPPED (no torch with CUDA in $py)"
    status=1
fi

# 4b. Where the GPU time goes: the per-kernel breakdown of DTL bf16 recompute (each kernel,
#     product and copy of the timed steps between two CUDA events; graphs off meanwhile, so the
#     img/s of these runs is no measurement). 40 s for both batches, ahead of the optional rows.
# run_profile BATCH STEPS CAP MIN
run_profile() {
    local b=$1 steps=$2 cap=$3 min=$4 md="$results/profile-b$1.md" left lim rc
    rm -f "$md"
    if [[ $cuda_ok != 1 ]]; then
        note "dtl bench --profile batch $b: not run (no dtl binary that accepts run.device=cuda:0)"
        return
    fi
    left=$((profile_end - SECONDS))
    ((left > deadline - SECONDS - 10)) && left=$((deadline - SECONDS - 10))
    if ((left < min)); then
        echo "== dtl bench --profile, batch $b: not run ($left s left, it needs $min)"
        note "dtl bench --profile batch $b: not run (out of time)"
        return
    fi
    lim=$(limit "$cap")
    ((lim > left)) && lim=$left
    echo "== dtl bench --profile on cuda:0, ViT-B/16, DTL bf16 recompute, batch $b ($steps steps, at most $lim s)"
    timeout -k 3 "$lim" "$dtl" bench "$bench_pipeline" run.device=cuda:0 backbone.kind=vit_base_patch16_224 \
        run.precision=bf16 side.kind=dtl run.activations=recompute --batch "$b" --steps "$steps" --warmup 2 \
        --what train --profile --profile-md "$md" >"$files/profile-b$b.txt" 2>"$files/profile-b$b.log"
    rc=$?
    if [[ $rc == 0 && -s "$md" ]]; then
        sed -n '1,14p' "$md"
        note "dtl bench --profile batch $b: ok (profile-b$b.md)"
    else
        tail -n 5 "$files/profile-b$b.log"
        echo "FAILED: dtl bench --profile batch $b ($(why_of $rc "$lim"))"
        note "dtl bench --profile batch $b: FAILED ($(why_of $rc "$lim"); log profile-b$b.log)"
        status=1
    fi
}
profile_end=$((SECONDS + 40))
run_profile 32 5 20 12
run_profile 128 3 25 15

# 5. Optional rows, while time is left (a row that does not fit is shown as not run).
dtl_only='["dtl"]'
run_dtl graphs-off-b128 "bf16, DTL_GRAPHS=0" 128 10 2 40 25 "$dtl_only" bf16 DTL_GRAPHS=0
run_dtl fused-b128 "bf16, DTL_ATTENTION=fused" 128 10 2 40 25 "$dtl_only" bf16 DTL_ATTENTION=fused
run_dtl unfused-b128 "bf16, DTL_ATTENTION=unfused" 128 10 2 40 25 "$dtl_only" bf16 DTL_ATTENTION=unfused
# The bias in the product's epilogue (cuBLASLt) against BiasRows + cuBLAS: the two rows that
# decide DTL_GEMM_EPILOGUE's default (docs/cuda.md, "Bias in the product's epilogue").
run_dtl epilogue-lt-b128 "bf16, DTL_GEMM_EPILOGUE=lt" 128 10 2 40 25 "$dtl_only" bf16 DTL_GEMM_EPILOGUE=lt
run_dtl epilogue-plain-b128 "bf16, DTL_GEMM_EPILOGUE=plain" 128 10 2 40 25 "$dtl_only" bf16 DTL_GEMM_EPILOGUE=plain
run_dtl f32-b32 f32 32 10 2 40 25 "$all" f32
run_dtl f32-b128 f32 128 5 2 45 25 "$all" f32
left=$((deadline - SECONDS - 10))
if [[ $torch_ok == 1 ]] && ((left >= 60)); then
    lim=$(limit 120)
    echo "== PyTorch best with the whole step compiled, DTL batch 128 (at most $lim s)"
    tmo "$lim" "$py" "$ref" --device cuda --model vit_base_patch16_224 --method dtl --batch 128 \
        --setting best --compile full --steps 20 --warmup 3 --json "$ref_json" >"$files/ref-full.log" 2>&1
    rc=$?
    tail -n 1 "$files/ref-full.log" | cut -c1-300
    if [[ $rc == 0 ]]; then
        note "PyTorch best, whole step compiled: ok"
    else
        note "PyTorch best, whole step compiled: FAILED ($(why_of $rc "$lim"); log ref-full.log)"
    fi
elif [[ $torch_ok == 1 ]]; then
    note "PyTorch best, whole step compiled: not run (${left} s left, it needs 60)"
else
    note "PyTorch best, whole step compiled: not run (no torch with CUDA)"
fi

# 6. Summary, then the table last.
{
    echo "== summary (${card:-unknown device}), $((SECONDS - t0)) s"
    for s in "${summary[@]}"; do echo "$s"; done
    [[ $status == 0 ]] && echo "GPU check passed" || echo "GPU check FAILED"
} | tee "$results/summary.txt"
echo
tmo 10 "$py" "$root/bench/reference/gpu_table.py" --status "$files/status.jsonl" --card "${card_name:-unknown card}" \
    --out-md "$results/gpu-table.md" --out-jsonl "$results/gpu-rows.jsonl" 2>&1
rc=$?
[[ $rc == 0 ]] || { echo "gpu_table.py: exit $rc (1: no row with both a dtl and an eager figure)"; status=1; }
exit $status
EOF
chmod +x "$out/run.sh"


size=$(du -sb "$out" | cut -f1)
log "packed $out: $((size / 1024)) KiB compressed, $((raw / 1024)) KiB unpacked (tests: $(cd "$out/tests" && echo *))"
# The working tree travels with the pack: both together must stay under 64 MiB.
tree=$( (git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n1 | cut -f1) 2>/dev/null || true)
tree=${tree:-0}
log "working tree (tracked and untracked, not ignored): $((tree / 1024 / 1024)) MiB"
[[ $((size + tree)) -lt $limit ]] || die "the pack ($size bytes) and the working tree ($tree bytes) pass the 64 MiB a GPU machine is sent"
cat <<EOF
# On the GPU machine, from the repository root of a copy of this working tree with .gpu/ in it
# (.gpu/ is git-ignored: send it along explicitly):
#   bash .gpu/run.sh
# About 8 minutes at most (DTL_GPU_CHECK_BUDGET=470 s, plus a few seconds to unpack); results
# print to stdout (summary, then the dtl / PyTorch table last) and are written to \$OUT when
# set (at most 7 files), else .gpu/results/.
EOF
