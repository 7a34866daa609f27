"""The CUDA sources compile, for sm_80 and sm_90a, without register spills (scripts/check_cuda.sh).

Needs nvcc only (no GPU, no CUDA build of torch), so it also runs on CPU-only machines that have
the CUDA toolkit; skipped where nvcc is not found.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NVCC = Path("/usr/local/cuda/bin/nvcc")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return str(DEFAULT_NVCC) if os.access(DEFAULT_NVCC, os.X_OK) else None


def test_cuda_sources_compile_without_spills():
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor at /usr/local/cuda/bin/nvcc): "
                    "cannot compile csrc/cuda/*.cu")
    env = dict(os.environ, NVCC=nvcc, PY=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda.sh")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert result.returncode == 0, f"scripts/check_cuda.sh failed ({result.returncode}):\n{result.stdout}"
