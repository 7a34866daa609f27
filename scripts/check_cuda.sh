#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc against the installed torch's headers, the way the
# extension build does (setup.py, torch.utils.cpp_extension: same defines and flags), for sm_80 and
# sm_90a: `nvcc -c` (host and device code) for sm_80, device code only (`nvcc -cubin`) for sm_90a,
# both at once. Fails on any compile error and on any register spill or local-memory use that
# ptxas reports. Needs nvcc but neither a GPU nor a CUDA build of torch. Outputs go to a temporary
# directory that is removed afterwards.
#   PY=python (default .venv/bin/python) finds torch; NVCC=path overrides nvcc (default: PATH, then
#   /usr/local/cuda/bin/nvcc); VERBOSE=1 also prints ptxas' resource usage (registers, shared
#   memory, stack) of every kernel.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x $NVCC ]] || { echo "check_cuda: nvcc not found (set NVCC or put it on PATH)" >&2; exit 1; }

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "check_cuda: no csrc/cuda/*.cu to compile"
  exit 0
fi

# Include directories, the C++ ABI and cpp_extension's own nvcc flags (-D__CUDA_NO_HALF_OPERATORS__,
# --expt-relaxed-constexpr, ...), as the build would pass them.
torch_flags=$("$PY" - <<'EOF'
import os
import torch
from torch.utils import cpp_extension
include = os.path.join(os.path.dirname(torch.__file__), "include")
flags = [f"-I{include}", f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *cpp_extension.COMMON_NVCC_FLAGS]
# A CPU-only torch lacks the header that CUDA builds generate for c10/cuda (it only sets export
# macros for Windows DLLs); c10 has a switch for building without it.
if not os.path.exists(os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print("\n".join(flags))
EOF
) || { echo "check_cuda: cannot import torch with $PY (set PY)" >&2; exit 1; }
mapfile -t torch_flags <<<"$torch_flags"

archs=(80 90a)
ptxas=-warn-spills,-warn-lmem-usage
[[ ${VERBOSE:-0} == 1 ]] && ptxas+=,-v
common=(-std=c++20 -Icsrc "${torch_flags[@]}" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
        -Xcompiler -fPIC -O3 --use_fast_math -lineinfo -Xptxas "$ptxas")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Per file, one nvcc per architecture, all in parallel: `-c` (host and device code, an object file)
# for the first, `-cubin` (device code only) for the others: the host side, mostly torch's headers
# and the slower half, is the same for every architecture.
demangle=cat
command -v c++filt >/dev/null && demangle=c++filt
status=0
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  start=$SECONDS
  pids=()
  for i in "${!archs[@]}"; do
    arch=${archs[$i]}
    if (( i == 0 )); then mode=(-c -o "$tmp/$name.sm_$arch.o"); else mode=(-cubin -o "$tmp/$name.sm_$arch.cubin"); fi
    echo "check_cuda: compiling $src for sm_$arch (nvcc ${mode[0]})"
    "$NVCC" "$src" "${mode[@]}" -gencode "arch=compute_$arch,code=sm_$arch" "${common[@]}" \
      >"$tmp/$name.sm_$arch.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!archs[@]}"; do
    arch=${archs[$i]}
    log=$tmp/$name.sm_$arch.log
    if ! wait "${pids[$i]}"; then
      cat "$log"
      echo "check_cuda: $src for sm_$arch: FAILED to compile" >&2
      status=1
    elif grep -iE "ptxas.*(spill|local memory)" "$log"; then
      echo "check_cuda: $src for sm_$arch: register spills or local memory (above)" >&2
      status=1
    else
      if [[ ${VERBOSE:-0} == 1 ]]; then
        grep -E "ptxas info *: (Compiling|Used)|stack frame" "$log" | $demangle || true
      fi
      echo "check_cuda: $src for sm_$arch: ok"
    fi
  done
  echo "check_cuda: $src took $((SECONDS - start)) s"
done
exit $status
