"""orthogonal_features: shapes, reproducibility, orthogonality, norms and unbiasedness."""
import math
import re

import pytest
import torch

import performer
from conftest import dtype_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m,d", [(1, 1), (7, 3), (20, 16), (16, 16), (256, 64)])
def test_shape_dtype_device(m, d, dtype):
    w = performer.orthogonal_features(m, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert w.shape == (m, d) and w.dtype == dtype and w.device.type == "cpu"
    assert torch.isfinite(w).all()


def test_reproducible_from_generator():
    draw = lambda seed: performer.orthogonal_features(40, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("seeded", [True, False], ids=["generator", "no_generator"])
def test_global_rng_untouched(seeded):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0) if seeded else None
    performer.orthogonal_features(33, 8, generator=generator)
    assert torch.equal(torch.get_rng_state(), before)


def test_no_generator_draws_fresh_features():
    assert not torch.equal(performer.orthogonal_features(8, 8), performer.orthogonal_features(8, 8))


@pytest.mark.parametrize("scaling", ["chi", "sqrt_d"])
@pytest.mark.parametrize("m,d", [(14, 4), (16, 16), (50, 7)])
def test_rows_orthogonal_within_each_block(m, d, scaling):
    w = performer.orthogonal_features(m, d, generator=torch.Generator().manual_seed(1), scaling=scaling,
                                      dtype=torch.float64)
    for block in w.split(d):
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-12 * gram.diagonal().max()


def test_sqrt_d_norms():
    w = performer.orthogonal_features(100, 9, generator=torch.Generator().manual_seed(2), scaling="sqrt_d",
                                      dtype=torch.float64)
    torch.testing.assert_close(w.norm(dim=1), torch.full((100,), 3.0, dtype=torch.float64))


def test_chi_norms_vary_like_gaussian_vectors():
    m, d = 4096, 16
    w = performer.orthogonal_features(m, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sq = w.norm(dim=1) ** 2       # chi-squared with d degrees of freedom: mean d, variance 2d
    assert sq.std() > 0.5 * math.sqrt(2 * d)
    assert abs(sq.mean().item() - d) < 5 * math.sqrt(2 * d / m)


def _softmax_kernel_estimates(w, x, y):
    """One FAVOR+ estimate of exp(x.y) per (d, d) block: mean_j phi(x)_j phi(y)_j with
    phi(x) = exp(W x - |x|^2 / 2)."""
    phi = lambda z: torch.exp(w @ z - z.dot(z) / 2)
    return (phi(x) * phi(y)).mean(dim=-1)


@pytest.mark.parametrize("sign_correct", [True, False], ids=["haar", "uncorrected_qr"])
def test_softmax_estimate_unbiased_only_with_sign_correction(sign_correct):
    """With x = y along e_0, QR's sign convention (the first row's e_0 component is never positive)
    biases the estimate by ~20 standard errors; the sign-corrected (Haar) blocks are unbiased."""
    d, draws = 4, 4000
    g = torch.Generator().manual_seed(0)
    w = performer.orthogonal_features(d * draws, d, generator=g, dtype=torch.float64,
                                      _sign_correct=sign_correct).reshape(draws, d, d)
    x = torch.zeros(d, dtype=torch.float64)
    x[0] = 0.5
    est = _softmax_kernel_estimates(w, x, x)
    z = (est.mean() - math.exp(x.dot(x).item())) / (est.std() / math.sqrt(draws))
    if sign_correct:
        assert abs(z) < 4, f"biased: {z:.1f} standard errors"
    else:
        assert abs(z) > 8, f"the uncorrected construction should be visibly biased; z = {z:.1f}"


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(num_features=0, dim=4), ValueError, "num_features must be at least 1; got 0"),
    (dict(num_features=4, dim=2.0), TypeError, "dim must be an int; got float"),
    (dict(num_features=True, dim=4), TypeError, "num_features must be an int; got bool"),
    (dict(num_features=4, dim=4, scaling="unit"), ValueError, "scaling must be one of 'chi', 'sqrt_d'; got 'unit'"),
    (dict(num_features=4, dim=4, dtype=torch.int32), TypeError, "dtype must be a floating-point torch.dtype"),
    (dict(num_features=4, dim=4, generator=0), TypeError, "generator must be a torch.Generator; got int"),
])
def test_bad_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        performer.orthogonal_features(**kwargs)


