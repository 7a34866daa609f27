"""Forward values of every backend against the float64 dense reference (favor_dense)."""
import pytest
import torch

import performer
from conftest import BACKENDS, DTYPES, EMPTY_CASES, KERNELS, Spec, assert_close, case_params, dtype_id, make_case


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,masked,causal", case_params())
def test_matches_dense_reference(spec, masked, causal, backend, kernel, dtype):
    case = make_case(spec, dtype, masked=masked)
    out = case.run(causal, backend, kernel)
    assert out.dtype == dtype
    assert out.shape == tuple(case.q.shape[:-1]) + (spec.Ev,)
    assert_close(out, case.reference(causal, kernel), case.reference(causal, kernel, dtype=dtype))


GQA_CASES = [p for p in case_params() if p.values[0].layout == "4d" and p.values[0].Hk < p.values[0].H]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,masked,causal", GQA_CASES)
def test_grouped_query_equals_repeated_key_heads(spec, masked, causal, backend, kernel):
    """Query head h reads key/value head h // (H // Hk): the same as repeating each key head."""
    case = make_case(spec, torch.float64, masked=masked)
    groups = spec.H // spec.Hk
    k, v = (t.repeat_interleave(groups, dim=1) for t in (case.k, case.v))
    grouped = case.run(causal, backend, kernel)
    repeated = case.run(causal, backend, kernel, k=k, v=v)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,causal", EMPTY_CASES)
def test_empty_sizes(sizes, causal, backend):
    """Zero-sized dimensions give empty outputs, and queries with no key give zeros."""
    B, H, Hk, L, S, E, Ev = sizes
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_()
               for shape in ((B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev)))
    w = torch.randn(12, E, generator=g)
    out = performer.favor_attention(q, k, v, is_causal=causal, features=w, backend=backend)
    assert out.shape == (B, H, L, Ev)
    assert (out == 0).all() if S == 0 else torch.isfinite(out).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert [tuple(t.shape) for t in grads] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


# Causal with fewer queries than keys: the queries are the last L positions (a cached prefix).
PREFIX_SPECS = [Spec("prefix_gqa", 2, 4, 2, 9, 37, 16, 9, 20), Spec("prefix_chunks", 1, 2, 1, 70, 200, 8, 8, 32),
                Spec("prefix_one_query", 2, 2, 2, 1, 33, 8, 5, 16), Spec("prefix_rank3", 3, 1, 1, 5, 6, 8, 8, 16,
                                                                          layout="3d")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spec", PREFIX_SPECS, ids=lambda s: s.id)
def test_causal_with_a_prefix_is_bottom_right_aligned(spec, masked, backend, kernel, dtype):
    """Values and gradients against the dense reference (query t sees keys 0..S - L + t), and the
    same as the last L rows of the causal output over all S positions."""
    case = make_case(spec, dtype, masked=masked, requires_grad=True)
    out = case.run(True, backend, kernel)
    assert_close(out, case.reference(True, kernel), case.reference(True, kernel, dtype=dtype))
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = torch.autograd.grad(out, case.inputs, grad_out)
    x64 = [t.detach().double().requires_grad_() for t in case.inputs]
    ref = torch.autograd.grad(case.reference(True, kernel, q=x64[0], k=x64[1], v=x64[2]), x64, grad_out.double())
    ref_dtype = torch.autograd.grad(case.reference(True, kernel, dtype=dtype), case.inputs, grad_out)
    for name, a, b, r in zip("qkv", got, ref, ref_dtype):
        assert_close(a, b, r, what=f"d{name}", multiple=10.0 if dtype == torch.bfloat16 else 4.0)

    earlier = torch.randn(*case.q.shape[:-2], spec.S - spec.L, spec.E, generator=torch.Generator().manual_seed(2),
                          dtype=dtype)
    whole = case.run(True, backend, kernel, q=torch.cat([earlier, case.q.detach()], dim=-2))
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2 ** -7, rtol=2 ** -7) \
        if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.detach(), whole[..., spec.S - spec.L:, :], **tol)
