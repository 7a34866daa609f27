"""Random features for FAVOR+: block-orthogonal and block-simplex Gaussian projections."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ._validate import check_choice, check_positive_int

SCALINGS = ("chi", "sqrt_d")


def _orthogonal_block(dim: int, generator, device, sign_correct: bool = True) -> torch.Tensor:
    """A (dim, dim) orthogonal matrix; Haar-distributed when sign_correct.

    QR returns Q with a fixed sign convention on diag(R) that ties Q's columns to the input;
    multiplying column j by sign(R[j, j]) removes it, making Q exactly Haar.
    """
    g = torch.randn(dim, dim, generator=generator, device=device, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    if sign_correct:
        d = torch.sign(torch.diagonal(r))
        q = q * torch.where(d == 0, torch.ones_like(d), d)
    return q.T  # rows orthonormal


def _simplex_block(dim: int, generator, device) -> torch.Tensor:
    """(dim, dim) rows: the dim unit vertices of a regular simplex centred at the origin (pairwise
    cosine -1/(dim - 1)), in a Haar-random orientation. One dimension has no simplex: +-1."""
    if dim == 1:
        return _orthogonal_block(1, generator, device)
    eye = torch.eye(dim, device=device, dtype=torch.float64)
    vertices = eye - 1.0 / dim
    vertices = vertices / vertices.norm(dim=1, keepdim=True)
    return vertices @ _orthogonal_block(dim, generator, device)


def orthogonal_features(num_features: int, dim: int, *, generator: Optional[torch.Generator] = None,
                        scaling: str = "chi", dtype: torch.dtype = torch.float32,
                        device=None, antithetic: bool = False, _sign_correct: bool = True) -> torch.Tensor:
    """Draw positive-orthogonal random features W of shape (num_features, dim).

    Rows come from ceil(num_features / dim) independent Haar-orthogonal (dim, dim) blocks,
    stacked and truncated. ``scaling="chi"`` gives each row the norm of an independent
    standard Gaussian vector in R^dim (so every row is marginally N(0, I)); ``"sqrt_d"`` gives
    every row norm sqrt(dim). Randomness comes only from ``generator`` (or, when it is None,
    a freshly seeded one: the global RNG is never touched), drawn in float64 and cast to ``dtype``.

    ``antithetic=True`` draws num_features / 2 rows (num_features must be even) and appends their
    negatives: with positive features the pair exp(w.x) + exp(-w.x) cancels the odd terms of each
    estimate, lowering its variance at the same number of features (the "hyperbolic" estimator of
    the Performer paper). Every row is still marginally N(0, I) with "chi".
    """
    return _draw(num_features, dim, generator, scaling, dtype, device,
                 lambda g, dev: _orthogonal_block(dim, g, dev, _sign_correct), antithetic)


def simplex_features(num_features: int, dim: int, *, generator: Optional[torch.Generator] = None,
                     scaling: str = "chi", dtype: torch.dtype = torch.float32, device=None,
                     antithetic: bool = False) -> torch.Tensor:
    """Draw simplex random features W of shape (num_features, dim) (Reid et al., "Simplex Random
    Features", ICML 2023): in each block of dim rows the directions are the vertices of a regular
    simplex (pairwise cosine -1/(dim - 1), more spread than orthogonal rows), randomly rotated;
    norms as in ``orthogonal_features``. Every row is still marginally N(0, I) with "chi", so
    FAVOR+ stays unbiased, with a lower variance than orthogonal features. Same arguments and
    randomness rules as ``orthogonal_features`` (``antithetic`` included); pass the result as
    ``features=``."""
    return _draw(num_features, dim, generator, scaling, dtype, device,
                 lambda g, dev: _simplex_block(dim, g, dev), antithetic)


def _draw(num_features, dim, generator, scaling, dtype, device, block, antithetic) -> torch.Tensor:
    check_positive_int("num_features", num_features)
    if not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be a bool; got {type(antithetic).__name__}")
    if antithetic and num_features % 2:
        raise ValueError(f"num_features must be even with antithetic=True (rows come in pairs w, -w); "
                         f"got {num_features}")
    check_positive_int("dim", dim)
    check_choice("scaling", scaling, SCALINGS)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if device is None:
            device = generator.device
        elif torch.device(device).type != generator.device.type:
            raise ValueError(f"generator must be on device {torch.device(device)}; got {generator.device}")
    else:
        generator = torch.Generator(device=device if device is not None else "cpu")
        generator.seed()
    rows = num_features // 2 if antithetic else num_features
    blocks = [block(generator, device) for _ in range(math.ceil(rows / dim))]
    w = torch.cat(blocks, dim=0)[:rows]
    if scaling == "chi":
        norms = torch.randn(rows, dim, generator=generator, device=device, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((rows,), math.sqrt(dim), device=device, dtype=torch.float64)
    w = w * norms.unsqueeze(1)
    return (torch.cat([w, -w]) if antithetic else w).to(dtype)


FeatureSampler = Callable[..., torch.Tensor]


def sample_features(sampler: Optional[FeatureSampler], num_features: int, dim: int, *, generator: torch.Generator,
                    device, dtype: torch.dtype) -> torch.Tensor:
    """Draw a module's (num_features, dim) features with ``sampler(num_features, dim, generator=,
    device=, dtype=)`` (None: ``orthogonal_features``), checking what it returns."""
    w = (sampler or orthogonal_features)(num_features, dim, generator=generator, device=device, dtype=dtype)
    if not isinstance(w, torch.Tensor) or w.shape != (num_features, dim) or w.dtype != dtype:
        got = (f"shape {tuple(w.shape)}, dtype {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__)
        raise ValueError(f"feature_sampler must return a ({num_features}, {dim}) tensor of dtype {dtype}; got {got}")
    return w