# ---- simplex random features -------------------------------------------------------------------

@pytest.mark.parametrize("m,d", [(14, 4), (16, 16), (50, 7), (3, 1)])
def test_simplex_blocks_are_regular_simplices(m, d):
    w = performer.simplex_features(m, d, generator=torch.Generator().manual_seed(1), scaling="sqrt_d",
                                   dtype=torch.float64)
    assert w.shape == (m, d)
    for block in w.split(d):
        unit = block / block.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        expected = torch.full_like(cos, -1.0 / (d - 1) if d > 1 else 1.0).fill_diagonal_(1.0)
        torch.testing.assert_close(cos, expected, atol=1e-12, rtol=0)


def test_simplex_rows_are_marginally_standard_gaussian():
    """E[w w^T] = I over draws (each row's direction is uniform, its norm chi): FAVOR+ stays unbiased."""
    d, draws = 6, 3000
    w = performer.simplex_features(d * draws, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    second_moment = w.T @ w / w.shape[0]
    torch.testing.assert_close(second_moment, torch.eye(d, dtype=torch.float64), atol=0.08, rtol=0)


def test_simplex_estimate_unbiased_and_lower_variance_than_orthogonal():
    d, draws = 8, 3000
    g = torch.Generator().manual_seed(3)
    x, y = (0.6 * torch.randn(d, generator=g, dtype=torch.float64) for _ in range(2))
    exact = math.exp(x.dot(y).item())
    draw = {name: fn(d * draws, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64).reshape(draws, d, d)
            for name, fn in (("orthogonal", performer.orthogonal_features), ("simplex", performer.simplex_features))}
    est = {name: _softmax_kernel_estimates(w, x, y) for name, w in draw.items()}
    z = (est["simplex"].mean() - exact) / (est["simplex"].std() / math.sqrt(draws))
    assert abs(z) < 4, f"biased: {z:.1f} standard errors"
    mse = {name: ((e - exact) ** 2).mean().item() for name, e in est.items()}
    assert mse["simplex"] < 0.95 * mse["orthogonal"], mse


def test_simplex_validates_like_orthogonal():
    with pytest.raises(ValueError, match="num_features must be at least 1; got 0"):
        performer.simplex_features(0, 4)
    with pytest.raises(ValueError, match="scaling must be one of 'chi', 'sqrt_d'"):
        performer.simplex_features(4, 4, scaling="unit")


# ---- antithetic pairs ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [performer.orthogonal_features, performer.simplex_features])
def test_antithetic_rows_come_in_negated_pairs(sampler):
    w = sampler(10, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64, antithetic=True)
    assert w.shape == (10, 4)
    torch.testing.assert_close(w[5:], -w[:5], atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_features must be even with antithetic=True"):
        sampler(9, 4, antithetic=True)
    with pytest.raises(TypeError, match="antithetic must be a bool; got int"):
        sampler(8, 4, antithetic=1)


def test_antithetic_estimate_unbiased_and_lower_variance():
    """The pair exp(w.x) + exp(-w.x) is still unbiased for exp(x.y) and has a lower variance than
    as many independent orthogonal rows."""
    d, draws = 8, 3000
    g = torch.Generator().manual_seed(6)
    x, y = (0.6 * torch.randn(d, generator=g, dtype=torch.float64) for _ in range(2))
    exact = math.exp(x.dot(y).item())
    plain = performer.orthogonal_features(d * draws, d, generator=torch.Generator().manual_seed(7),
                                          dtype=torch.float64).reshape(draws, d, d)
    anti = torch.stack([performer.orthogonal_features(d, d, generator=torch.Generator().manual_seed(8 + i),
                                                      dtype=torch.float64, antithetic=True) for i in range(draws)])
    est = {name: _softmax_kernel_estimates(w, x, y) for name, w in (("plain", plain), ("antithetic", anti))}
    z = (est["antithetic"].mean() - exact) / (est["antithetic"].std() / math.sqrt(draws))
    assert abs(z) < 4, f"biased: {z:.1f} standard errors"
    mse = {name: ((e - exact) ** 2).mean().item() for name, e in est.items()}
    assert mse["antithetic"] < 0.95 * mse["plain"], mse  # 0.90 with these seeds
