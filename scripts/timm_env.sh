# Sourced by scripts/test.sh: a second environment for the timm integration's tests. timm needs
# torchvision, and no torchvision on PyPI imports beside the CPU torch of .venv, so .venv-timm
# holds torch 2.14.1 and torchvision 0.29.1 (a CUDA build, run on the CPU here), timm, and
# performer built from this checkout against that torch (from a copy, so that the in-place build
# of .venv stays as it is).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TPY="$ROOT/.venv-timm/bin/python"
if [ ! -x "$TPY" ]; then
  echo "== creating .venv-timm"
  "${PYTHON:-python3}" -m venv .venv-timm
fi
if ! "$TPY" -c "import timm, torchvision, numpy, pytest, pybind11, ninja, setuptools, wheel" 2>/dev/null; then
  echo "== installing torch 2.14.1, torchvision 0.29.1, timm into .venv-timm"
  "$TPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm>=1.0.20" numpy pytest pybind11 ninja \
      setuptools wheel 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
stamp=.venv-timm/performer-built
if [ ! -e "$stamp" ] || [ -n "$(find csrc performer setup.py -name '*.so' -prune -o -newer "$stamp" -print -quit)" ]; then
  echo "== building performer into .venv-timm"
  rm -rf .venv-timm/src && mkdir -p .venv-timm/src
  cp -r csrc setup.py pyproject.toml README.md .venv-timm/src/
  cp -r performer .venv-timm/src/
  find .venv-timm/src/performer \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
  PERFORMER_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$TPY" -m pip install -q --no-build-isolation --no-deps .venv-timm/src 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  touch "$stamp"
fi
