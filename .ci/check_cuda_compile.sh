#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu for sm_80 and sm_90, with the flags of
# torch's extension build, and of csrc/cuda/*.cpp (the CUDA op registration) with the host
# compiler. No GPU and no CUDA build of torch are needed: a CPU wheel's headers are enough
# once the one generated c10 CUDA header it lacks is stubbed. With no file arguments it also
# checks that every triplet_cuda symbol an object needs is defined by one of them (or by
# csrc/tensor_ops.cpp), so a missing explicit instantiation fails here, not at import on a GPU.
#
#   bash .ci/check_cuda_compile.sh            # all files, 2 in parallel
#   CUDA_CHECK_JOBS=1 bash .ci/check_cuda_compile.sh csrc/cuda/batch_hard.cu
#   NVCC_EXTRA_FLAGS="--time /tmp/t.csv" bash .ci/check_cuda_compile.sh   # nvcc phase times
#   CUDA_CHECK_ARCHS="90" bash .ci/check_cuda_compile.sh   # what a JIT build on an H100 compiles
#
# Exits 0 with a message when nvcc is absent; non-zero when any file fails to compile
# or emits a warning, or a symbol is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "check_cuda_compile: '$PYTHON' cannot import torch (its headers are needed); failing"
  exit 1
fi

CHECK_SYMBOLS=0
if [[ $# -gt 0 ]]; then
  FILES=("$@")
else
  shopt -s nullglob
  FILES=(csrc/cuda/*.cu csrc/cuda/*.cpp)
  shopt -u nullglob
  CHECK_SYMBOLS=1
fi
if [[ ${#FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files"
  exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check_cuda_compile.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Include paths of torch's extension build plus the Python headers, and the C++ ABI flag.
mapfile -t TORCH_INFO < <("$PYTHON" - <<'PY'
import sysconfig
import torch
import torch.utils.cpp_extension as c
for p in c.include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
)

# The CPU wheel lacks this CMake-generated header; a CUDA build of c10 defines only
# C10_CUDA_BUILD_SHARED_LIBS in it (CUDAMacros.h includes it and needs nothing else).
STUB="$WORK/stub_include"
mkdir -p "$STUB/c10/cuda/impl"
TORCH_INC="${TORCH_INFO[0]#-I}"
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  cat >"$STUB/c10/cuda/impl/cuda_cmake_macros.h" <<'H'
#pragma once
// Stub of the CMake-generated header, for compile checks against a CPU build of torch.
#define C10_CUDA_BUILD_SHARED_LIBS
H
fi

ARCHS="${CUDA_CHECK_ARCHS:-80 90}"
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done
ARCH_NAMES="sm_${ARCHS// /, sm_}"

# torch.utils.cpp_extension's nvcc flags plus _build.py's (-O3 -lineinfo
# --expt-relaxed-constexpr); warnings of our own code are errors.
FLAGS=(${NVCC_EXTRA_FLAGS:-}
  -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr
  "${GENCODE[@]}"
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler -fPIC -Xcompiler -Wall -Xcudafe --display_error_number
  -I"$STUB" "${TORCH_INFO[@]}"
)
# Host C++ files (csrc/cuda/register.cpp): torch's C++ flags.
CXX="${CXX:-c++}"
CXXFLAGS=(
  -std=c++20 -O1 -fPIC -Wall -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  "${TORCH_INFO[@]}"
)

compile_one() {
  local src="$1" name log
  name="$(basename "$src")"
  log="$WORK/$name.log"
  local start=$SECONDS
  local cmd=("$NVCC" "${FLAGS[@]}")
  [[ "$src" == *.cpp ]] && cmd=("$CXX" "${CXXFLAGS[@]}")
  if "${cmd[@]}" -c "$src" -o "$WORK/$name.o" >"$log" 2>&1; then
    # Warnings from our own sources (csrc/) fail the check; torch's headers are not ours.
    if grep -E "^(\./)?csrc/.*(warning|Warning)" "$log" >/dev/null 2>&1 || \
       grep -E "$ROOT/csrc/.*(warning|Warning)" "$log" >/dev/null 2>&1; then
      echo "WARN  $src ($((SECONDS - start)) s)"
      cat "$log"
      return 1
    fi
    echo "ok    $src ($((SECONDS - start)) s)"
    [[ -s "$log" ]] && cat "$log"
    return 0
  fi
  echo "FAIL  $src ($((SECONDS - start)) s)"
  cat "$log"
  return 1
}

JOBS="${CUDA_CHECK_JOBS:-2}"
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1); ${#FILES[@]} file(s), $JOBS at a time"
for src in "${FILES[@]}"; do
  name="$(basename "$src")"
  ( if compile_one "$src" >"$WORK/$name.out" 2>&1; then echo 0; else echo 1; fi ) >"$WORK/$name.rc" &
  # Keep at most $JOBS compiles running.
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do sleep 1; done
done
wait
status=0
for src in "${FILES[@]}"; do
  name="$(basename "$src")"
  cat "$WORK/$name.out"
  if [[ "$(cat "$WORK/$name.rc" 2>/dev/null)" != "0" ]]; then status=1; fi
done
if [[ $status -eq 0 && $CHECK_SYMBOLS -eq 1 ]]; then
  # Every triplet_cuda:: symbol some object leaves undefined must be defined by another
  # (explicit instantiations in one .cu, entry points for register.cpp) or tensor_ops.cpp.
  "$CXX" "${CXXFLAGS[@]}" -c csrc/tensor_ops.cpp -o "$WORK/tensor_ops.o"
  nm -C --defined-only "$WORK"/*.o | awk '$2 ~ /^[TWtuV]$/' | cut -d' ' -f3- | sort -u >"$WORK/defined"
  nm -C --undefined-only "$WORK"/*.o | awk '{$1=""; print substr($0, 2)}' | grep 'triplet_cuda::' \
    | sort -u >"$WORK/needed"
  missing="$(comm -23 "$WORK/needed" "$WORK/defined")"
  if [[ -n "$missing" ]]; then
    echo "check_cuda_compile: symbols used but defined nowhere (a missing instantiation?):"
    echo "$missing"
    status=1
  else
    echo "check_cuda_compile: $(wc -l <"$WORK/needed") triplet_cuda symbol(s) used across files, all defined"
  fi
fi
if [[ $status -ne 0 ]]; then
  echo "check_cuda_compile: FAILED ($SECONDS s)"
else
  echo "check_cuda_compile: all ${#FILES[@]} file(s) compiled (.cu for $ARCH_NAMES) ($SECONDS s)"
fi
exit $status
