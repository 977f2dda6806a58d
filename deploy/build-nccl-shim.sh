#!/usr/bin/env bash
# Builds libpcb_nccl.so: the trainer's c10d shim (stages/trainer/csrc/dist_shim.cpp)
# compiled against ProcessGroupNCCL and linked to libtorch_cuda.so. The trainer opens it
# at run time when its rank sits on a GPU (backend `auto` or `nccl`); the trainer binary
# itself never links CUDA, so it keeps starting on machines without it.
#
# Needs a CUDA build of torch 2.11.0's libraries (libtorch_cuda.so, libc10_cuda.so: the
# PyPI wheel `torch==2.11.0` has them) and the headers of CUDA 13 and NCCL.
#
# Usage: deploy/build-nccl-shim.sh [--fetch-headers] [OUT_DIR]
#   OUT_DIR          where libpcb_nccl.so goes (default: <root>/.libtorch/lib, which the
#                    trainer's RUNPATH already searches)
#   --fetch-headers  download the CUDA/NCCL header wheels from PyPI into
#                    <root>/.cache/cuda-headers when no CUDA toolkit is installed
#                    (about 1.2 GB of wheels, of which only include/ is kept)
#
# Environment:
#   TORCH_LIB     folder holding libtorch_cuda.so (default: the `torch` importable by
#                 python3, else <root>/.libtorch/lib)
#   TORCH_INCLUDE torch's headers (default: <root>/.libtorch/include)
#   CUDA_HOME     CUDA toolkit (default /usr/local/cuda); its include/ is searched
#   PCB_CUDA_INCLUDE  extra header folders, colon separated
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
FETCH=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --fetch-headers) FETCH=1 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "build-nccl-shim: unknown option $arg" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-$ROOT/.libtorch/lib}"
log() { printf 'build-nccl-shim: %s\n' "$*"; }
die() { printf 'build-nccl-shim: ERROR: %s\n' "$*" >&2; exit 1; }

# --- torch's CUDA libraries ----------------------------------------------------------
if [ -z "${TORCH_LIB:-}" ]; then
    py_torch=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
    if [ -n "$py_torch" ] && [ -f "$py_torch/libtorch_cuda.so" ]; then
        TORCH_LIB="$py_torch"
    else
        TORCH_LIB="$ROOT/.libtorch/lib"
    fi
fi
[ -f "$TORCH_LIB/libtorch_cuda.so" ] ||
    die "no libtorch_cuda.so in $TORCH_LIB: install a CUDA build of torch 2.11.0 (pip install torch==2.11.0) and set TORCH_LIB to its torch/lib folder"
TORCH_INCLUDE="${TORCH_INCLUDE:-$ROOT/.libtorch/include}"
[ -f "$TORCH_INCLUDE/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp" ] ||
    TORCH_INCLUDE="$(dirname "$TORCH_LIB")/include"
[ -f "$TORCH_INCLUDE/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp" ] ||
    die "torch headers with ProcessGroupNCCL.hpp not found (set TORCH_INCLUDE)"

# --- CUDA and NCCL headers -------------------------------------------------------------
HEADER_CACHE="$ROOT/.cache/cuda-headers"
if [ "$FETCH" = 1 ]; then
    PY="$ROOT/.venv/bin/python"
    [ -x "$PY" ] || PY=python3
    mkdir -p "$HEADER_CACHE/wheels"
    log "downloading CUDA 13 / NCCL header wheels into $HEADER_CACHE"
    # The versions torch 2.11.0 pins (cuda-toolkit 13.0.2, nvidia-nccl-cu13 2.28.9).
    "$PY" -m pip download -q --only-binary=:all: -d "$HEADER_CACHE/wheels" \
        "cuda-toolkit[cublas,cusparse,cusolver,curand,nvcc]==13.0.2" nvidia-nccl-cu13==2.28.9
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$HEADER_CACHE/wheels" nvidia-cuda-cccl
    for w in "$HEADER_CACHE"/wheels/*.whl; do
        unzip -o -q "$w" 'nvidia/*/include/*' -d "$HEADER_CACHE" 2>/dev/null || true
    done
    rm -rf "$HEADER_CACHE/wheels"
fi

CANDIDATES=()
IFS=: read -r -a extra <<<"${PCB_CUDA_INCLUDE:-}"
for d in "${extra[@]}"; do [ -n "$d" ] && CANDIDATES+=("$d"); done
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
CANDIDATES+=("$CUDA_HOME/include" "$CUDA_HOME/include/cccl" /usr/include)
site=$(dirname "$(dirname "$TORCH_LIB")")
for d in "$site"/nvidia/*/include "$site"/nvidia/*/include/cccl \
    "$HEADER_CACHE"/nvidia/*/include "$HEADER_CACHE"/nvidia/*/include/cccl; do
    [ -d "$d" ] && CANDIDATES+=("$d")
done

INCLUDES=()
need() { # need HEADER: adds the first candidate folder holding it
    for d in "${CANDIDATES[@]}"; do
        if [ -f "$d/$1" ]; then
            INCLUDES+=("-I$d")
            return 0
        fi
    done
    die "header $1 not found (searched: ${CANDIDATES[*]}); install the CUDA 13 toolkit, or rerun with --fetch-headers, or set PCB_CUDA_INCLUDE"
}
for h in cuda_runtime_api.h crt/host_config.h nv/target cublas_v2.h cusparse.h nccl.h; do
    need "$h"
done

mkdir -p "$OUT"
log "torch libraries: $TORCH_LIB"
log "compiling $OUT/libpcb_nccl.so"
g++ -std=c++17 -O2 -shared -fPIC \
    -DPCB_BACKEND_NCCL -DUSE_C10D_NCCL -D_GLIBCXX_USE_CXX11_ABI=1 \
    -Wno-deprecated-declarations -Wno-unused-parameter -Wno-interference-size \
    -I"$TORCH_INCLUDE" -I"$TORCH_INCLUDE/torch/csrc/api/include" "${INCLUDES[@]}" \
    "$ROOT/stages/trainer/csrc/dist_shim.cpp" \
    -L"$TORCH_LIB" -Wl,--no-as-needed -ltorch_cuda -lc10_cuda -ltorch_cpu -lc10 \
    -Wl,--allow-shlib-undefined \
    -o "$OUT/libpcb_nccl.so"
log "done: $OUT/libpcb_nccl.so (the trainer finds it through its RUNPATH or PCB_NCCL_SHIM)"
