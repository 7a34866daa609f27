"""Plain-PyTorch FAVOR+ in the canonical layout (see performer._validate.FavorArgs).

Math, with c = sqrt(scale), q' = c q, k' = c k, W the (m, E) features and b their bias (zero
when none; both may differ per batch and key head: (Bf, Hf, m, E) and (Bf, Hf, m)):
  softmax kernel:  phi(x) = exp(W x + b - |x|^2 / 2) / sqrt(m)   (positive random features)
  softmax_normalized: queries as softmax, keys phi(y) = exp(W y + b - lse(W y + b)), lse the
                   log-sum-exp over the m features: each key's features divided by their sum (m times
                   their mean, an estimate of what exp(-|y|^2/2) normalizes exactly on average). The
                   ratio estimator: consistent, with lower variance (see performer.feature_maps)
  relu kernel:     phi(x) = relu(W x + b) + RELU_EPS
  out_t = sum_s phi(q'_t).phi(k'_s) v_s / sum_s phi(q'_t).phi(k'_s)
over the keys s that are not padding (and s <= t when causal). A query with no visible key
returns zeros. Constant factors of phi cancel in the ratio: queries are shifted by their own
max, keys by the max over all visible keys; both shifts are exact and carry no gradient.

``favor_dense`` forms the (L, S) weight matrix: the ground truth for tests.
``favor_torch`` is the linear-memory formulation phi(Q) (phi(K)^T [V, 1]), causal by chunked
cumulative sums, with the same stabilization as the compiled kernels: the "torch" backend, and
the baseline the kernels are measured against.
"""
from __future__ import annotations

import torch

RELU_EPS = 1e-3


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def project(x: torch.Tensor, features: torch.Tensor, bias=None) -> torch.Tensor:
    """x (B, H, N, E) @ W^T + b: (B, H, N, m), with per-(batch, key head) features (Bf, Hf, m, E) and
    bias (Bf, Hf, m) repeated over the query heads of each key head (H = Hf * groups)."""
    if features.dim() == 4 and features.shape[1] not in (1, x.shape[1]):
        groups = x.shape[1] // features.shape[1]
        features = features.repeat_interleave(groups, dim=1)
        bias = bias.repeat_interleave(groups, dim=1) if bias is not None else None
    u = x @ features.transpose(-1, -2)
    return u if bias is None else u + bias.unsqueeze(-2)


def query_features(q: torch.Tensor, features: torch.Tensor, scale: float, kernel: str, bias=None) -> torch.Tensor:
    u = project(q * scale ** 0.5, features, bias)
    if kernel == "relu":
        return torch.relu(u) + RELU_EPS
    return torch.exp(u - u.amax(dim=-1, keepdim=True).detach())


def key_log_normalizer(w: torch.Tensor, kc: torch.Tensor, kernel: str) -> torch.Tensor:
    """What the softmax kernels subtract from a key's projections w = W k' + b: |k'|^2 / 2, or
    (softmax_normalized) their log-sum-exp over the features."""
    if kernel == "softmax_normalized":
        return torch.logsumexp(w, dim=-1, keepdim=True) if w.shape[-1] else w.sum(dim=-1, keepdim=True)
    return 0.5 * (kc * kc).sum(dim=-1, keepdim=True)


def key_features(k: torch.Tensor, features: torch.Tensor, scale: float, kernel: str,
                 key_padding_mask, bias=None) -> torch.Tensor:
    """(B, Hk, S, m) key features; padding keys get exactly zero."""
    kc = k * scale ** 0.5
    w = project(kc, features, bias)
    if kernel == "relu":
        phi = torch.relu(w) + RELU_EPS
    else:
        w = w - key_log_normalizer(w, kc, kernel)
        if key_padding_mask is not None:
            w = w.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        if w.shape[-2] == 0:
            return w
        shift = w.detach().amax(dim=(-2, -1), keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        phi = torch.exp(w - shift)
    if key_padding_mask is not None:
        phi = phi.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return phi


def _prepare(q, k, v, features, key_padding_mask, scale, kernel, bias=None):
    acc = acc_dtype(q.dtype)
    q, k, v, features = (t.to(acc) for t in (q, k, v, features))
    bias = bias.to(acc) if bias is not None else None
    groups = q.shape[1] // k.shape[1]
    phi_q = query_features(q, features, scale, kernel, bias)
    phi_k = key_features(k, features, scale, kernel, key_padding_mask, bias)
    phi_k = phi_k.repeat_interleave(groups, dim=1)
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).repeat_interleave(groups, dim=1)
    return phi_q, phi_k, v_aug


