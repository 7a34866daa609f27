"""blocked_matmul against torch.matmul on square and FAVOR+ shapes, float32 and bfloat16."""
import pytest

from performer.bench.cases import DTYPES, matmul_inputs
from performer.bench.registry import MATMUL as SPEC, MatmulShape, on_device

SHAPES = [MatmulShape(f"square {n}", 1, n, n, n) for n in (256, 1024)] + list(SPEC.favor_shapes)


@pytest.mark.parametrize("impl", on_device(SPEC.impls, "cpu"), ids=lambda impl: impl.name)
@pytest.mark.parametrize("dtype", SPEC.dtypes)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_matmul(benchmark, impl, dtype, shape):
    a, b = matmul_inputs(shape, DTYPES[dtype])
    benchmark.group = f"matmul {shape.name} {shape.batch}x{shape.M}x{shape.K}x{shape.N} {dtype}"
    benchmark.extra_info["gflop"] = shape.flops * 1e-9
    benchmark(impl.fn, a, b)
