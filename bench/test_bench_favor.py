"""FAVOR+ attention (C++ and plain PyTorch) and exact SDPA, forward and forward+backward."""
import pytest
import torch

from performer.bench.cases import attention_call, attention_inputs
from performer.bench.registry import ATTENTION as SPEC, on_device

LENGTHS = [1024, 4096]


@pytest.mark.parametrize("impl", on_device(SPEC.impls, "cpu"), ids=lambda impl: impl.name)
@pytest.mark.parametrize("causal", SPEC.causal, ids=["bidir", "causal"])
@pytest.mark.parametrize("mode", SPEC.modes)
@pytest.mark.parametrize("L", LENGTHS)
def test_attention(benchmark, impl, causal, mode, L):
    q, k, v, w = attention_inputs(SPEC, L, torch.float32, requires_grad=mode != "forward")
    benchmark.group = (f"attention {mode} L={L} {'causal' if causal else 'bidir'} B={SPEC.batch} H={SPEC.heads} "
                       f"E={SPEC.dim} m={SPEC.num_features} float32")
    benchmark(attention_call(impl, q, k, v, causal, w, mode))
