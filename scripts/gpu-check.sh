#!/usr/bin/env bash
# Builds dtl with CUDA here (no GPU needed) and packs what a GPU machine needs to check it into
# .gpu/ (git-ignored, kept under 64 MiB):
#   .gpu/bin/dtl            the release binary (when dtl-cli has a `cuda` feature)
#   .gpu/tests/*            the GPU test executables (tests/tests/cuda_*.rs)
#   .gpu/cuh/*.cuh          dfdx's headers, which its run-time NVRTC compiles include
#   .gpu/paths.env          the build-machine paths baked into the binaries
#   .gpu/run.sh             the one script to run on the GPU machine, from the repository root
# It never contacts a GPU machine; it prints the exact call to make.
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

eval "$(scripts/cuda-toolchain.sh)"
export CARGO_TARGET_DIR="$target"

cli_has_cuda=0
if grep -Eq '^cuda *=' crates/dtl-cli/Cargo.toml; then cli_has_cuda=1; fi

tests_json="$target/gpu-check-tests.json"
if [[ "${1:-}" != "--pack" ]]; then
    start=$SECONDS
    # One cargo invocation, so that the binary and the tests share one feature set (and one
    # build of dfdx and its kernels).
    pkgs=(-p dtl-tests --test cuda_kernels --test cuda_vit)
    feats="dtl-tests/cuda"
    if [[ $cli_has_cuda == 1 ]]; then
        pkgs+=(-p dtl-cli --bin dtl)
        feats="$feats,dtl-cli/cuda"
    fi
    log "building the GPU tests and the binary (release, features $feats)"
    cargo build --release "${pkgs[@]}" --features "$feats" --message-format=json >"$tests_json"
    log "built in $((SECONDS - start)) s"
fi
[[ -f "$tests_json" ]] || die "no test build found; run scripts/gpu-check.sh without --pack first"

rm -rf "$out"
mkdir -p "$out/bin" "$out/tests" "$out/cuh"

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

# dfdx's NVRTC headers and the two build-machine paths baked into the binaries.
# Every dfdx build directory is listed: which one a binary bakes in depends on its feature set.
cuh_dirs=()
for d in "$target"/release/build/dfdx-*/out; do
    if compgen -G "$d/*.cuh" >/dev/null; then cuh_dirs+=("$d"); fi
done
[[ ${#cuh_dirs[@]} -gt 0 ]] || die "dfdx's OUT_DIR with .cuh files not found under $target/release/build"
cp "${cuh_dirs[0]}"/*.cuh "$out/cuh/"
cat >"$out/paths.env" <<EOF
BUILD_ROOT="$here"
BUILD_CUDA_INCLUDE="$CUDA_ROOT/include"
BUILD_DFDX_OUT="${cuh_dirs[*]}"
EOF

cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: GPU tests, then (when the binary supports
# cuda:0) the quickstart and the training benchmark beside the PyTorch reference.
set -uo pipefail
root="$(pwd)"
pack="$root/.gpu"
. "$pack/paths.env"
t0=$SECONDS
status=0

# The binaries look for these build-machine paths: recreate them.
if [[ ! -e "$BUILD_CUDA_INCLUDE/cuda.h" ]]; then
    inc=""
    for d in /usr/local/cuda/include /usr/local/cuda-13.0/include /usr/local/cuda-13.0/targets/x86_64-linux/include; do
        [[ -f "$d/cuda.h" ]] && inc="$d" && break
    done
    mkdir -p "$(dirname "$BUILD_CUDA_INCLUDE")"
    [[ -n "$inc" ]] && ln -sfn "$inc" "$BUILD_CUDA_INCLUDE"
fi
for d in $BUILD_DFDX_OUT; do
    mkdir -p "$d" && cp "$pack"/cuh/*.cuh "$d"/
done
if [[ ! -e "$BUILD_ROOT/tests/fixtures" ]]; then
    mkdir -p "$BUILD_ROOT/tests"
    ln -sfn "$root/tests/fixtures" "$BUILD_ROOT/tests/fixtures"
fi
# libcublas.so.13 / libnvrtc.so.13: the toolkit's, else the ones PyTorch's wheels bring.
libs=""
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
    [[ -e "$d/libcublas.so.13" ]] && libs="$d" && break
done
if [[ -z "$libs" ]]; then
    libs="$(python3 -c '
import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.exists(os.path.join(d, "libcublas.so.13")):
        print(d)
        break
' 2>/dev/null || true)"
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
card="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
echo "== device: ${card:-unknown}; libraries from ${libs:-nowhere}"

echo "== GPU tests"
for t in "$pack"/tests/*; do
    echo "-- $(basename "$t")"
    timeout 240 "$t" --test-threads 2 || { echo "FAILED: $(basename "$t")"; status=1; }
done

summary=()
if [[ -x "$pack/bin/dtl" ]]; then
    if "$pack/bin/dtl" run pipelines/quickstart.toml run.device=cuda:0 --print-config >/dev/null 2>&1; then
        echo "== quickstart on cuda:0"
        timeout 150 "$pack/bin/dtl" run pipelines/quickstart.toml run.device=cuda:0 --no-progress \
            2>&1 | tail -n 15 || status=1
        echo "== dtl bench on cuda:0 (ViT-B/16, DTL, batch 32 and 128)"
        timeout 150 "$pack/bin/dtl" bench pipelines/quickstart.toml run.device=cuda:0 \
            backbone.kind=vit_base_patch16_224 --batch 32 --batch 128 --steps 5 --warmup 2 --what train \
            2>&1 | tee "$pack/dtl-bench.txt" | tail -n 20 || status=1
        summary+=("dtl: $(grep -Ei 'img/s|img_per_s' "$pack/dtl-bench.txt" | tr '\n' ' ')")
    else
        echo "== skipped quickstart and bench: this dtl does not accept run.device=cuda:0 yet"
    fi
fi
ref="bench/reference/bench_dtl_train.py"
if [[ -f "$ref" ]] && python3 "$ref" --help 2>/dev/null | grep -q -- "--device"; then
    echo "== PyTorch reference on cuda (ViT-B/16, DTL, batch 32 and 128)"
    for b in 32 128; do
        timeout 90 python3 "$ref" --device cuda --model vit_base_patch16_224 --batch "$b" --steps 10 \
            --method dtl 2>&1 | tail -n 3 | tee -a "$pack/ref-bench.txt"
    done
    summary+=("pytorch: $(tr '\n' ' ' <"$pack/ref-bench.txt")")
else
    echo "== skipped PyTorch reference: $ref has no --device option yet"
fi

echo "== summary (${card:-unknown device}), $((SECONDS - t0)) s"
for s in "${summary[@]}"; do echo "$s"; done
[[ $status == 0 ]] && echo "GPU check passed" || echo "GPU check FAILED"
exit $status
EOF
chmod +x "$out/run.sh"

size=$(du -sb "$out" | cut -f1)
log "packed $out: $((size / 1024 / 1024)) MiB ($(ls "$out/tests" | tr '\n' ' '))"
[[ $size -lt $limit ]] || die "the pack is $size bytes, over the 64 MiB a GPU call can carry"
cat <<EOF
# What to send to the GPU machine (one call, about 8 minutes at most):
#   run(command="bash .gpu/run.sh", carry=[".gpu"], timeout_s=540)
# It runs from the repository root of the copied working tree; results print to stdout,
# the summary and ratios last.
EOF
