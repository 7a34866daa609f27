"""One decoded token after a prefix: performer.favor_attention_step against SDPA with a KV cache."""
import pytest
import torch

import performer
from performer.bench.cases import decode_call, decode_inputs
from performer.bench.registry import DECODE as SPEC, on_device

PREFIXES = [128, 4096]


@pytest.mark.skipif(not hasattr(performer, "favor_attention_step"), reason="no performer.favor_attention_step")
@pytest.mark.parametrize("impl", on_device(SPEC.impls, "cpu"), ids=lambda impl: impl.name)
@pytest.mark.parametrize("batch", SPEC.batches)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_decode(benchmark, impl, batch, prefix):
    prefix_k, prefix_v, token, w = decode_inputs(SPEC, batch, prefix, torch.float32)
    benchmark.group = (f"decode one token prefix={prefix} B={batch} H={SPEC.heads} E={SPEC.dim} "
                       f"m={SPEC.num_features} float32")
    benchmark(decode_call(impl, prefix_k, prefix_v, token, w))
