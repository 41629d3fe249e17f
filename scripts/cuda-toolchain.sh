#!/usr/bin/env bash
# Prepares what `cargo build --features cuda` needs and prints the variables to export.
#
#   eval "$(scripts/cuda-toolchain.sh)"
#
# With a real CUDA install (`nvcc` and `nvidia-smi` on PATH) it only prints variables for it.
# Otherwise it installs the pinned CUDA 13.0 build toolchain from PyPI into .toolchain/cuda
# (wheels are kept in .whl/ so a second install needs no network), and builds there:
#   root/include   -> the wheels' include dir (cuda.h, cublas, nvrtc headers)
#   root/lib64     unversioned links to the wheels' libraries and a stub libcuda.so
#                  (SONAME libcuda.so.1, one empty function per driver symbol cudarc declares);
#                  the real driver library replaces it at run time on a GPU machine
#   bin/nvidia-smi a stand-in that prints the compute capability (9.0, Hopper)
# Running it again when everything is in place takes well under a second.
# Progress goes to stderr; only `export` lines go to stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tc="${DTL_CUDA_TOOLCHAIN:-$here/.toolchain/cuda}"
whl="${DTL_CUDA_WHEELS:-$here/.whl}"
cap="${CUDA_COMPUTE_CAP:-90}"
cudarc_version="0.9.15"

# Pinned to the CUDA 13.0 driver of the GPU machines; nvvm 13.0.88 writes PTX the 13.0 driver accepts.
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
)

log() { echo "cuda-toolchain: $*" >&2; }
die() { log "error: $*"; exit 1; }

# A real toolkit and driver: use them as they are.
if [[ -z "${DTL_CUDA_FORCE_PYPI:-}" ]] && command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1; then
    nvcc_bin="$(dirname "$(command -v nvcc)")"
    root="${CUDA_ROOT:-$(cd "$nvcc_bin/.." && pwd)}"
    [[ -f "$root/include/cuda.h" ]] || die "found nvcc in $nvcc_bin but no $root/include/cuda.h; set CUDA_ROOT to the toolkit root"
    real_cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')"
    log "using the CUDA install at $root (compute capability ${real_cap:-$cap})"
    echo "export CUDA_ROOT=\"$root\""
    echo "export CUDA_COMPUTE_CAP=\"${real_cap:-$cap}\""
    for d in "$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib"; do
        if [[ -d "$d" ]]; then
            echo "export LIBRARY_PATH=\"$d\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
            echo "export LD_LIBRARY_PATH=\"$d\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
            break
        fi
    done
    exit 0
fi

py="$tc/py"
cu="$py/nvidia/cu13"
root="$tc/root"
stamp="$tc/.done-$(printf '%s\n' "${pins[@]}" "$cudarc_version" "$cap" | sha256sum | cut -c1-16)"

emit() {
    echo "export CUDA_ROOT=\"$root\""
    echo "export CUDA_COMPUTE_CAP=\"$cap\""
    echo "export PATH=\"$cu/bin:$tc/bin\${PATH:+:\$PATH}\""
    echo "export LIBRARY_PATH=\"$root/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
    echo "export LD_LIBRARY_PATH=\"$root/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
}

if [[ -f "$stamp" ]]; then
    emit
    exit 0
fi

start=$SECONDS
command -v gcc >/dev/null 2>&1 || die "gcc is needed to build the stub libcuda.so (apt-get install gcc)"
pip=(python3 -m pip)
"${pip[@]}" --version >/dev/null 2>&1 || die "python3 with pip is needed to install the CUDA wheels"

# 1. Wheels: download once into .whl/, install from there.
mkdir -p "$whl"
if ! "${pip[@]}" download --quiet --no-deps --only-binary=:all: --no-index --find-links "$whl" -d "$whl" "${pins[@]}" >/dev/null 2>&1; then
    log "downloading ${#pins[@]} CUDA 13.0 wheels into $whl"
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: -d "$whl" "${pins[@]}" >&2 \
        || die "pip could not download ${pins[*]}"
fi
log "installing the wheels into $py"
rm -rf "$py"
mkdir -p "$py"
"${pip[@]}" install --quiet --root-user-action=ignore --no-deps --no-index --find-links "$whl" --target "$py" "${pins[@]}" >&2 \
    || die "pip could not install the wheels from $whl"
[[ -f "$cu/include/cuda.h" ]] || die "the wheels left no $cu/include/cuda.h"
[[ -x "$cu/bin/nvcc" ]] || die "the wheels left no $cu/bin/nvcc"

# 2. The root: include link and lib64 with unversioned links.
rm -rf "$root"
mkdir -p "$root/lib64" "$tc/bin"
ln -s "$cu/include" "$root/include"
shopt -s nullglob
for lib in "$cu"/lib/lib*.so.*; do
    base="$(basename "$lib")"
    ln -sf "$lib" "$root/lib64/$base"
    ln -sf "$lib" "$root/lib64/${base%%.so.*}.so"
done
shopt -u nullglob
for need in cublas cublasLt nvrtc; do
    [[ -e "$root/lib64/lib$need.so" ]] || die "no lib$need.so among the installed wheels ($cu/lib)"
done

# 3. Stub libcuda.so: every driver function cudarc declares, as an empty function.
sys=""
for reg in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version"/src/driver/sys.rs; do
    [[ -f "$reg" ]] && sys="$reg"
done
if [[ -z "$sys" ]]; then
    log "fetching the cudarc $cudarc_version sources"
    (cd "$here" && cargo fetch --quiet >&2) || true
    for reg in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version"/src/driver/sys.rs; do
        [[ -f "$reg" ]] && sys="$reg"
    done
fi
[[ -n "$sys" ]] || die "cudarc $cudarc_version sources not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src (run cargo fetch)"
stub_c="$tc/libcuda_stub.c"
{
    echo "/* Link-time stand-in for the CUDA driver library; never used at run time. */"
    grep -oE 'pub fn cu[A-Za-z0-9_]+' "$sys" | sed 's/^pub fn //' | sort -u | sed 's/.*/int &(void) { return 999; }/'
} >"$stub_c"
n_syms=$(($(wc -l <"$stub_c") - 1))
[[ $n_syms -gt 100 ]] || die "found only $n_syms driver functions in $sys"
gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$root/lib64/libcuda.so" "$stub_c"
ln -sf libcuda.so "$root/lib64/libcuda.so.1"

# 4. nvidia-smi stand-in (dfdx's build script asks it for the compute capability).
major="${cap:0:${#cap}-1}"
minor="${cap: -1}"
cat >"$tc/bin/nvidia-smi" <<EOF
#!/bin/sh
# Build-time stand-in: dfdx's build script reads the compute capability from here.
echo compute_cap
echo $major.$minor
EOF
chmod +x "$tc/bin/nvidia-smi"

# Check: nvcc runs from its own bin dir and can target the chosen architecture.
"$cu/bin/nvcc" --list-gpu-code | grep -qx "sm_$cap" || die "nvcc in $cu/bin cannot target sm_$cap"

rm -f "$tc"/.done-*
touch "$stamp"
log "ready in $((SECONDS - start)) s: $n_syms stub driver symbols, root $root"
emit
