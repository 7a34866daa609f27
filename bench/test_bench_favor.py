"""pytest-benchmark microbenchmarks of FAVOR+ on the CPU, grouped by op and shape so that
`--benchmark-compare` lines up runs:

    pytest bench/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

Kept out of the test run (tests/ is the test path). Threads: torch's default unless
PERFORMER_BENCH_THREADS is set.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import performer
from performer.bench.__main__ import make_inputs

if "PERFORMER_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["PERFORMER_BENCH_THREADS"]))

LENGTHS = [1024, 4096]
IMPLS = {
    "cpp": lambda q, k, v, c, w: performer.favor_attention(q, k, v, is_causal=c, features=w, backend="cpp"),
    "torch": lambda q, k, v, c, w: performer.favor_attention(q, k, v, is_causal=c, features=w, backend="torch"),
    "sdpa": lambda q, k, v, c, w: F.scaled_dot_product_attention(q, k, v, is_causal=c),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L", LENGTHS)
def test_favor_forward(benchmark, impl, causal, L):
    q, k, v, w = make_inputs(L, torch.float32)
    benchmark.group = f"favor forward L={L} {'causal' if causal else 'bidir'} B=1 H=8 E=64 m=256 fp32"
    with torch.no_grad():
        benchmark(IMPLS[impl], q, k, v, causal, w)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L", LENGTHS)
def test_favor_forward_backward(benchmark, impl, causal, L):
    q, k, v, w = make_inputs(L, torch.float32, requires_grad=True)
    benchmark.group = f"favor forward+backward L={L} {'causal' if causal else 'bidir'} B=1 H=8 E=64 m=256 fp32"

    def step():
        IMPLS[impl](q, k, v, causal, w).sum().backward()

    benchmark(step)