def _normalize(out_aug: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    num, den = out_aug[..., :-1], out_aug[..., -1:]
    visible = den > 0
    out = num / torch.where(visible, den, torch.ones_like(den))
    return torch.where(visible, out, torch.zeros_like(out)).to(dtype)


def favor_dense(q, k, v, features, key_padding_mask, scale: float, causal: bool, kernel: str, feature_bias=None):
    phi_q, phi_k, v_aug = _prepare(q, k, v, features, key_padding_mask, scale, kernel, feature_bias)
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:  # bottom-right aligned: query t is position S - L + t
        a = torch.tril(a, diagonal=a.shape[-1] - a.shape[-2])
    return _normalize(a @ v_aug, q.dtype)


NEG_INF = float("-inf")
QUERY_SHIFT_SPAN = 30.0  # keep in sync with kQueryShiftSpan in csrc/cpu/favor_kernel.h


def min_den(dtype: torch.dtype) -> float:
    """Normalizers below this have no representable key weight: the query returns zeros
    (kMinDen in csrc/cpu/favor_kernel.h)."""
    return 1e-200 if dtype == torch.float64 else 1e-15


def _rescale(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a - b) for running maxima a <= b, where a = -inf (nothing visible yet) gives 0."""
    return torch.where(a == NEG_INF, torch.zeros_like(a), torch.exp(a - torch.where(b == NEG_INF, a, b)))


def _query_shift(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """max(max_j (u + lam), max_j u - span): keeps each query's normalizer >= 1 (lam <= log Z)."""
    return torch.maximum((u + lam).amax(dim=-1, keepdim=True), u.amax(dim=-1, keepdim=True) - QUERY_SHIFT_SPAN)


def _masked_exp(x: torch.Tensor, shift: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x - shift) where keep and shift > -inf, else 0; no inf/nan enters the gradient."""
    keep = keep & (shift != NEG_INF)
    return torch.exp(torch.where(keep, x - torch.where(keep, shift, 0.0), NEG_INF))


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, torch.ones_like(x))), torch.full_like(x, NEG_INF))


class _Normalize(torch.autograd.Function):
    """out = num / den (zero where den < min_den), with the gradient written as g / den and
    -(g . out) / den: autograd's division would form num / den**2, which underflows in float32."""

    @staticmethod
    def forward(ctx, num, den):
        ok = den >= min_den(den.dtype)
        inv = torch.where(ok, 1.0 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
        out = num * inv
        ctx.save_for_backward(out, inv)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, inv = ctx.saved_tensors
        return grad * inv, -(grad * out).sum(dim=-1, keepdim=True) * inv


def favor_torch(q, k, v, features, key_padding_mask, scale: float, causal: bool, kernel: str,
                chunk: int = 128, initial_state=None, return_state: bool = False, feature_bias=None):
    """Linear-memory FAVOR+ in plain PyTorch with the kernels' stabilization (running key maximum,
    per-query shifts that keep normalizers >= 1): no causal leak, finite for any finite input.
    Differentiable with respect to q, k, v, features and feature_bias.

    Causal only: ``initial_state`` (kv (B, Hk, m, Ev), normalizer (B, Hk, m), running key maximum
    (B, Hk), in the accumulation dtype) continues from earlier keys, and ``return_state=True``
    returns ``(out, final_state)``: the recurrent form used by favor_attention_step."""
    acc, out_dtype = acc_dtype(q.dtype), q.dtype
    W = features.to(acc)
    bias = feature_bias.to(acc) if feature_bias is not None else None
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    B, H, L, _ = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    m = W.shape[-2]
    groups = H // Hk
    c = scale ** 0.5
    u = project(q * c, W, bias)                        # (B, H, L, m)
    kc = k * c
    w = project(kc, W, bias)                           # (B, Hk, S, m)
    visible = torch.ones(B, 1, S, dtype=torch.bool, device=q.device) if key_padding_mask is None \
        else ~key_padding_mask[:, None, :]
    if kernel == "relu":
        phi_k = torch.where(visible[..., None], torch.relu(w) + RELU_EPS, torch.zeros_like(w))
        row_max = torch.where(visible, 0.0, NEG_INF).to(acc).expand(B, Hk, S)
    else:
        w = w - key_log_normalizer(w, kc, kernel)
        row_max = torch.where(visible, w.detach().amax(dim=-1) if w.shape[-1] else 0.0, NEG_INF)
    # kv head -> its query heads (no copy without grouped-query heads)
    heads = (lambda x: x.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda x: x)

    def features_q(uq, lam):
        if kernel == "relu":
            return torch.relu(uq) + RELU_EPS  # torch.relu keeps NaN
        return torch.exp(uq - _query_shift(uq.detach(), lam))

    def finish(num, den):
        return _Normalize.apply(num, den).to(out_dtype)

    if not causal:
        M = row_max.amax(dim=-1, keepdim=True) if S else torch.full((B, Hk, 1), NEG_INF, dtype=acc, device=q.device)
        if kernel != "relu":
            phi_k = _masked_exp(w, M[..., None], visible[..., None])
        state, z = heads(phi_k.transpose(-1, -2) @ v), heads(phi_k.sum(dim=-2))
        phi_q = features_q(u, _log(z.detach())[:, :, None, :])
        return finish(phi_q @ state, (phi_q @ z[..., None]).squeeze(-1)[..., None])

    if initial_state is None:
        state = q.new_zeros(B, Hk, m, Ev)
        z = q.new_zeros(B, Hk, m)
        m_prev = torch.full((B, Hk), NEG_INF, dtype=acc, device=q.device)
    else:
        state, z, m_prev = initial_state
        row_max = torch.maximum(row_max, m_prev[..., None])  # earlier keys count towards the running max
    run_max = torch.cummax(row_max, dim=-1).values if S else row_max  # m_s: max over keys <= s
    if kernel != "relu":
        phi_k = _masked_exp(w, run_max[..., None], visible[..., None])
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for t0 in range(0, L, chunk):
        t1 = min(t0 + chunk, L)
        n = t1 - t0
        ms = run_max[..., t0:t1]                                        # (B, Hk, n)
        pk, vc = phi_k[..., t0:t1, :], v[..., t0:t1, :]
        earlier = torch.where(tril[:n, :n], ms[..., None, :], NEG_INF)   # [t, s] = m_s for s <= t
        intra = _rescale(earlier, ms[..., :, None])                          # e^{m_s - m_t}, 0 for s > t
        inter = _rescale(m_prev[..., None], ms)                         # e^{Mprev - m_t}
        lam = torch.maximum(_log(z.detach())[..., None, :] + torch.where(inter > 0, torch.log(inter.clamp_min(1e-300)),
                                                                 NEG_INF)[..., None],
                            torch.where(visible[..., t0:t1, None] & (ms != NEG_INF)[..., None],
                                        w.detach()[..., t0:t1, :] - torch.where(ms == NEG_INF, 0.0, ms)[..., None],
                                        NEG_INF))
        phi_q = features_q(u[..., t0:t1, :], heads(lam))
        a = (phi_q @ heads(pk).transpose(-1, -2)) * heads(intra)
        num = a @ heads(vc) + heads(inter)[..., None] * (phi_q @ heads(state))
        den = a.sum(dim=-1) + heads(inter) * (phi_q @ heads(z)[..., None]).squeeze(-1)
        outs.append(finish(num, den[..., None]))
        m_end = ms[..., -1]
        keep = _rescale(m_prev, m_end)[..., None]
        scaled = pk * _rescale(ms, m_end[..., None])[..., None]
        state = state * keep[..., None] + scaled.transpose(-1, -2) @ vc
        z = z * keep + scaled.sum(dim=-2)
        m_prev = m_end
    if not outs:  # L == 0: an empty result that still takes part in autograd
        out = (q.new_zeros(B, H, 0, Ev) + 0 * (q.sum() + k.sum() + v.sum() + W.sum())).to(out_dtype)
    else:
        out = torch.cat(outs, dim=-2)
    return (out, (state, z, m_prev)) if return_state else out
