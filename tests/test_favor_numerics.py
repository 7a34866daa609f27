"""Exactness and robustness properties: padding, fully masked rows, causality, extreme logits,
and convergence to exact softmax attention as the number of features grows."""
import pytest
import torch
import torch.nn.functional as F

import performer
from conftest import BACKENDS, EXTREMES, KERNELS, SPECS, assert_future_invisible, dtype_id, make_case, perturb_future

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
MASK_SPECS = [pytest.param(s, id=s.id) for s in SPECS if s.layout in ("4d", "transposed")]


def _attend(q, k, v, w, *, causal=False, mask=None, scale=None, backend=None, kernel="softmax"):
    return performer.favor_attention(q, k, v, is_causal=causal, scale=scale, features=w,
                                     key_padding_mask=mask, kernel=kernel, backend=backend)


def _assert_near(got, expected, dtype, what):
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    bound = TOL[dtype] * max(1.0, expected.abs().max().item() if got.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# ---- padding mask -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", MASK_SPECS)
def test_padding_mask_equals_removing_keys(spec, backend, kernel, dtype):
    """Bidirectional: masking keys gives the result of deleting them (same features)."""
    case = make_case(spec, dtype, masked=True)
    out = case.run(False, backend, kernel)
    for b in range(spec.B):
        keep = ~case.key_padding_mask[b]
        expected = (_attend(case.q[b:b + 1], case.k[b:b + 1, :, keep], case.v[b:b + 1, :, keep], case.features,
                            scale=spec.scale, backend=backend, kernel=kernel)
                    if keep.any() else torch.zeros_like(out[b:b + 1]))
        _assert_near(out[b:b + 1], expected, dtype, f"batch row {b}")


@pytest.mark.parametrize("prefix", [1, 40, 64, 100])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_masked_tail_equals_prefix(backend, kernel, prefix):
    """Causal with keys >= P masked: queries < P see exactly the causal run on the first P
    positions; queries >= P see all P keys, i.e. bidirectional attention over the prefix."""
    dtype, L = torch.float64, 150
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, 2, L, 8, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 2, L, 5, generator=g, dtype=dtype)
    w = performer.orthogonal_features(24, 8, generator=g, dtype=dtype)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, prefix:] = True

    out = _attend(q, k, v, w, causal=True, mask=mask, backend=backend, kernel=kernel)
    head = _attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], w, causal=True,
                   backend=backend, kernel=kernel)
    tail = _attend(q[:, :, prefix:], k[:, :, :prefix], v[:, :, :prefix], w, backend=backend, kernel=kernel)
    _assert_near(out[:, :, :prefix], head, dtype, "queries before the masked tail")
    _assert_near(out[:, :, prefix:], tail, dtype, "queries in the masked tail")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mask_equals_visible_prefix(backend, kernel, dtype):
    """Causal + padding: query t attends to exactly the unmasked keys s <= t."""
    L = 130
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(2, 3, L, 8, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 3, L, 4, generator=g, dtype=dtype)
    w = performer.orthogonal_features(16, 8, generator=g, dtype=dtype)
    mask = torch.rand(2, L, generator=g) < 0.3
    mask[:, :3] = True            # queries 0..2 see no key at all
    mask[1, 60:70] = True         # a masked run across the chunk boundary
    out = _attend(q, k, v, w, causal=True, mask=mask, backend=backend, kernel=kernel)
    for t in (0, 2, 3, 5, 63, 64, 65, 69, 70, 100, 129):
        for b in range(2):
            keep = ~mask[b, :t + 1]
            if not keep.any():
                assert (out[b, :, t] == 0).all(), f"t={t}: no visible key, expected zeros"
                continue
            kt, vt = k[b:b + 1, :, :t + 1][:, :, keep], v[b:b + 1, :, :t + 1][:, :, keep]
            expected = _attend(q[b:b + 1, :, t:t + 1], kt, vt, w, backend=backend, kernel=kernel)
            _assert_near(out[b:b + 1, :, t:t + 1], expected, dtype, f"query t={t}, batch row {b}")


