#!/usr/bin/env bash
# Compile-check the CUDA parts of the minitron extension without a GPU (and even with a
# CPU-only torch). Usage: csrc/check_cuda_compile.sh [python]   (default: python3)
#  1. nvcc -c csrc/gather_cuda_kernel.cu   (torch-free kernels + raw-pointer launcher)
#  2. g++ -fsyntax-only csrc/gather_cuda.cpp -DMINITRON_WITH_CUDA against torch's headers and
#     the CUDA toolkit headers. A CPU-only torch wheel lacks the generated
#     c10/cuda/impl/cuda_cmake_macros.h, so a one-line stub is supplied in a temp dir.
set -euo pipefail
PY=${1:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "SKIP: nvcc not found"; exit 0; }
CUDA_ROOT=${CUDA_HOME:-}
if [ -z "$CUDA_ROOT" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")"; do
    [ -f "$c/include/cuda_runtime_api.h" ] && { CUDA_ROOT=$c; break; }
  done
fi
CUDA_INC=${CUDA_ROOT:-/usr/local/cuda}/include
"$NVCC" -std=c++17 -O3 -c "$HERE/gather_cuda_kernel.cu" -o "$TMP/k.o"
echo "OK: nvcc compiled gather_cuda_kernel.cu"
read -r -a INCS < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
mkdir -p "$TMP/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
ARGS=()
for d in "${INCS[@]}"; do ARGS+=(-isystem "$d"); done
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
${CXX:-g++} -std=c++20 -fsyntax-only -DMINITRON_WITH_CUDA -DTORCH_EXTENSION_NAME=minitron_C \
  -DTORCH_API_INCLUDE_EXTENSION_H "${ARGS[@]}" -isystem "$TMP/stub" -isystem "$CUDA_INC" \
  -isystem "$PYINC" -I"$HERE" "$HERE/gather_cuda.cpp"
echo "OK: g++ -fsyntax-only gather_cuda.cpp (torch CUDA glue)"
