# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv (once), installs torch 2.13.0 if
# the environment has no torch, the other dependencies, and builds the extension in place.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  # Where the default index serves CUDA builds, set PIP_INDEX_URL to a CPU wheel index first.
  echo "== installing torch 2.13.0"
  "$PY" -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
if ! "$PY" -c "import numpy, pytest, pytest_benchmark, pybind11, ninja, setuptools, wheel, triton, matplotlib" 2>/dev/null; then
  # triton has no torch dependency; without a GPU it runs the Triton kernels' tests in its interpreter.
  echo "== installing numpy pytest pytest-benchmark pybind11 ninja triton matplotlib"
  "$PY" -m pip install -q numpy pytest pytest-benchmark pybind11 ninja setuptools wheel "triton>=3.4" matplotlib 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
fi
if ! "$PY" -c "import transformers; assert int(transformers.__version__.split('.')[0]) >= 5" 2>/dev/null; then
  # The Hugging Face integration's tests build models from configs (no downloads); with torch
  # already installed, transformers pulls no other torch.
  echo "== installing transformers"
  "$PY" -m pip install -q "transformers>=5,<6" 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
# Rebuilt only when there is no extension or a C++ source or setup.py is newer than it (pip's
# editable build compiles from scratch every time).
so=$(ls performer/_C*.so 2>/dev/null | head -n1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
  echo "== building performer._C"
  if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    echo "building performer._C failed" >&2
    exit 1
  fi
fi
"$PY" -c "import performer, torch; print('performer ready, CPU kernels:', torch.ops.performer.cpu_isa())"
