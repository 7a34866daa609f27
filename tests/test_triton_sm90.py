"""The FAVOR+ Triton kernels compile for an H100 (sm_90) within its shared memory, checked without a
GPU by scripts/triton_sm90.py (run in a subprocess: it declares a CUDA build of torch to define the
kernels). The largest head sizes, 128 and 256, at m = 256 features, in bfloat16 and float32."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton with its NVIDIA backend is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton 3.6 on an H100 needed about 10% more shared memory than this checkout's Triton reports for
# the same kernels: keep that much below the 227 KiB a block may use.
MARGIN = 0.9


def test_every_kernel_fits_an_h100(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_sm90.py"), "--dims", "128", "256",
                          "--dtypes", "bf16", "fp32", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 8
    too_big = [r for r in rows if r["shared"] > MARGIN * 232448]
    assert not too_big, f"over {MARGIN:.0%} of an H100's shared memory per block: {too_big}"
