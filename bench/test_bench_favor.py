"""pytest-benchmark microbenchmarks of FAVOR+ on the CPU, grouped by op and shape so that
`--benchmark-compare` lines up runs:

    pytest bench/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

Kept out of the test run (tests/ is the test path). Threads: torch's default unless
PERFORMER_BENCH_THREADS is set.
"""
import os

import pytest
import torch

from performer.bench.__main__ import IMPLS, make_inputs

if "PERFORMER_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["PERFORMER_BENCH_THREADS"]))

LENGTHS = [1024, 4096]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L", LENGTHS)
def test_favor_forward(benchmark, impl, causal, L):
    q, k, v, w = make_inputs(L, torch.float32)
    benchmark.group = f"favor forward L={L} {'causal' if causal else 'bidir'} B=1 H=8 E=64 m=256 fp32"
    with torch.no_grad():
        benchmark(IMPLS[impl][1], q, k, v, causal, w)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L", LENGTHS)
def test_favor_forward_backward(benchmark, impl, causal, L):
    q, k, v, w = make_inputs(L, torch.float32, requires_grad=True)
    benchmark.group = f"favor forward+backward L={L} {'causal' if causal else 'bidir'} B=1 H=8 E=64 m=256 fp32"

    def step():
        IMPLS[impl][1](q, k, v, causal, w).sum().backward()

    benchmark(step)