# ---- fully masked rows --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_finite_grads(backend, kernel, causal, dtype):
    g = torch.Generator().manual_seed(9)
    B, H, L, E = 3, 2, 70, 8
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(dtype).requires_grad_() for _ in range(3))
    w = performer.orthogonal_features(16, E, generator=g, dtype=dtype)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True                # every key of row 0 ignored
    mask[2, :66] = True           # causal: queries 0..65 of row 2 see nothing
    out = _attend(q, k, v, w, causal=causal, mask=mask, backend=backend, kernel=kernel)
    assert (out[0] == 0).all()
    if causal:
        assert (out[2, :, :66] == 0).all()
        assert (out[2, :, 66:] != 0).any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(dtype))
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(grad).all(), f"{name} not finite"
    # Nothing depends on an ignored key, and a query that sees no key has no gradient.
    assert (dk[mask[:, None].expand_as(dk[..., 0])] == 0).all()
    assert (dv[mask[:, None].expand_as(dv[..., 0])] == 0).all()
    assert (dq[0] == 0).all()
    if causal:
        assert (dq[2, :, :66] == 0).all()


# ---- causality ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["noise", "scaled", "dominant"])
@pytest.mark.parametrize("t", [0, 63, 64, 100])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_output_ignores_the_future(backend, kernel, t, kind):
    """Outputs and gradients at positions <= t do not see q, k, v at positions > t. For
    "dominant", earlier keys have norm ~24, so a key shift shared with the later keys would
    underflow their features (the kernels must use a running maximum)."""
    g = torch.Generator().manual_seed(10)
    B, H, L, E = 2, 2, 150, 16
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    if kind == "dominant":
        k = k * 6
    w = performer.orthogonal_features(32, E, generator=g)
    perturbed = [perturb_future(kind, x, w, g, t) for x in (q, k, v)]
    assert_future_invisible(lambda *x: _attend(*x, w, causal=True, backend=backend, kernel=kernel),
                            (q, k, v), perturbed, t, g)


# ---- extreme logits -----------------------------------------------------------------------------

def _with_norm(x, norm):
    return x / x.norm(dim=-1, keepdim=True) * norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extreme", list(EXTREMES))
def test_extreme_logits_stay_finite(extreme, backend, kernel, causal, dtype):
    B, H, L, E, norm = EXTREMES[extreme]
    g = torch.Generator().manual_seed(11)
    q, k = (_with_norm(torch.randn(B, H, L, E, generator=g, dtype=torch.float64), norm) for _ in range(2))
    v = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    w = performer.orthogonal_features(32, E, generator=g, dtype=dtype)
    mask = torch.rand(B, L, generator=g) < 0.2
    mask[1] = True
    out = _attend(q, k, v, w, causal=causal, mask=mask, scale=1.0, backend=backend, kernel=kernel)
    assert torch.isfinite(out).all(), f"non-finite outputs at {(~torch.isfinite(out)).nonzero()[:4].tolist()}"
    assert (out[1] == 0).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(dtype))
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(grad).all(), f"{name} not finite"


# ---- convergence --------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_converges_to_sdpa(backend, causal):
    """The relative error to exact softmax attention falls as the number of features grows."""
    g = torch.Generator().manual_seed(12)
    B, H, L, E = 1, 2, 32, 16
    q, k = (torch.randn(B, H, L, E, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    errors = []
    for m in (64, 256, 1024, 4096):
        draws = [_attend(q, k, v, performer.orthogonal_features(m, E, generator=g, dtype=torch.float64),
                         causal=causal, backend=backend) for _ in range(4)]
        errors.append(sum(((o - exact).norm() / exact.norm()).item() for o in draws) / len(draws))
    assert all(b < 1.1 * a for a, b in zip(errors, errors[1:])), f"errors do not fall: {errors}"
    assert errors[-1] < 0.5 * errors[0], f"errors do not fall enough: {errors}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_propagates(backend, kernel, causal):
    """A NaN in a key is not mistaken for padding: every output that can see it is NaN."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    k[0, 0, 0, 3] = float("nan")
    w = performer.orthogonal_features(16, 8, generator=g)
    out = performer.favor_attention(q, k, v, is_causal=causal, features=w, kernel=kernel, backend=backend)
    assert torch.isnan(out[0, 0]).all()
    assert torch.isfinite(out[0, 1]).all()
