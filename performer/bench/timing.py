"""Timing and memory measurement shared by the benchmark CLI and the pytest-benchmark suite."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # interquartile range
    repeats: int

    @property
    def noisy(self) -> bool:
        return self.spread_ms > 0.1 * self.median_ms


def time_fn(fn, *, min_repeats: int = 3, max_repeats: int = 30, budget_s: float = 2.0, warmup: int = 1) -> Timing:
    """Median wall time of fn() after warm-up, repeating until the time budget or max_repeats."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    try:
        info["cpu_isa"] = torch.ops.performer.cpu_isa()
    except (AttributeError, RuntimeError):
        pass
    return info


def peak_extra_memory_mb(code: str, threads: int) -> float:
    """Peak resident memory added by running `code` after `setup` in a fresh process, in MiB.

    `code` defines setup() (allocate inputs) and run() (the measured work); the result is the
    process's peak RSS minus its RSS after setup().
    """
    script = code + """
import resource, sys, torch
torch.set_num_threads(%d)
setup()
def rss_kb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)
base = rss_kb()
run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
""" % threads
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024.0


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
