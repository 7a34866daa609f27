"""What the compiled FAVOR+ ops of every backend share: the op pair's contract (forward returns out
and the statistics its backward needs; backward recomputes features from them), their fake
kernels, their autograd, and the argument checks of ops written in Python.

    forward(q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel)
        -> out (B, H, L, Ev) in q's dtype, state (B, Hk, m, Ev + 1), den (B, H, L),
           query_shift (B, H, L), key_shift (B, Hk, S), the last four in the accumulation dtype
    backward(grad_out, q, k, v, features, feature_bias, key_padding_mask, out, state, den,
             query_shift, key_shift, scale, causal, kernel, features_grad)
        -> dq, dk, dv, dfeatures, dfeature_bias (the last two empty tensors when features_grad is
           false, the bias's also when there is none)

features are (m, E), or per batch and key head (Bf, Hf, m, E) with Bf in {1, B} and Hf in {1, Hk}
(or (Hf, m, E)); feature_bias is None or of the features' shape without E.

and of the decoding step (no autograd: performer.favor_attention_step runs the plain-PyTorch step
when a gradient is needed):

    favor_step(q, k, v, features, feature_bias, key_padding_mask, kv, normalizer, key_max, scale, kernel)
        -> out (B, H, T, Ev), kv (B, Hk, m, Ev), normalizer (B, Hk, m), key_max (B, Hk)
    favor_step_(...same, kv, normalizer and key_max updated in place) -> out
"""
from __future__ import annotations

import torch

from ..._validate import KERNELS

# The kernels the CUDA and Triton code implements; softmax_normalized runs on the C++ CPU kernels and
# the torch backend (the default on GPUs).
GPU_KERNELS = ("softmax", "relu")


def gpu_kernel_reason(kernel: str):
    """Why the CUDA and Triton kernels do not take this kernel, or None."""
    return None if kernel in GPU_KERNELS else f"kernel {kernel!r} has no GPU kernel (the torch backend runs it)"


def acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def forward_fake(q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel):
    B, H, L, _ = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    m = features.shape[-2]
    acc = acc_dtype(q)
    return (q.new_empty(B, H, L, Ev), q.new_empty(B, Hk, m, Ev + 1, dtype=acc),
            q.new_empty(B, H, L, dtype=acc), q.new_empty(B, H, L, dtype=acc), q.new_empty(B, Hk, S, dtype=acc))


def moments_fake(x):
    B, G, _, E = x.shape
    return x.new_empty(B, G, E, dtype=acc_dtype(x)), x.new_empty(B, G, E, dtype=acc_dtype(x))


def step_fake(q, k, v, features, feature_bias, key_padding_mask, kv, normalizer, key_max, scale, kernel):
    B, H, T, _ = q.shape
    Hk, Ev, m = k.shape[1], v.shape[3], features.shape[-2]
    acc = acc_dtype(q)
    return (q.new_empty(B, H, T, Ev), q.new_empty(B, Hk, m, Ev, dtype=acc), q.new_empty(B, Hk, m, dtype=acc),
            q.new_empty(B, Hk, dtype=acc))


def step_inplace_fake(q, k, v, features, feature_bias, key_padding_mask, kv, normalizer, key_max, scale, kernel):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def backward_fake(grad_out, q, k, v, features, feature_bias, key_padding_mask, out, state, den, query_shift,
                  key_shift, scale, causal, kernel, features_grad):
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dw = torch.empty_like(features, memory_format=torch.contiguous_format) if features_grad else features.new_empty(0)
    db = torch.empty_like(feature_bias, memory_format=torch.contiguous_format) \
        if features_grad and feature_bias is not None else features.new_empty(0)
    return dq, dk, dv, dw, db


def register_autograd(forward, backward) -> None:
    """forward's gradient through backward: q, k, v always; features and feature_bias when either
    needs one (the mask is a constant)."""
    def setup_context(ctx, inputs, output):
        q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel = inputs
        out, *stats = output
        ctx.save_for_backward(q, k, v, features, feature_bias, key_padding_mask, out, *stats)
        ctx.params = (scale, causal, kernel)
        ctx.mark_non_differentiable(*stats)

    def backward_fn(ctx, grad_out, *_unused):
        features_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, dk, dv, dw, db = backward(grad_out, *ctx.saved_tensors, *ctx.params, features_grad)
        dw = dw if ctx.needs_input_grad[3] else None
        db = db if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dw, db, None, None, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def check_forward(q, k, v, features, key_padding_mask, causal: bool, kernel: str, op: str, dtypes,
                  feature_bias=None) -> None:
    """The forward op's own argument checks (performer.favor_attention validates before this)."""
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and 2 <= features.dim() <= 4,
                 lambda: f"{op}: expected q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) and features (m, E), "
                         "(Hf, m, E) or (Bf, Hf, m, E)")
    B, H, L, E = q.shape
    sets = (1,) * (4 - features.dim()) + tuple(features.shape[:-2])
    torch._check(k.shape[0] == B and v.shape[0] == B and k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2]
                 and k.shape[3] == E and features.shape[-1] == E and k.shape[1] > 0 and H % k.shape[1] == 0
                 and sets[0] in (1, B) and sets[1] in (1, k.shape[1]),
                 lambda: f"{op}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"features {tuple(features.shape)}")
    torch._check(feature_bias is None or tuple(feature_bias.shape) == tuple(features.shape[:-1]),
                 lambda: f"{op}: feature_bias must have shape {tuple(features.shape[:-1])}; got "
                         f"{tuple(feature_bias.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype and q.dtype in dtypes,
                 lambda: f"{op}: q, k, v must share one dtype of {dtypes}; got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(q.device == k.device == v.device == features.device
                 and (feature_bias is None or feature_bias.device == q.device),
                 lambda: f"{op}: q, k, v, features and feature_bias must be on one device")
    torch._check(kernel in KERNELS, lambda: f"{op}: kernel must be one of {KERNELS}; got {kernel!r}")
    torch._check(not causal or L == k.shape[2], lambda: f"{op}: causal needs L == S; got {L} and {k.shape[2]}")
    if key_padding_mask is not None:
        torch._check(key_padding_mask.dtype == torch.bool and tuple(key_padding_mask.shape) == (B, k.shape[2]),
                     lambda: f"{op}: key_padding_mask must be bool (B, S) = ({B}, {k.shape[2]}); got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
