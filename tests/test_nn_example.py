"""examples/convert_and_finetune.py in its quick mode: the loss rises at the conversion to FAVOR+,
calibration brings most of it back without changing a weight, and fine-tuning the rest."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_convert_and_finetune_example_recovers_the_loss():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "convert_and_finetune.py"), "--quick"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = {name: float(value) for name, value in re.findall(r"loss (.+?):\s+([0-9.]+)", result.stdout)}
    before, converted, calibrated, tuned = (losses[k] for k in ("before conversion", "right after conversion",
                                                                "after calibration", "after fine-tuning"))
    assert converted > before + 0.2, result.stdout
    assert calibrated - before < 0.2 * (converted - before), result.stdout  # most of the jump undone
    assert tuned < before + 0.1 * (converted - before), result.stdout
