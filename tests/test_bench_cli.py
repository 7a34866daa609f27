"""The benchmark CLI runs end to end on tiny inputs and writes valid results."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "performer.bench", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_attention_suite_writes_json_and_table(tmp_path):
    out = _run(["attention", "--lengths", "64", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    assert out.returncode == 0, out.stderr
    files = sorted(os.listdir(tmp_path))
    data = json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))
    assert {r["mode"] for r in data["attention"]} == {"forward", "forward+backward"}
    assert all(r[name]["median_ms"] > 0 for r in data["attention"] for name in ("sdpa", "torch", "cpp"))
    assert "| 64 | forward |" in out.stdout


def test_no_suite_with_quick_is_accepted(tmp_path):
    """The README's demo command passes only --quick."""
    out = _run(["--quick", "--lengths", "64", "--sizes", "33", "--threads", "1"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Attention time" in out.stdout and "Accuracy" in out.stdout and "Matrix multiply" in out.stdout


@pytest.mark.parametrize("bad", ["nonsense", "ATTENTION"])
def test_unknown_suite_is_an_error(tmp_path, bad):
    out = _run([bad], tmp_path)
    assert out.returncode == 2 and "unknown suite" in out.stderr


def test_matmul_suite_reports_gflops_and_peak(tmp_path):
    out = _run(["matmul", "--sizes", "33", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.load(open(tmp_path / next(f for f in os.listdir(tmp_path) if f.endswith(".json"))))
    assert data["matmul"]["peak_gflops"] > 0
    assert {r["dtype"] for r in data["matmul"]["rows"]} == {"float32", "bfloat16"}
    assert all(r[name]["gflops"] > 0 for r in data["matmul"]["rows"] for name in ("torch", "cpp"))
    assert "| square 33 | float32 |" in out.stdout
