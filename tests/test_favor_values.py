"""Forward values of every backend against the float64 dense reference (favor_dense)."""
import pytest
import torch

import performer
from conftest import BACKENDS, DTYPES, EMPTY_CASES, KERNELS, assert_close, case_params, dtype_id, make_case


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
