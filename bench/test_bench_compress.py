"""A block-pruned performer.nn.CompressedLinear and its int8 forms (performer.nn.Int8Linear, dynamic
and weight-only) against torch's dense float32, bfloat16, dynamic int8 and BSR products, y = x W^T
with K = N; the block-sparse ones at each density (1.0: every block kept)."""
import pytest
import torch

from performer.bench.cases import compress_call, compress_layer
from performer.bench.registry import COMPRESS as SPEC, on_device

K = 2048
IMPLS = [pytest.param(impl, density, id=impl.name + (f"-{density}" if density else ""))
         for impl in on_device(SPEC.impls, "cpu") for density in (SPEC.densities.quick if impl.sparse else (None,))]


@pytest.mark.parametrize("impl, density", IMPLS)
@pytest.mark.parametrize("M", SPEC.rows.quick)
def test_compress(benchmark, impl, density, M):
    layer = compress_layer(SPEC, K, density)
    benchmark.group = f"compress linear M={M} K=N={K} threads={torch.get_num_threads()} float32"
    benchmark.extra_info["density"] = getattr(layer, "density", 1.0)
    try:
        call = compress_call(impl, layer, torch.randn(M, K, generator=torch.Generator().manual_seed(1)))
    except (ValueError, RuntimeError, NotImplementedError) as e:  # int8: quantize_dynamic may be gone from torch
        pytest.skip(str(e).splitlines()[0])
    benchmark(call)
