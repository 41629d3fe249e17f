#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers it needs for bf16 kernels from PyPI, for machines without
# a CUDA install (CI), and prints the variable that lets dtl find them:
#
#   eval "$(scripts/cuda-toolchain.sh)"
#   cargo test -p dtl-cuda --features cuda      # NVRTC compiles every kernel; no GPU needed
#
# Building with `--features cuda` needs none of this: dtl loads the CUDA libraries at run time
# (docs/cuda.md). The wheels are pinned to CUDA 13.0, the version of the GPU machines' driver:
#   nvidia-cuda-nvrtc==13.0.88     libnvrtc.so.13 and libnvrtc-builtins.so.13.0 (nvidia/cu13/lib)
#   nvidia-cuda-runtime==13.0.96   cuda_bf16.h, cuda_fp16.h and friends (nvidia/cu13/include)
# They are downloaded once into .whl/ and installed into .toolchain/cuda/py; a second run with
# everything in place only prints the export line. Progress goes to stderr, the export to stdout.
#
#   DTL_CUDA_TOOLCHAIN   install folder (default .toolchain/cuda)
#   DTL_CUDA_WHEELS      wheel cache (default .whl)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tc="${DTL_CUDA_TOOLCHAIN:-$here/.toolchain/cuda}"
whl="${DTL_CUDA_WHEELS:-$here/.whl}"

pins=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-runtime==13.0.96
)

py="$tc/py"
lib="$py/nvidia/cu13/lib"
inc="$py/nvidia/cu13/include"
stamp="$tc/.done-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"

log() { echo "cuda-toolchain: $*" >&2; }
die() { log "error: $*"; exit 1; }

# dtl searches the folders in DTL_CUDA_LIBS first, for the libraries and (in ../include) the headers.
emit() {
    echo "export DTL_CUDA_LIBS=\"$lib\${DTL_CUDA_LIBS:+:\$DTL_CUDA_LIBS}\""
}

if [[ -f "$stamp" && -d "$lib" && -f "$inc/cuda_bf16.h" ]]; then
    emit
    exit 0
fi

start=$SECONDS
pip=(python3 -m pip)
"${pip[@]}" --version >/dev/null 2>&1 || die "python3 with pip is needed to install the CUDA wheels"

mkdir -p "$whl"
if ! "${pip[@]}" download --quiet --no-deps --only-binary=:all: --no-index --find-links "$whl" -d "$whl" "${pins[@]}" >/dev/null 2>&1; then
    log "downloading ${pins[*]} into $whl"
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: -d "$whl" "${pins[@]}" >&2 \
        || die "pip could not download ${pins[*]}"
fi

log "installing the wheels into $py"
rm -rf "$py"
mkdir -p "$py"
"${pip[@]}" install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-index \
    --find-links "$whl" --target "$py" "${pins[@]}" >&2 \
    || die "pip could not install the wheels from $whl"

shopt -s nullglob
nvrtc=("$lib"/libnvrtc.so.13*)
builtins=("$lib"/libnvrtc-builtins.so.13*)
shopt -u nullglob
[[ ${#nvrtc[@]} -gt 0 ]] || die "the wheels left no libnvrtc.so.13 in $lib"
[[ ${#builtins[@]} -gt 0 ]] || die "the wheels left no libnvrtc-builtins.so.13* in $lib"
[[ -f "$inc/cuda_bf16.h" ]] || die "the wheels left no cuda_bf16.h in $inc"

rm -f "$tc"/.done-*
touch "$stamp"
log "ready in $((SECONDS - start)) s: NVRTC in $lib, headers in $inc"
emit
