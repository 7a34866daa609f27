"""examples/compress_model.py in its quick mode: compressing the pruned model keeps its outputs,
int8 keeps its accuracy, and the stored weights shrink as claimed."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compress_example():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "compress_model.py"), "--quick"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {name.split(",", 1)[-1].strip() if name.startswith("large") else "small": (float(kl), float(agree), float(kb))
            for name, kl, agree, kb in re.findall(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", result.stdout,
                                                 flags=re.M)}
    dense, masked = rows["dense"], rows["90% pruned (masked)"]
    compressed, int8 = rows["block-sparse (CompressedLinear)"], rows["block-sparse int8 (Int8Linear)"]
    assert abs(compressed[0] - masked[0]) < 1e-4, result.stdout          # the same function, stored sparse
    assert int8[0] < compressed[0] + 0.01 + 0.05 * compressed[0], result.stdout   # int8 keeps the accuracy
    assert compressed[2] < 0.35 * dense[2] and int8[2] < 0.6 * compressed[2], result.stdout
    assert dense[0] < 0.5 and rows["small"][0] < 0.5, result.stdout     # both learned the teacher
