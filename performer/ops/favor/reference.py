"""Plain-PyTorch FAVOR+ in the canonical layout (see performer._validate.FavorArgs).

Math, with c = sqrt(scale), q' = c q, k' = c k and W the (m, E) features:
  softmax kernel:  phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)   (positive random features)
  relu kernel:     phi(x) = relu(W x) + RELU_EPS
  out_t = sum_s phi(q'_t).phi(k'_s) v_s / sum_s phi(q'_t).phi(k'_s)
over the keys s that are not padding (and s <= t when causal). A query with no visible key
returns zeros. Constant factors of phi cancel in the ratio: queries are shifted by their own
max, keys by the max over all visible keys; both shifts are exact and carry no gradient.

``favor_dense`` forms the (L, S) weight matrix: the ground truth for tests.
``favor_torch`` is the linear-memory formulation phi(Q) (phi(K)^T [V, 1]), causal by chunked
cumulative sums: the "torch" backend, and the baseline the kernels are measured against.
"""
from __future__ import annotations

import torch

RELU_EPS = 1e-3


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_features(q: torch.Tensor, features: torch.Tensor, scale: float, kernel: str) -> torch.Tensor:
    u = (q * scale ** 0.5) @ features.T
    if kernel == "relu":
        return torch.relu(u) + RELU_EPS
    return torch.exp(u - u.amax(dim=-1, keepdim=True).detach())


def key_features(k: torch.Tensor, features: torch.Tensor, scale: float, kernel: str,
                 key_padding_mask) -> torch.Tensor:
    """(B, Hk, S, m) key features; padding keys get exactly zero."""
    kc = k * scale ** 0.5
    w = kc @ features.T
    if kernel == "relu":
        phi = torch.relu(w) + RELU_EPS
    else:
        w = w - 0.5 * (kc * kc).sum(dim=-1, keepdim=True)
        if key_padding_mask is not None:
            w = w.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        shift = w.detach().amax(dim=(-2, -1), keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        phi = torch.exp(w - shift)
    if key_padding_mask is not None:
        phi = phi.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return phi


def _prepare(q, k, v, features, key_padding_mask, scale, kernel):
    acc = acc_dtype(q.dtype)
    q, k, v, features = (t.to(acc) for t in (q, k, v, features))
    groups = q.shape[1] // k.shape[1]
    phi_q = query_features(q, features, scale, kernel)
    phi_k = key_features(k, features, scale, kernel, key_padding_mask)
    phi_k = phi_k.repeat_interleave(groups, dim=1)
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).repeat_interleave(groups, dim=1)
    return phi_q, phi_k, v_aug


def _normalize(out_aug: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    num, den = out_aug[..., :-1], out_aug[..., -1:]
    visible = den > 0
    out = num / torch.where(visible, den, torch.ones_like(den))
    return torch.where(visible, out, torch.zeros_like(out)).to(dtype)


def favor_dense(q, k, v, features, key_padding_mask, scale: float, causal: bool, kernel: str):
    phi_q, phi_k, v_aug = _prepare(q, k, v, features, key_padding_mask, scale, kernel)
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        a = torch.tril(a)
    return _normalize(a @ v_aug, q.dtype)


def favor_torch(q, k, v, features, key_padding_mask, scale: float, causal: bool, kernel: str,
                chunk: int = 128):
    phi_q, phi_k, v_aug = _prepare(q, k, v, features, key_padding_mask, scale, kernel)
    if not causal:
        return _normalize(phi_q @ (phi_k.transpose(-1, -2) @ v_aug), q.dtype)
    state = phi_q.new_zeros(phi_q.shape[:-2] + (phi_q.shape[-1], v_aug.shape[-1]))
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for t0 in range(0, q.shape[-2], chunk):
        pq, pk, va = (x[..., t0:t0 + chunk, :] for x in (phi_q, phi_k, v_aug))
        n = pq.shape[-2]
        a = (pq @ pk.transpose(-1, -2)).masked_fill(~tril[:n, :n], 0.0)
        outs.append(a @ va + pq @ state)
        state = state + pk.transpose(-1, -2) @ va
    return _normalize(torch.cat(outs, dim=-2), q.dtype)
