#!/usr/bin/env bash
# The GPU checks in one call, for a machine with an NVIDIA GPU, a CUDA build of torch, nvcc and
# triton (no network needed): build the extension from source with its CUDA kernels, run the CUDA
# and Triton tests on the GPU, then the GPU benchmarks. Logs, JUnit XML and benchmark results go to
# OUT (default bench/results/gpu-<date>); the last lines printed are a summary.
#   STEPS="build test sanitize bench" (default) picks steps; TESTS overrides the test files; BENCH picks
#   benchmark runs (below) and BENCH_ARGS adds arguments to each; PY=python3; TORCH_CUDA_ARCH_LIST
#   defaults to the GPU's; WORKERS test processes (8) where pytest-xdist is installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-build test sanitize bench}
TESTS=${TESTS:-$(ls tests/test_*cuda*.py tests/test_*triton*.py 2>/dev/null | tr '\n' ' ')}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
summary=()

"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
      f"capability {p.major}.{p.minor}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PYEOF
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

step() { [[ " $STEPS " == *" $1 "* ]]; }

if step build; then
  start=$SECONDS
  if "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    summary+=("build: ok in $((SECONDS - start)) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)")
  else
    tail -n 60 "$OUT/build.log"
    echo "gpu.sh: build FAILED (log: $OUT/build.log)"
    exit 1
  fi
  grep -E "performer: building" "$OUT/build.log"
fi

if step test; then
  start=$SECONDS
  # shellcheck disable=SC2086
  # Parallel workers where pytest-xdist is installed: most of the time is Triton compiling kernels.
  workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-8}")
  "$PY" -m pytest $TESTS "${workers[@]}" -q -p no:cacheprovider -rfEs --junitxml="$OUT/tests.xml" 2>&1 \
    | tee "$OUT/tests.log" | tail -n 40
  summary+=("tests ($TESTS): $(tail -n 1 "$OUT/tests.log") [$((SECONDS - start)) s]")
fi

# compute-sanitizer on small calls of every CUDA kernel (scripts/sanitize_cuda.py).
if step sanitize; then
  for tool in memcheck racecheck; do
    start=$SECONDS
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" scripts/sanitize_cuda.py \
      >"$OUT/sanitize-$tool.log" 2>&1
    status=$?
    tail -n 5 "$OUT/sanitize-$tool.log"
    summary+=("compute-sanitizer $tool: exit $status [$((SECONDS - start)) s] (log: $OUT/sanitize-$tool.log)")
  done
fi

# One benchmark run per entry of BENCH (name: arguments of python -m performer.bench).
declare -A BENCH_RUNS=(
  [attention-e64]="attention --device cuda"
  [attention-e128]="attention --device cuda --dim 128"
  [matmul]="matmul --device cuda --sizes 4096 8192 --dtype bfloat16 float16 float32"
  [decode]="decode --device cuda"
)
BENCH=${BENCH:-attention-e64 attention-e128 matmul decode}
if step bench; then
  for name in $BENCH; do
    start=$SECONDS
    # shellcheck disable=SC2086
    "$PY" -m performer.bench ${BENCH_RUNS[$name]} --out "$OUT/$name" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench-$name.log" | tail -n 40
    summary+=("bench $name: exit ${PIPESTATUS[0]} [$((SECONDS - start)) s]")
  done
fi

echo
printf '%s\n' "${summary[@]}"
